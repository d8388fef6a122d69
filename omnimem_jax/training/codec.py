"""The demo's codec: a small Wan-architecture VAE trained on the pixel world (`omnimem_jax.data.landmarks`),
so the demo DiT can learn latents and its videos can be shown as pictures.

Training maximises the usual VAE objective on short clips: L1 + squared pixel error of the decoded
sample `mean + std * noise`, plus a small KL term that keeps the posterior close to N(0, 1) (and the
decoder tolerant of the imperfect latents a DiT makes). The config trains with latent statistics
(0, 1); the exported checkpoint carries the per-channel mean and standard deviation of the encoded
training worlds, so `WanVAE.encode` gives about unit-variance latents, as the DiT expects.

Usage (experiments/train_codec.py):
  config = CodecConfig()
  vae, history = train_codec(config, steps=3000)
  export_codec(vae, config, "assets/demo/vae", steps=3000, notes={...})
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float

from omnimem_jax import checkpoints
from omnimem_jax.convert import wan_vae
from omnimem_jax.data import landmarks
from omnimem_jax.data.synthetic import WorldConfig
from omnimem_jax.model.vae import VAEConfig, WanVAE
from omnimem_jax.training.optim import optimizer

DEMO_WORLD = WorldConfig(channels=8, height=8, width=16, world_width=60, speed=2)  # period 30 latent frames = 10 chunks


def demo_vae_config(world: WorldConfig = DEMO_WORLD) -> VAEConfig:
  """The demo codec: 8x spatial and 4x temporal compression (as Wan's) to `world.channels` latent channels,
  about 0.8M parameters (3 MB); latent statistics (0, 1) until `export_codec` measures them."""
  return VAEConfig(base_dim=16, z_dim=world.channels, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                   latents_mean=(0.0,) * world.channels, latents_std=(1.0,) * world.channels)


@dataclasses.dataclass(frozen=True)
class CodecConfig:
  """One codec training run.

  Attributes:
    world: the camera geometry of the pixel world (latent units; `landmarks` draws it 8x larger).
    vae: the codec's architecture; its z_dim must equal world.channels.
    latent_frames: latent frames per training clip (1 + 4 (F - 1) video frames).
    batch_size: clips per step.
    num_worlds: distinct worlds the clips come from (drawn once; each clip starts at a random frame).
    kl_weight: weight of the KL term (per latent element) against the pixel losses (per pixel).
    learning_rate, warmup_steps, weight_decay, beta1, beta2, grad_clip: AdamW (`optim.optimizer`).
    seed: worlds, noise and initialisation.
  """

  world: WorldConfig = DEMO_WORLD
  vae: VAEConfig = dataclasses.field(default_factory=demo_vae_config)
  latent_frames: int = 4
  batch_size: int = 8
  num_worlds: int = 512
  kl_weight: float = 1e-4
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  weight_decay: float = 0.0
  beta1: float = 0.9
  beta2: float = 0.99
  grad_clip: float = 1.0
  seed: int = 0

  def __post_init__(self) -> None:
    if self.vae.z_dim != self.world.channels:
      raise ValueError(f"the codec's z_dim {self.vae.z_dim} must equal the world's channels {self.world.channels}")
    if self.vae.spatial_compression != landmarks.PIXELS_PER_LATENT or (
        self.vae.temporal_compression != landmarks.FRAMES_PER_LATENT):
      raise ValueError(f"the codec must compress {landmarks.PIXELS_PER_LATENT}x in space and "
                       f"{landmarks.FRAMES_PER_LATENT}x in time, as the pixel world is drawn")
    if self.latent_frames < 2 or self.batch_size < 1 or self.num_worlds < 1:
      raise ValueError(f"need latent_frames >= 2, batch_size >= 1 and num_worlds >= 1, got {self.latent_frames}, "
                       f"{self.batch_size} and {self.num_worlds}")

  def to_dict(self) -> dict[str, Any]:
    fields = dataclasses.asdict(self)
    fields["vae"] = self.vae.to_dict()
    return fields


@functools.lru_cache(maxsize=2)
def scenes(world: WorldConfig, num_worlds: int, seed: int) -> np.ndarray:
  """The panoramas of the training worlds: [num_worlds, height, world width, 3] (drawn once per process)."""
  world_seeds = np.random.default_rng(np.random.SeedSequence([seed, 0x5CE9])).integers(0, 2**31 - 1, num_worlds)
  return np.stack([landmarks.panorama(world, int(world_seed)) for world_seed in world_seeds])


def clips(config: CodecConfig, step: int) -> np.ndarray:
  """The training clips of `step`, a pure function of (config, step): random worlds of the pool, each from
  a random point of its orbit; [B, 1 + 4 (F - 1), H, W, 3] in [-1, 1]."""
  rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0xC0DE, int(step)]))
  pool = scenes(config.world, config.num_worlds, config.seed)
  worlds = rng.integers(0, config.num_worlds, config.batch_size)
  starts = rng.integers(0, config.world.period, config.batch_size)
  return np.stack([landmarks.view(config.world, pool[w], config.latent_frames, int(s)) for w, s in zip(worlds, starts)])


def codec_loss(vae: WanVAE, video: Float[Array, "b t hh ww 3"], key: jax.Array, kl_weight: float
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L1 + squared error of the decoded posterior sample, plus `kl_weight` x the mean KL to N(0, 1)."""
  mean, logvar = vae.posterior(video)
  logvar = jnp.clip(logvar, -20.0, 10.0)
  sample = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
  decoded = vae.decode(vae.normalise(sample))
  error = decoded - video
  kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
  l1, mse = jnp.mean(jnp.abs(error)), jnp.mean(error ** 2)
  return l1 + mse + kl_weight * kl, {"l1": l1, "mse": mse, "kl": kl}


@functools.lru_cache(maxsize=4)
def _step_fn(config: CodecConfig) -> Callable[..., Any]:
  """The jitted update of (params, optimizer state) on a batch, with the metrics."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: WanVAE(config.vae, rngs=nnx.Rngs(0))))
  tx = optimizer(config)

  def step(params: nnx.State, opt_state: Any, video: jax.Array, key: jax.Array) -> tuple[Any, Any, dict]:
    def loss_of(p: nnx.State) -> tuple[jax.Array, dict]:
      return codec_loss(nnx.merge(graphdef, p), video, key, config.kl_weight)

    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, **metrics}

  return jax.jit(step, donate_argnums=(0, 1))


def train_codec(config: CodecConfig, steps: int, *, start: WanVAE | None = None, log_every: int = 100,
                time_budget_s: float | None = None, progress: TextIO | None = None
                ) -> tuple[WanVAE, list[dict[str, float]]]:
  """Trains a codec for `steps` steps (or until `time_budget_s`), from `start` (a codec of `config.vae`) or
  from fresh weights of `config.seed`; returns it (latent statistics still (0, 1)) and the loss history
  (one entry per `log_every` steps, averaged over them)."""
  progress = progress or sys.stdout
  if start is not None and start.config != config.vae:
    raise ValueError(f"start is a codec of {start.config}, the config trains {config.vae}")
  graphdef, params = nnx.split(WanVAE(config.vae, rngs=nnx.Rngs(config.seed)) if start is None else start)
  opt_state = jax.jit(optimizer(config).init)(params)
  step_fn, history, recent, start = _step_fn(config), [], [], time.perf_counter()
  for step in range(steps):
    if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
      print(f"time budget of {time_budget_s:g} s reached at step {step}", file=progress, flush=True)
      break
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    params, opt_state, metrics = step_fn(params, opt_state, jnp.asarray(clips(config, step)), key)
    recent.append({name: float(value) for name, value in metrics.items()})
    if (step + 1) % log_every == 0 or step + 1 == steps:
      history.append(_log(step + 1, recent, time.perf_counter() - start, progress))
      recent = []
  if recent:  # stopped by the time budget between two log lines
    history.append(_log(history[-1]["step"] + len(recent) if history else len(recent), recent,
                        time.perf_counter() - start, progress))
  return nnx.merge(graphdef, params), history


def _log(step: int, recent: list[dict[str, float]], seconds: float, progress: TextIO) -> dict[str, float]:
  """One history entry (the metrics averaged over `recent`), also printed."""
  entry = {"step": step, "seconds": seconds, **{name: float(np.mean([m[name] for m in recent])) for name in recent[0]}}
  print(f"step {step:6d}  loss {entry['loss']:.4f}  l1 {entry['l1']:.4f}  kl {entry['kl']:.3f}  {seconds:.0f} s",
        file=progress, flush=True)
  return entry


def statistics_worlds(config: CodecConfig, num_worlds: int = 64) -> np.ndarray:
  """The world seeds whose latents give the exported latent statistics."""
  return np.random.default_rng(np.random.SeedSequence([config.seed, 0x57A7])).integers(0, 2**31 - 1, num_worlds)


def latent_statistics(vae: WanVAE, config: CodecConfig, num_worlds: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation of the posterior means of `statistics_worlds` (clips of
  2 x latent_frames), in the codec's current normalisation."""
  latents = encode_worlds(vae, config.world, statistics_worlds(config, num_worlds), 2 * config.latent_frames)
  return latents.mean(axis=(0, 2, 3, 4)), latents.std(axis=(0, 2, 3, 4))


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef: nnx.GraphDef, state: nnx.State, video: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state).encode(video)


