"""What one training run depends on: `TrainConfig` (recorded with its checkpoints and exports) and the
small DiT the synthetic-world demo trains (`demo_model_config`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from omnimem_jax.config import MemoryConfig, ModelConfig, checked_fields
from omnimem_jax.data import synthetic


def demo_model_config(mode: str = "omnimem", num_chunks: int = 12, **overrides: Any) -> ModelConfig:
  """The small DiT the synthetic-world demo trains: the tiny preset's token geometry (4 x 16 x 8 latents,
  2 x 2 blocks, groups of 2, top-4) with a little more width and depth. The baselines see the same
  3-chunk window as omnimem's sliding branch ("window": local_attn_frames = 9)."""
  memory = MemoryConfig(mode=mode, block_h=2, block_w=2, group_size=2, top_k=4, window_chunks=3,
                        exclude_window_chunks=3, capacity_chunks=max(num_chunks, 3), local_attn_frames=9,
                        sink_frames=3)
  fields = dict(dim=128, ffn_dim=256, num_heads=4, num_layers=4, in_channels=4, out_channels=4, text_dim=32,
                text_len=8, freq_dim=64, latent_height=8, latent_width=16, memory=memory)
  fields.update(overrides)
  return ModelConfig(**fields)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything one training run depends on (its checkpoints record it).

  Attributes:
    model: architecture and attention mode; the store capacity is irrelevant to training.
    world: the synthetic world the clips come from (frames = latents).
    num_chunks: chunks per training clip (the sequence is 2 x num_chunks chunks long).
    batch_size: clips per step (split over the mesh's "data" axis).
    learning_rate, warmup_steps, weight_decay, beta1, beta2, grad_clip: AdamW with linear warm-up and
      global-norm clipping (official stage 1: lr 1e-5, betas (0.9, 0.999) from a pretrained Wan).
    ema_decay: EMA of the parameters (official 0.99); the EMA is what `Trainer.export` writes.
    sigma_mean, sigma_std: logit-normal parameters of the per-chunk noise level (official (0, 1)).
    sigma_shift: s -> shift s / (1 + (shift - 1) s) on the drawn sigma (1: none); > 1 trains the
      high-noise levels the 4-step sampler uses more often.
    select_own_noisy_chunk: the official teacher-forcing AWE keeps a noisy query's own chunk among the
      selection candidates; False matches the rollout exactly.
    codec: a `wan_vae` checkpoint (`omnimem_jax.training.codec`): train on the pixel world encoded by it
      (`landmarks`) instead of the latent-space world; None: the latent-space world.
    num_worlds: with a codec, the number of distinct worlds (encoded once, then drawn from).
    seed: data, noise and initialisation seed.
  """

  model: ModelConfig = dataclasses.field(default_factory=demo_model_config)
  world: synthetic.WorldConfig = synthetic.WorldConfig()
  num_chunks: int = 12
  batch_size: int = 8
  learning_rate: float = 3e-4
  warmup_steps: int = 100
  weight_decay: float = 0.01
  beta1: float = 0.9
  beta2: float = 0.999
  grad_clip: float = 1.0
  ema_decay: float = 0.99
  sigma_mean: float = 0.0
  sigma_std: float = 1.0
  sigma_shift: float = 1.0
  select_own_noisy_chunk: bool = True
  codec: str | None = None
  num_worlds: int = 1024
  seed: int = 0

  def __post_init__(self) -> None:
    model, world = self.model, self.world
    if (world.channels, world.height, world.width) != (model.in_channels, model.latent_height, model.latent_width):
      raise ValueError(f"world frames {world.channels}x{world.height}x{world.width} must match the model's latents "
                       f"{model.in_channels}x{model.latent_height}x{model.latent_width}")
    if world.frames_per_chunk != model.memory.frames_per_chunk:
      raise ValueError(f"world frames_per_chunk {world.frames_per_chunk} != model's {model.memory.frames_per_chunk}")
    for name in ("num_chunks", "batch_size", "warmup_steps", "num_worlds"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"invalid TrainConfig field '{name}': must be a positive integer, got {value!r}")
    if 2 * self.num_chunks * model.memory.frames_per_chunk > model.rope_max_frames:
      raise ValueError(f"num_chunks={self.num_chunks} leaves the RoPE table of {model.rope_max_frames} frames")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"invalid TrainConfig field 'ema_decay': must lie in [0, 1), got {self.ema_decay}")
    if not (self.learning_rate > 0 and self.sigma_std > 0 and self.sigma_shift > 0 and self.grad_clip > 0):
      raise ValueError("learning_rate, sigma_std, sigma_shift and grad_clip must be > 0")

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready fields (model and world nested), the inverse of `from_dict`."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    fields["model"] = self.model.to_dict()
    fields["world"] = dataclasses.asdict(self.world)
    return fields

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> TrainConfig:
    """A config from `to_dict` output; unknown fields (here, in the model or in the world) are an error."""
    fields = checked_fields(cls, fields)
    if "model" in fields:
      fields["model"] = ModelConfig.from_dict(fields["model"])
    if "world" in fields:
      fields["world"] = synthetic.WorldConfig.from_dict(fields["world"])
    return cls(**fields)
