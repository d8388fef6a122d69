"""Frozen, validated configuration of the model geometry and of the OmniMem memory.

Every size the algorithm uses is a field here, so tests run the exact same code on a tiny preset as
production runs at 480x832 (docs/architecture.md, 'Token layout and blocks'). Construction validates
each field and each combination and raises `ValueError` naming the field and the rule it broke.

Every config class of the project follows one convention: named presets are a module-level `PRESETS`
dict of factories (each takes field overrides) read by `Config.from_preset(name, **overrides)`
through `build_preset`, and `Config.from_dict(fields)` (a checkpoint's or a run's JSON) refuses
unknown fields through `checked_fields`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

AttentionMode = Literal["omnimem", "window", "sink_window", "dense"]
ATTENTION_MODES: tuple[str, ...] = ("omnimem", "window", "sink_window", "dense")

Config = TypeVar("Config")


def build_preset(presets: Mapping[str, Callable[..., Config]], name: str, kind: str, overrides: Mapping[str, Any]
                ) -> Config:
  """`presets[name](**overrides)` (validated like any construction); ValueError for an unknown name."""
  if name not in presets:
    raise ValueError(f"unknown preset {name!r} for {kind}; choose one of {sorted(presets)}")
  return presets[name](**overrides)


def checked_fields(cls: type, fields: Mapping[str, Any]) -> dict[str, Any]:
  """Keyword arguments for `cls` (a config dataclass) from JSON fields: JSON lists become the tuples the
  configs hold; a field `cls` does not have is a ValueError naming it and the known ones."""
  known = [field.name for field in dataclasses.fields(cls)]
  unknown = sorted(set(fields) - set(known))
  if unknown:
    raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {known}")
  return {name: tuple(value) if isinstance(value, list) else value for name, value in fields.items()}


def _require(condition: bool, field: str, rule: str) -> None:
  if not condition:
    raise ValueError(f"invalid config field '{field}': {rule}")


def _require_positive(obj: Any, *fields: str) -> None:
  for field in fields:
    value = getattr(obj, field)
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, field,
             f"must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
  """How self-attention reads the KV history.

  Attributes:
    mode: "omnimem" (compressed + selected + sliding branches with gates), or a baseline without
      gates: "window" (Self-Forcing: the last `local_attn_frames` frames), "sink_window" (LongLive:
      the first `sink_frames` frames plus the last `local_attn_frames - sink_frames` frames), "dense"
      (all stored history).
    block_h, block_w: KV block shape in tokens of one latent frame (15 x 2 = 30 tokens).
    group_size: consecutive queries (block order) that share one top-k selection; 1 disables
      query sharing. Must divide the block so a group never straddles two blocks.
    top_k: blocks selected per (query group, head).
    window_chunks: chunks covered by the sliding-window branch (current + window_chunks - 1 previous).
    exclude_window_chunks: Adaptive Window Exclusion: at chunk c, candidates are chunks
      0..c - exclude_window_chunks. 0 turns AWE off (candidates 0..c).
    progressive_exclude: while c < exclude_window_chunks, keep all chunks 0..c as candidates instead
      of leaving none (official commit ca257ceb semantics).
    frames_per_chunk: latent frames generated per chunk.
    capacity_chunks: chunk slots of the KV store's full-resolution tier. A rollout longer than this
      reuses the oldest slot (a ring); keep it >= the number of chunks for full-history retrieval.
    pooled_chunks: chunks whose pooled K/V the store keeps (a ring past that), read by the compressed
      branch and the top-k; None: capacity_chunks. At most 1/block_tokens of a chunk's full-resolution
      bytes, so keeping the whole video costs little (`generate.py` does).
    local_attn_frames: frames attended by the "window" / "sink_window" baselines (LongLive's
      `local_attn_size`; it includes the sink frames).
    sink_frames: leading frames always attended in "sink_window" mode (their slots are pinned).
    debug_checks: check block ids against the store size at run time (use with
      `jax.experimental.checkify` under `jax.jit`).
  """

  mode: AttentionMode = "omnimem"
  block_h: int = 15
  block_w: int = 2
  group_size: int = 15
  top_k: int = 16
  window_chunks: int = 3
  exclude_window_chunks: int = 3
  progressive_exclude: bool = True
  frames_per_chunk: int = 3
  capacity_chunks: int = 80
  pooled_chunks: int | None = None
  local_attn_frames: int = 12
  sink_frames: int = 3
  debug_checks: bool = False

  def __post_init__(self) -> None:
    _require(self.mode in ATTENTION_MODES, "mode", f"must be one of {ATTENTION_MODES}, got {self.mode!r}")
    _require_positive(self, "block_h", "block_w", "group_size", "top_k", "window_chunks",
                      "frames_per_chunk", "capacity_chunks", "local_attn_frames")
    _require(isinstance(self.exclude_window_chunks, int) and self.exclude_window_chunks >= 0,
             "exclude_window_chunks", f"must be an integer >= 0 (0 turns AWE off), got {self.exclude_window_chunks!r}")
    _require(isinstance(self.sink_frames, int) and self.sink_frames >= 0, "sink_frames",
             f"must be an integer >= 0, got {self.sink_frames!r}")
    _require(self.block_tokens % self.group_size == 0, "group_size",
             f"must divide the block of block_h * block_w = {self.block_tokens} tokens, got {self.group_size}")
    fpc = self.frames_per_chunk
    _require(self.local_attn_frames % fpc == 0, "local_attn_frames",
             f"must be a multiple of frames_per_chunk={fpc} (the store is chunk-granular), got {self.local_attn_frames}")
    _require(self.sink_frames % fpc == 0, "sink_frames",
             f"must be a multiple of frames_per_chunk={fpc} (the store is chunk-granular), got {self.sink_frames}")
    if self.mode == "sink_window":
      _require(self.local_attn_frames > self.sink_frames, "local_attn_frames",
               f"must exceed sink_frames={self.sink_frames} in sink_window mode (it includes the sink), "
               f"got {self.local_attn_frames}")
    _require(self.capacity_chunks >= self.min_capacity_chunks, "capacity_chunks",
             f"must be >= {self.min_capacity_chunks} in {self.mode} mode so that ring reuse never evicts a chunk "
             f"of the attention window, got {self.capacity_chunks}")
    _require(self.pooled_chunks is None or (isinstance(self.pooled_chunks, int) and not isinstance(
        self.pooled_chunks, bool) and self.pooled_chunks >= self.capacity_chunks), "pooled_chunks",
             f"must be None or an integer >= capacity_chunks={self.capacity_chunks} (the pooled tier covers at least "
             f"the full-resolution one), got {self.pooled_chunks!r}")

  @property
  def block_tokens(self) -> int:
    return self.block_h * self.block_w

  @property
  def pinned_chunks(self) -> int:
    """Leading chunks whose slots are never reused (the sink of "sink_window")."""
    return self.sink_frames // self.frames_per_chunk if self.mode == "sink_window" else 0

  @property
  def recent_chunks(self) -> int:
    """Chunks of the recent dense window, current chunk included (unused in "dense" mode)."""
    if self.mode == "omnimem":
      return self.window_chunks
    if self.mode == "window":
      return self.local_attn_frames // self.frames_per_chunk
    if self.mode == "sink_window":
      return (self.local_attn_frames - self.sink_frames) // self.frames_per_chunk
    return 1

  @property
  def pooled_slots(self) -> int:
    """Chunks of the pooled tier (`pooled_chunks`, default capacity_chunks)."""
    return self.capacity_chunks if self.pooled_chunks is None else self.pooled_chunks

  @property
  def min_capacity_chunks(self) -> int:
    return self.pinned_chunks + self.recent_chunks

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> MemoryConfig:
    """A config from `dataclasses.asdict` output; unknown fields are an error."""
    return cls(**checked_fields(cls, fields))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of the causal Wan DiT and the token geometry of one chunk.

  Defaults are Wan2.1-T2V-1.3B at 480x832 (latent 60x104). `from_preset` gives named presets.
  """

  dim: int = 1536
  ffn_dim: int = 8960
  num_heads: int = 12
  num_layers: int = 30
  in_channels: int = 16
  out_channels: int = 16
  patch_size: tuple[int, int, int] = (1, 2, 2)
  text_dim: int = 4096
  text_len: int = 512
  freq_dim: int = 256
  eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_max_frames: int = 1024
  latent_height: int = 60
  latent_width: int = 104
  vae_temporal_stride: int = 4
  fps: int = 16
  memory: MemoryConfig = MemoryConfig()

  def __post_init__(self) -> None:
    _require_positive(self, "dim", "ffn_dim", "num_heads", "num_layers", "in_channels", "out_channels",
                      "text_dim", "text_len", "freq_dim", "rope_max_frames", "latent_height",
                      "latent_width", "vae_temporal_stride", "fps")
    _require(isinstance(self.memory, MemoryConfig), "memory", "must be a MemoryConfig")
    _require(len(self.patch_size) == 3 and all(isinstance(p, int) and p >= 1 for p in self.patch_size),
             "patch_size", f"must be three positive integers (t, h, w), got {self.patch_size!r}")
    _require(self.patch_size[0] == 1, "patch_size",
             f"temporal patch must be 1 (a chunk is frames_per_chunk latent frames), got {self.patch_size[0]}")
    _require(self.dim % self.num_heads == 0, "num_heads", f"must divide dim={self.dim}, got {self.num_heads}")
    _require(self.head_dim % 2 == 0 and self.head_dim >= 6, "dim",
             f"dim / num_heads (head_dim) must be even and >= 6 for 3-D RoPE, got {self.head_dim}")
    _require(self.latent_height % self.patch_size[1] == 0, "latent_height",
             f"must be a multiple of the patch height {self.patch_size[1]}, got {self.latent_height}")
    _require(self.latent_width % self.patch_size[2] == 0, "latent_width",
             f"must be a multiple of the patch width {self.patch_size[2]}, got {self.latent_width}")
    _require(self.grid_h % self.memory.block_h == 0, "memory.block_h",
             f"must tile the token grid height {self.grid_h} (latent_height / patch), got {self.memory.block_h}")
    _require(self.grid_w % self.memory.block_w == 0, "memory.block_w",
             f"must tile the token grid width {self.grid_w} (latent_width / patch), got {self.memory.block_w}")

  @classmethod
  def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
    """A named preset (`PRESETS`) with fields replaced by `overrides` (validated again)."""
    return build_preset(PRESETS, name, cls.__name__, overrides)

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready fields (the memory config nested), the inverse of `from_dict`."""
    fields = dataclasses.asdict(self)
    fields["patch_size"] = list(self.patch_size)
    return fields

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> ModelConfig:
    """A config from `to_dict` output (e.g. a checkpoint's JSON); unknown fields are an error."""
    fields = checked_fields(cls, fields)
    memory = MemoryConfig.from_dict(fields.pop("memory", {}))
    return cls(**fields, memory=memory)

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def grid_h(self) -> int:
    return self.latent_height // self.patch_size[1]

  @property
  def grid_w(self) -> int:
    return self.latent_width // self.patch_size[2]

  @property
  def tokens_per_frame(self) -> int:
    return self.grid_h * self.grid_w

  @property
  def tokens_per_chunk(self) -> int:
    return self.memory.frames_per_chunk * self.tokens_per_frame

  @property
  def blocks_per_frame(self) -> int:
    return self.tokens_per_frame // self.memory.block_tokens

  @property
  def blocks_per_chunk(self) -> int:
    return self.memory.frames_per_chunk * self.blocks_per_frame

  @property
  def groups_per_chunk(self) -> int:
    return self.tokens_per_chunk // self.memory.group_size

  @property
  def max_video_seconds(self) -> float:
    """Longest video the RoPE table allows: rope_max_frames latent frames, decoded at `fps`."""
    pixel_frames = (self.rope_max_frames - 1) * self.vae_temporal_stride + 1
    return pixel_frames / self.fps

  @property
  def max_chunks(self) -> int:
    """Chunks whose frames all fit in the RoPE table."""
    return self.rope_max_frames // self.memory.frames_per_chunk


PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "wan2.1-t2v-1.3b": ModelConfig,
    # 4 x 8 tokens per frame, 2 x 2 blocks (8 per frame, 24 per chunk), groups of 2 queries.
    "tiny": functools.partial(
        ModelConfig, dim=64, ffn_dim=128, num_heads=4, num_layers=2, in_channels=4, out_channels=4,
        text_dim=32, text_len=8, freq_dim=32, latent_height=8, latent_width=16,
        memory=MemoryConfig(block_h=2, block_w=2, group_size=2, top_k=4, capacity_chunks=8),
    ),
}