def encode_worlds(vae: WanVAE, world: WorldConfig, world_seeds: np.ndarray, latent_frames: int, *,
                  batch_size: int = 8) -> Float[np.ndarray, "n c f h w"]:
  """The normalised latents of the pixel worlds `world_seeds`: [N, C, latent_frames, H, W] float32 (the
  synthetic world's latent layout), encoded `batch_size` worlds at a time (compiled once per codec
  architecture and batch shape)."""
  graphdef, state = nnx.split(vae)
  latents = [np.asarray(_encode(graphdef, state, landmarks.batch(world, world_seeds[i:i + batch_size], latent_frames)))
             for i in range(0, len(world_seeds), batch_size)]
  return np.moveaxis(np.concatenate(latents), -1, 1)  # [N, F, H, W, C] -> [N, C, F, H, W]


def _architecture(vae: VAEConfig) -> dict[str, Any]:
  """A codec config's fields but its latent statistics (which training keeps at (0, 1))."""
  return {name: value for name, value in vae.to_dict().items() if name not in ("latents_mean", "latents_std")}


def resume_codec(directory: str | os.PathLike, config: CodecConfig) -> tuple[WanVAE, int]:
  """A codec exported by `export_codec`, to train further under `config` (e.g. over several sessions):
  (its parameters in a codec of `config.vae`, whose latent statistics stay (0, 1) while training, and the
  steps it was trained for). ValueError when its architecture differs from `config.vae`."""
  exported = wan_vae.restore_vae(directory)
  if _architecture(exported.config) != _architecture(config.vae):
    raise ValueError(f"{directory} is a codec of {_architecture(exported.config)}, not of the architecture trained "
                     f"here, {_architecture(config.vae)}")
  training = checkpoints.read_record(directory, checkpoints.Kind.VAE).training or {}
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: WanVAE(config.vae, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(exported)), int(training.get("steps", 0))


