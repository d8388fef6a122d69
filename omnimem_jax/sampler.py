"""Few-step flow-matching sampling of one chunk (Self-Forcing's DMD loop; docs/architecture.md, 'Sampler').

Each step predicts the clean latents from the velocity, `x0 = x_t - sigma_t v` (`clean_latents`), and
re-noises them to the next step's level with fresh Gaussian noise, `x = (1 - sigma') x0 + sigma' eps`
(`renoise`; not an ODE step). After the last step a context pass at `context_timestep` (0: the clean
latents) rewrites the chunk's K/V, so the history holds clean K/V only. `sample_chunk` runs that loop
over any model call; the noise comes from a `NoiseFn` (default `gaussian_noise`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from omnimem_jax.config import SamplerConfig

Carry = TypeVar("Carry")
# noise(key, chunk_index, step_index, shape) -> float32 array of `shape`, traced inside the rollout's jitted
# segment (chunk_index and step_index are int32 scalars). Step 0 is the chunk's initial noise; step s in
# 1 .. S (S denoising steps) the fresh noise that re-noises step s's clean estimate (step S: to the
# context level); the context pass draws step S + 1 too and discards it (`sample_chunk`).
NoiseFn = Callable[[jax.Array, Int[Array, ""], Int[Array, ""] | int, tuple[int, ...]], Float[Array, "..."]]


def training_grid(config: SamplerConfig) -> tuple[np.ndarray, np.ndarray]:
  """The shifted training grid (float64): sigmas = shift s / (1 + (shift - 1) s) for s = 1 .. 1/N,
  and timesteps = N sigmas."""
  steps = config.num_train_timesteps
  base = np.linspace(1.0, 0.0, steps + 1)[:-1]
  sigmas = config.shift * base / (1.0 + (config.shift - 1.0) * base)
  return sigmas * steps, sigmas


def sigma_at(config: SamplerConfig, timestep: float) -> float:
  """Noise level of the grid entry nearest to `timestep` (how Self-Forcing converts v to x0)."""
  timesteps, sigmas = training_grid(config)
  return float(sigmas[np.argmin(np.abs(timesteps - timestep))])


def denoising_timesteps(config: SamplerConfig) -> np.ndarray:
  """The model's t per denoising step, float32 (kept fractional: the sinusoid sees 937.5)."""
  timesteps, _ = training_grid(config)
  steps = np.asarray(config.denoising_steps)
  if config.warp:
    return np.concatenate([timesteps, [0.0]])[config.num_train_timesteps - steps].astype(np.float32)
  return steps.astype(np.float32)


def step_table(config: SamplerConfig) -> dict[str, np.ndarray]:
  """Per model call of one chunk (the denoising steps, then the context pass), float32 arrays:

    timestep:    t given to the model
    sigma:       sigma_t used in x0 = x_t - sigma_t v
    sigma_next:  level the step's x0 is re-noised to (the next step's; the context level after the
                 last step; unused on the context pass)
    is_context:  1.0 on the context pass (its x0 is discarded), else 0.0
  """
  timesteps = denoising_timesteps(config)
  context_sigma = 0.0 if config.context_timestep == 0 else sigma_at(config, config.context_timestep)
  sigmas = np.array([sigma_at(config, t) for t in timesteps])
  return {
      "timestep": np.append(timesteps, np.float32(config.context_timestep)).astype(np.float32),
      "sigma": np.append(sigmas, context_sigma).astype(np.float32),
      "sigma_next": np.concatenate([sigmas[1:], [context_sigma, 0.0]]).astype(np.float32),
      "is_context": np.append(np.zeros(len(timesteps)), 1.0).astype(np.float32),
  }


def gaussian_noise(key: jax.Array, chunk_index: Int[Array, ""] | int, step_index: Int[Array, ""] | int,
                   shape: tuple[int, ...]) -> Float[Array, "..."]:
  """The default `NoiseFn`: N(0, 1) from `fold_in(fold_in(key, chunk), step)`, so a chunk's noise does
  not depend on how the rollout is cut into segments."""
  return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, chunk_index), step_index), shape, jnp.float32)


def clean_latents(x: Float[Array, "*s"], velocity: Float[Array, "*s"], sigma: Float[Array, ""] | float
                  ) -> Float[Array, "*s"]:
  """The step's clean estimate x0 = x_t - sigma_t v (flow matching: x_t = (1 - sigma) x0 + sigma eps)."""
  return x - sigma * velocity


def renoise(x0: Float[Array, "*s"], noise: Float[Array, "*s"], sigma_next: Float[Array, ""] | float
            ) -> Float[Array, "*s"]:
  """x0 moved to the next step's noise level with fresh noise: (1 - sigma') x0 + sigma' eps."""
  return (1.0 - sigma_next) * x0 + sigma_next * noise


def sample_chunk(call: Callable[[Float[Array, "*s"], Float[Array, ""], Carry], tuple[Float[Array, "*s"], Carry]],
                 noise: Callable[[Int[Array, ""] | int], Float[Array, "*s"]], config: SamplerConfig,
                 carry: Carry) -> tuple[Float[Array, "*s"], Carry]:
  """One chunk: the denoising steps, then the context pass, as one `lax.scan` (the model traced once).

  Args:
    call: `(x, timestep, carry) -> (velocity, carry)`, the model on this chunk (the carry holds e.g.
      the KV store, which every call rewrites: noisy K/V on the denoising steps, clean on the context pass).
    noise: `noise(step)`: step 0 the initial x; after model call i (traced index) the fresh noise
      `noise(i + 1)` re-noises its clean estimate to `sigma_next` (after the last denoising step to the
      context level; after the context pass, whose output is discarded, to 0). Drawn inside the loop
      body, where the default Gaussian has always been drawn, so seeded videos stay bit-identical.
    config: the schedule (`step_table`).
    carry: the call's initial carry.

  Returns:
    (the last denoising step's clean latents x0, the carry after the context pass).
  """
  table = step_table(config)
  initial = noise(0)

  def step(state: tuple[Any, Any, Carry], row: tuple[Any, ...]) -> tuple[tuple[Any, Any, Carry], None]:
    x, x0_kept, carry = state
    index, timestep, sigma, sigma_next, is_context = row
    velocity, carry = call(x, timestep, carry)
    x0 = clean_latents(x, velocity, sigma)
    x0_kept = jnp.where(is_context > 0, x0_kept, x0)  # the context pass keeps the last step's x0
    return (renoise(x0, noise(index + 1), sigma_next), x0_kept, carry), None

  rows = (jnp.arange(len(table["timestep"]), dtype=jnp.int32),
          *(jnp.asarray(table[name]) for name in ("timestep", "sigma", "sigma_next", "is_context")))
  (_, x0, carry), _ = jax.lax.scan(step, (initial, jnp.zeros_like(initial), carry), rows)
  return x0, carry
