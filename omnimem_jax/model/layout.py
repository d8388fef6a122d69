"""Token order in which every KV block is contiguous.

Patch tokens arrive in raster order (f, h, w). OmniMem reorders them to (f, H', W', hs, ws), so that
block (H', W') of frame f (block_h rows x block_w columns) occupies block_h * block_w consecutive
positions, and a query group of `group_size` consecutive tokens lies inside one block. The inverse
runs before unpatchify. Both are pure reshapes/transposes; trailing feature axes pass through.
"""

from __future__ import annotations

import jax
from jaxtyping import Array, Shaped


def _check(x: jax.Array, grid: tuple[int, int, int], block: tuple[int, int]) -> None:
  frames, height, width = grid
  block_h, block_w = block
  if x.ndim < 2 or x.shape[1] != frames * height * width:
    raise ValueError(f"expected tokens on axis 1 of length {frames}*{height}*{width}={frames * height * width} "
                     f"(grid {grid}), got shape {x.shape}")
  if height % block_h or width % block_w:
    raise ValueError(f"block {block} does not tile the token grid {height}x{width}")


def _swap_block_axes(x: jax.Array, grid: tuple[int, int, int], middle: tuple[int, int, int, int]) -> jax.Array:
  """Views each frame's tokens as `middle` (4 axes), swaps the inner two, and flattens back."""
  feat = x.shape[2:]
  x = x.reshape(x.shape[0], grid[0], *middle, *feat)
  x = x.transpose(0, 1, 2, 4, 3, 5, *range(6, x.ndim))
  return x.reshape(x.shape[0], grid[0] * grid[1] * grid[2], *feat)


def to_block_order(x: Shaped[Array, "b n *feat"], grid: tuple[int, int, int],
                   block: tuple[int, int]) -> Shaped[Array, "b n *feat"]:
  """Raster (f, h, w) token order -> block order (f, H', W', hs, ws)."""
  _check(x, grid, block)
  (_, height, width), (block_h, block_w) = grid, block
  return _swap_block_axes(x, grid, (height // block_h, block_h, width // block_w, block_w))


def from_block_order(x: Shaped[Array, "b n *feat"], grid: tuple[int, int, int],
                     block: tuple[int, int]) -> Shaped[Array, "b n *feat"]:
  """Block order (f, H', W', hs, ws) -> raster (f, h, w) token order; inverse of `to_block_order`."""
  _check(x, grid, block)
  (_, height, width), (block_h, block_w) = grid, block
  return _swap_block_axes(x, grid, (height // block_h, width // block_w, block_h, block_w))