def export_codec(vae: WanVAE, config: CodecConfig, directory: str | os.PathLike, *, steps: int,
                 statistics_worlds: int = 64, notes: dict[str, Any] | None = None) -> Path:
  """Writes the codec as a `wan_vae` checkpoint (`wan_vae.restore_vae`, generate.py --vae) whose config
  carries the latent statistics measured on `statistics_worlds` worlds (the trained codec's are (0, 1));
  the record's `training` holds the run."""
  if config.vae.latents_mean != vae.config.latents_mean or config.vae.latents_std != vae.config.latents_std:
    raise ValueError("export_codec takes the codec as trained, with the latent statistics of its config")
  mean, std = latent_statistics(vae, config, statistics_worlds)
  vae_config = dataclasses.replace(config.vae, latents_mean=tuple(float(m) for m in mean),
                                   latents_std=tuple(float(max(s, 1e-3)) for s in std))
  record = checkpoints.CheckpointRecord(
      kind=checkpoints.Kind.VAE, config=vae_config.to_dict(), param_dtype="float32",
      source="omnimem_jax.training.codec (pixel world)",
      training={"steps": steps, **config.to_dict(), **(notes or {})})
  return checkpoints.save_checkpoint(directory, jax.device_get(nnx.to_pure_dict(nnx.state(vae, nnx.Param))), record)
