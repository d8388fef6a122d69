"""Wan 3-D rotary position embedding with an absolute frame offset, in block token order.

Wan splits the head_dim / 2 complex pairs of each head into temporal, height and width parts
(22 / 21 / 21 at head_dim 128; in general d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6) features),
each with its own frequency ladder theta ** (-2k / part_width), and rotates interleaved pairs
(x[2i], x[2i+1]). The temporal position is the absolute latent frame, so keys cached after RoPE keep
their place in the video and are never rotated again. The table has `rope_max_frames` temporal rows
(1024 in Wan): later frames are refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from omnimem_jax.config import ModelConfig
from omnimem_jax.model.layout import to_block_order


def rope_split(head_dim: int) -> tuple[int, int, int]:
  """Complex pairs given to the (t, h, w) axes: (22, 21, 21) at head_dim 128."""
  hw = head_dim // 6
  return head_dim // 2 - 2 * hw, hw, hw


def axis_frequencies(pairs: int, theta: float) -> np.ndarray:
  """theta ** (-2k / (2 * pairs)) for k < pairs, float64: the ladder of one axis of width 2 * pairs."""
  return 1.0 / theta ** (np.arange(pairs, dtype=np.float64) * 2.0 / (2 * pairs))


def check_frames(config: ModelConfig, first_frame: int, num_frames: int) -> None:
  """Raises ValueError if latent frames first_frame .. first_frame + num_frames - 1 leave the table."""
  last = first_frame + num_frames - 1
  if first_frame < 0:
    raise ValueError(f"latent frame index must be >= 0, got {first_frame}")
  if last >= config.rope_max_frames:
    raise ValueError(
        f"latent frame {last} is beyond the RoPE table of {config.rope_max_frames} frames: the longest "
        f"supported video is {config.max_video_seconds:.1f} s ({config.rope_max_frames} latent frames, "
        f"{config.max_chunks} chunks, at {config.fps} fps). Generate a shorter video.")


def rope_cos_sin(config: ModelConfig, first_frame: int | Int[Array, ""],
                 num_frames: int | None = None) -> tuple[Float[Array, "n pairs"], Float[Array, "n pairs"]]:
  """cos and sin of the rotation angles of `num_frames` latent frames (default: one chunk), float32.

  Rows follow the block token order of those frames. `first_frame` may be traced (a rollout passes the
  chunk index through `jax.jit`); a concrete value is range-checked here, a traced one must be checked
  by the caller up front (a frame past the table would read NaN).
  """
  num_frames = config.memory.frames_per_chunk if num_frames is None else num_frames
  if not isinstance(first_frame, jax.core.Tracer):
    check_frames(config, int(first_frame), num_frames)
  t_pairs, h_pairs, w_pairs = rope_split(config.head_dim)
  theta = config.rope_theta
  t_angles = np.outer(np.arange(config.rope_max_frames), axis_frequencies(t_pairs, theta))
  h_angles = np.outer(np.arange(config.grid_h), axis_frequencies(h_pairs, theta))
  w_angles = np.outer(np.arange(config.grid_w), axis_frequencies(w_pairs, theta))

  frames = jnp.asarray(first_frame, jnp.int32) + jnp.arange(num_frames, dtype=jnp.int32)
  grid = (num_frames, config.grid_h, config.grid_w)

  def table(fn):
    t = jnp.take(jnp.asarray(fn(t_angles), jnp.float32), frames, axis=0, mode="fill", fill_value=jnp.nan)
    h = jnp.asarray(fn(h_angles), jnp.float32)
    w = jnp.asarray(fn(w_angles), jnp.float32)
    parts = (
        jnp.broadcast_to(t[:, None, None, :], (*grid, t_pairs)),
        jnp.broadcast_to(h[None, :, None, :], (*grid, h_pairs)),
        jnp.broadcast_to(w[None, None, :, :], (*grid, w_pairs)),
    )
    raster = jnp.concatenate(parts, axis=-1).reshape(1, -1, t_pairs + h_pairs + w_pairs)
    return to_block_order(raster, grid, (config.memory.block_h, config.memory.block_w))[0]

  return table(np.cos), table(np.sin)


def apply_rope(x: Float[Array, "b n h d"], cos: Float[Array, "n pairs"],
               sin: Float[Array, "n pairs"]) -> Float[Array, "b n h d"]:
  """Rotates interleaved pairs (x[2i], x[2i+1]) of every head by the given angles, in float32."""
  if x.ndim != 4 or x.shape[-1] != 2 * cos.shape[-1] or x.shape[1] != cos.shape[0]:
    raise ValueError(f"x must be [batch, {cos.shape[0]} tokens, heads, {2 * cos.shape[-1]}], got {x.shape}")
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  real, imag = pairs[..., 0], pairs[..., 1]
  cos, sin = cos[None, :, None, :], sin[None, :, None, :]
  rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)
