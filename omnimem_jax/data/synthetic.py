"""A procedural video world where memory matters: a camera orbiting a random panorama.

Each seed draws a random, smooth `channels x height x world_width` panorama that wraps around
horizontally (a cylinder). The camera shows a `height x width` window of it and pans `speed` columns
per frame, so after `period = world_width / speed` frames it is back where it started and every later
frame repeats, exactly, a frame first shown `period` frames (or a multiple) earlier. With a period
longer than the sliding window, producing a revisited frame needs content that left the window long
ago; the first lap, in contrast, is new content no model can predict (beyond the part of a frame the
previous frames already showed).

Frames are used directly as latents: `[channels, frames, height, width]` float32, about zero mean and
unit variance per channel, shaped like a tiny `ModelConfig`'s latents (4 x 8 x 16 by default).
Channels 0-2 look like a colour picture in `generate.py`'s latent visualisation.

Everything is a pure function of (config, seed): `video(seed, num_frames)` gives any length, any
start (`first_frame`), and `revisit_schedule(num_frames)` says which frame each frame repeats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from omnimem_jax.config import checked_fields


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Geometry of the orbiting-camera world.

  Attributes:
    channels, height, width: the frame (= latent) shape; match the model's in_channels,
      latent_height, latent_width.
    world_width: panorama circumference in columns (the camera's orbit).
    speed: columns the camera pans per frame; must divide world_width.
    smoothness: standard deviation (pixels) of the Gaussian low-pass that makes the texture smooth.
    frames_per_chunk: latent frames per model chunk (for chunk-level schedules).
  """

  channels: int = 4
  height: int = 8
  width: int = 16
  world_width: int = 96
  speed: int = 4
  smoothness: float = 1.0
  frames_per_chunk: int = 3

  def __post_init__(self) -> None:
    for name in ("channels", "height", "width", "world_width", "speed", "frames_per_chunk"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"invalid WorldConfig field '{name}': must be a positive integer, got {value!r}")
    if self.world_width % self.speed:
      raise ValueError(f"invalid WorldConfig field 'speed': must divide world_width={self.world_width}, "
                       f"got {self.speed}")
    if self.world_width < self.width:
      raise ValueError(f"invalid WorldConfig field 'world_width': must be >= the view width {self.width}, "
                       f"got {self.world_width}")
    if not self.smoothness >= 0:
      raise ValueError(f"invalid WorldConfig field 'smoothness': must be >= 0, got {self.smoothness}")

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> WorldConfig:
    """A config from `dataclasses.asdict` output (e.g. a training record); unknown fields are an error."""
    return cls(**checked_fields(cls, fields))

  @property
  def period(self) -> int:
    """Frames per orbit: frame t repeats frame t - period."""
    return self.world_width // self.speed

  @property
  def period_chunks(self) -> float:
    return self.period / self.frames_per_chunk


def panorama(config: WorldConfig, seed: int) -> np.ndarray:
  """The world of `seed`: [channels, height, world_width] float32, smooth, zero mean, unit variance per
  channel; periodic in width (and, for the low-pass, in height)."""
  rng = np.random.default_rng(np.random.SeedSequence([0x0AA1, int(seed)]))
  noise = rng.standard_normal((config.channels, config.height, config.world_width))
  if config.smoothness > 0:
    fy = np.fft.fftfreq(config.height)[:, None]
    fx = np.fft.fftfreq(config.world_width)[None, :]
    gain = np.exp(-2.0 * (np.pi * config.smoothness) ** 2 * (fy ** 2 + fx ** 2))
    noise = np.fft.ifft2(np.fft.fft2(noise, axes=(1, 2)) * gain, axes=(1, 2)).real
  noise -= noise.mean(axis=(1, 2), keepdims=True)
  noise /= noise.std(axis=(1, 2), keepdims=True) + 1e-12
  return noise.astype(np.float32)


def camera_columns(config: WorldConfig, num_frames: int, first_frame: int = 0) -> np.ndarray:
  """Leftmost panorama column the camera shows at each frame ([num_frames] int)."""
  frames = np.arange(first_frame, first_frame + num_frames)
  return (frames * config.speed) % config.world_width


def video(config: WorldConfig, seed: int, num_frames: int, first_frame: int = 0) -> np.ndarray:
  """Frames first_frame .. first_frame + num_frames - 1 of the world `seed`: [channels, num_frames,
  height, width] float32."""
  if num_frames < 1 or first_frame < 0:
    raise ValueError(f"need num_frames >= 1 and first_frame >= 0, got {num_frames} and {first_frame}")
  scene = panorama(config, seed)
  columns = (camera_columns(config, num_frames, first_frame)[:, None] + np.arange(config.width)[None, :])
  columns %= config.world_width
  return np.ascontiguousarray(scene[:, :, columns].transpose(0, 2, 1, 3))  # [C, H, F, W] -> [C, F, H, W]


def batch(config: WorldConfig, seeds: list[int] | np.ndarray, num_frames: int) -> np.ndarray:
  """Videos of several worlds: [len(seeds), channels, num_frames, height, width]."""
  return np.stack([video(config, int(seed), num_frames) for seed in seeds])


def revisit_schedule(config: WorldConfig, num_frames: int) -> np.ndarray:
  """For each frame, the earliest earlier frame showing the identical view, or -1 for a first
  appearance ([num_frames] int). Here: t mod period for t >= period."""
  columns = camera_columns(config, num_frames)
  first: dict[int, int] = {}
  source = np.full(num_frames, -1, np.int64)
  for frame, column in enumerate(columns):
    if int(column) in first:
      source[frame] = first[int(column)]
    else:
      first[int(column)] = frame
  return source


def earlier_visits(config: WorldConfig, num_chunks: int) -> np.ndarray:
  """Which earlier chunks showed the same views: bool [num_chunks, num_chunks], entry (c, c') true when c' < c
  and some frame of chunk c' shows exactly the view of some frame of chunk c (a whole number of orbits
  earlier). With a period of P whole chunks, chunk c's earlier visits are c - P, c - 2P, ..."""
  fpc = config.frames_per_chunk
  gap = np.arange(num_chunks)[:, None] - np.arange(num_chunks)[None, :]  # c - c' in chunks
  offsets = np.arange(-(fpc - 1), fpc)  # frame of c minus frame of c', beyond the chunk gap
  same_view = ((gap[..., None] * fpc + offsets) % config.period == 0).any(axis=-1)  # views repeat every period
  return same_view & (gap > 0)


def revisit_distances(config: WorldConfig, num_frames: int) -> np.ndarray:
  """Frames between each frame and its first appearance (-1 for first appearances)."""
  source = revisit_schedule(config, num_frames)
  return np.where(source >= 0, np.arange(num_frames) - source, -1)