def store_bytes(config: ModelConfig, batch_size: int, bytes_per_element: int = 2) -> int:
  """Bytes of a plain KV store (full-resolution K/V plus pooled K/V, all layers)."""
  memory = config.memory
  rows = memory.capacity_chunks * config.tokens_per_chunk + memory.pooled_slots * config.blocks_per_chunk
  return 2 * config.num_layers * batch_size * config.dim * rows * bytes_per_element


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Few-step flow-matching schedule of Self-Forcing / LongLive (docs/architecture.md, 'Sampler').

  Attributes:
    denoising_steps: training-grid steps, each mapped through the shifted grid when `warp` is set
      ([1000, 750, 500, 250] -> t = [1000, 937.5, 833.33, 625]).
    shift: timestep shift of the flow-matching grid (5 for Self-Forcing / LongLive, 8 for CausVid).
    num_train_timesteps: size of the training grid (1000).
    warp: map the steps through the shifted grid (Self-Forcing's `warp_denoising_step`).
    context_timestep: t of the context pass that rewrites the chunk's K/V from its clean latents
      (0: clean; Self-Forcing's `context_noise`).
  """

  denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
  shift: float = 5.0
  num_train_timesteps: int = 1000
  warp: bool = True
  context_timestep: float = 0.0

  def __post_init__(self) -> None:
    _require(len(self.denoising_steps) >= 1 and all(isinstance(s, int) and 0 < s <= self.num_train_timesteps
                                                    for s in self.denoising_steps), "denoising_steps",
             f"must be integers in (0, {self.num_train_timesteps}], got {self.denoising_steps!r}")
    _require(list(self.denoising_steps) == sorted(self.denoising_steps, reverse=True), "denoising_steps",
             f"must decrease (noisiest first), got {self.denoising_steps!r}")
    _require(self.shift > 0, "shift", f"must be > 0, got {self.shift}")
    _require(0 <= self.context_timestep < self.num_train_timesteps, "context_timestep",
             f"must lie in [0, {self.num_train_timesteps}), got {self.context_timestep}")

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> SamplerConfig:
    """A config from `dataclasses.asdict` output (e.g. a run report); unknown fields are an error."""
    return cls(**checked_fields(cls, fields))
