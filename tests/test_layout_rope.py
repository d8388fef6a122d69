"""Block token order and Wan 3-D RoPE against explicit index formulas and a complex128 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimem_jax.config import MemoryConfig, ModelConfig
from omnimem_jax.model import layout, rope


def block_position(f, h, w, grid, block):
  """Where raster token (f, h, w) lands in block order, written out from docs/architecture.md, 'Token layout
  and blocks'."""
  _, height, width = grid
  block_h, block_w = block
  block_index = (h // block_h) * (width // block_w) + (w // block_w)
  return f * height * width + block_index * block_h * block_w + (h % block_h) * block_w + (w % block_w)


@pytest.mark.parametrize("grid, block", [((3, 4, 8), (2, 2)), ((2, 30, 52), (15, 2)), ((1, 6, 6), (3, 1))])
def test_block_order_matches_index_formula_and_inverts(grid, block):
  rng = np.random.default_rng(0)
  frames, height, width = grid
  x = rng.standard_normal((2, frames * height * width, 3)).astype(np.float32)
  y = np.asarray(layout.to_block_order(jnp.asarray(x), grid, block))
  for f in range(frames):
    for h in range(height):
      for w in range(width):
        raster = (f * height + h) * width + w
        np.testing.assert_array_equal(y[:, block_position(f, h, w, grid, block)], x[:, raster])
  np.testing.assert_array_equal(np.asarray(layout.from_block_order(jnp.asarray(y), grid, block)), x)


def test_block_order_rejects_wrong_token_count():
  with pytest.raises(ValueError, match="expected tokens on axis 1 of length 3\\*4\\*8=96"):
    layout.to_block_order(jnp.zeros((1, 95, 2)), (3, 4, 8), (2, 2))


def test_rope_split_matches_wan():
  assert rope.rope_split(128) == (22, 21, 21)
  assert rope.rope_split(16) == (4, 2, 2)


def wan_rope_oracle(x, first_frame, config):
  """Wan's rope_apply in complex128, raster token order: x [b, f*h*w, heads, d]."""
  d = config.head_dim
  t_dim, hw_dim = d - 4 * (d // 6), 2 * (d // 6)
  freqs = [1.0 / config.rope_theta ** (np.arange(0, dim, 2) / dim) for dim in (t_dim, hw_dim, hw_dim)]
  frames = config.memory.frames_per_chunk
  out = np.empty(x.shape, np.float64)
  for f in range(frames):
    for h in range(config.grid_h):
      for w in range(config.grid_w):
        token = (f * config.grid_h + h) * config.grid_w + w
        angles = np.concatenate([(first_frame + f) * freqs[0], h * freqs[1], w * freqs[2]])
        pairs = x[:, token, :, 0::2] + 1j * x[:, token, :, 1::2]
        rotated = pairs * np.exp(1j * angles)
        out[:, token, :, 0::2], out[:, token, :, 1::2] = rotated.real, rotated.imag
  return out


@pytest.mark.parametrize("heads, head_dim, first_frame", [(4, 16, 0), (12, 128, 6), (2, 128, 1020)])
def test_rope_matches_wan_complex_formula_in_block_order(heads, head_dim, first_frame):
  config = ModelConfig(dim=heads * head_dim, num_heads=heads, latent_height=8, latent_width=12,
                       memory=MemoryConfig(block_h=2, block_w=3, group_size=3))
  rng = np.random.default_rng(first_frame)
  x = rng.standard_normal((2, config.tokens_per_chunk, heads, head_dim)).astype(np.float32)
  expected = wan_rope_oracle(x.astype(np.float64), first_frame, config)
  grid = (config.memory.frames_per_chunk, config.grid_h, config.grid_w)
  block = (config.memory.block_h, config.memory.block_w)
  cos, sin = rope.rope_cos_sin(config, first_frame)
  got = rope.apply_rope(layout.to_block_order(jnp.asarray(x), grid, block), cos, sin)
  expected_block_order = np.asarray(layout.to_block_order(jnp.asarray(expected), grid, block))
  np.testing.assert_allclose(np.asarray(got), expected_block_order, rtol=2e-5, atol=2e-5)


def test_rope_refuses_frames_past_the_table_with_video_length():
  config = ModelConfig.from_preset("tiny")
  rope.rope_cos_sin(config, 1021)  # frames 1021..1023: the last chunk that fits
  with pytest.raises(ValueError, match=r"latent frame 1024 is beyond the RoPE table of 1024 frames: the longest "
                                       r"supported video is 255\.8 s"):
    rope.rope_cos_sin(config, 1022)
  with pytest.raises(ValueError, match="must be >= 0"):
    rope.rope_cos_sin(config, -3)


def test_rope_traced_frame_past_the_table_is_nan_not_clamped():
  config = ModelConfig.from_preset("tiny")
  cos, _ = jax.jit(lambda frame: rope.rope_cos_sin(config, frame))(jnp.int32(1022))
  frames = np.asarray(cos).reshape(3, -1, cos.shape[-1])
  assert np.isfinite(frames[:2]).all() and np.isnan(frames[2, :, :4]).all()


def test_apply_rope_rejects_mismatched_shapes():
  config = ModelConfig.from_preset("tiny")
  cos, sin = rope.rope_cos_sin(config, 0)
  with pytest.raises(ValueError, match="x must be"):
    rope.apply_rope(jnp.ones((1, 95, 4, 16)), cos, sin)
