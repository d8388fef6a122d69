"""Training data: the batch of each step (a pure function of the config and the step) and its noising.

Clips come from the synthetic world: its latent-space version (`synthetic`, frames = latents), or, with
`TrainConfig.codec`, its pixel version (`landmarks`) encoded by that codec, drawn from a pool of
`num_worlds` worlds encoded once per process.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from omnimem_jax.convert import wan_vae
from omnimem_jax.data import synthetic
from omnimem_jax.data.synthetic import WorldConfig
from omnimem_jax.training import codec
from omnimem_jax.training.config import TrainConfig


@functools.lru_cache(maxsize=2)
def encoded_pool(codec_dir: str, world: WorldConfig, num_worlds: int, latent_frames: int, seed: int) -> np.ndarray:
  """The latents of `num_worlds` pixel worlds encoded by the codec checkpoint `codec_dir`:
  [num_worlds, C, latent_frames, H, W] float32 (normalised, as the DiT consumes them)."""
  vae = wan_vae.restore_vae(codec_dir)
  if vae.config.z_dim != world.channels:
    raise ValueError(f"codec {codec_dir} makes {vae.config.z_dim} latent channels, the world has {world.channels}")
  world_seeds = np.random.default_rng(np.random.SeedSequence([seed, 0x9001])).integers(0, 2**31 - 1, num_worlds)
  return codec.encode_worlds(vae, world, world_seeds, latent_frames)


def clean_latents(config: TrainConfig, seeds: np.ndarray, latent_frames: int) -> np.ndarray:
  """Clean clips of the worlds `seeds`: [B, C, F, H, W] float32 (with a codec: pool worlds `seeds % num_worlds`)."""
  if config.codec is None:
    return synthetic.batch(config.world, seeds, latent_frames)
  pool = encoded_pool(config.codec, config.world, config.num_worlds, config.num_chunks * config.world.frames_per_chunk,
                      config.seed)
  return pool[np.asarray(seeds) % config.num_worlds, :, :latent_frames]


def make_batch(config: TrainConfig, step: int, batch_size: int | None = None) -> dict[str, np.ndarray]:
  """The batch of training step `step`, a pure function of (config, step): every random input of the
  loss (clips, text, sigma per chunk, noise), so a resumed run sees exactly what it would have seen.

  Returns float32 arrays: latents [B, C, F, H, W] (clean clips), noise (same shape), sigma [B, N],
  text [B, text_len, text_dim] (a random, uninformative embedding: the world has no prompt).
  """
  batch_size = config.batch_size if batch_size is None else batch_size
  model, frames = config.model, config.num_chunks * config.model.memory.frames_per_chunk
  rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0x7EA1, int(step)]))
  seeds = rng.integers(0, 2**31 - 1, batch_size)
  latents = clean_latents(config, seeds, frames)
  noise = rng.standard_normal(latents.shape, dtype=np.float32)
  logits = rng.normal(config.sigma_mean, config.sigma_std, (batch_size, config.num_chunks))
  sigma = 1.0 / (1.0 + np.exp(-logits))
  sigma = config.sigma_shift * sigma / (1.0 + (config.sigma_shift - 1.0) * sigma)
  text = rng.standard_normal((batch_size, model.text_len, model.text_dim), dtype=np.float32)
  return {"latents": latents, "noise": noise, "sigma": sigma.astype(np.float32), "text": text}


def noised(batch: dict[str, jax.Array], frames_per_chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(noisy latents, timesteps [B, N], velocity target eps - x0) of a batch from `make_batch`:
  `x_i = (1 - sigma_i) x0_i + sigma_i eps_i` per chunk i, at timestep 1000 sigma_i."""
  sigma = jnp.repeat(batch["sigma"], frames_per_chunk, axis=1)[:, None, :, None, None]
  latents, noise = batch["latents"], batch["noise"]
  return (1.0 - sigma) * latents + sigma * noise, 1000.0 * batch["sigma"], noise - latents
