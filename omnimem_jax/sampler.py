"""Few-step flow-matching sampling of one chunk (Self-Forcing's DMD loop; wan-base-model.md 2.6-2.7).

Each step predicts the clean latents from the velocity, `x0 = x_t - sigma_t v`, and re-noises them
to the next step's level with fresh Gaussian noise, `x = (1 - sigma') x0 + sigma' eps` (not an ODE
step). After the last step a context pass at `context_timestep` (0: the clean latents) rewrites the
chunk's K/V, so the history holds clean K/V only.
"""

from __future__ import annotations

import numpy as np

from omnimem_jax.config import SamplerConfig


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
