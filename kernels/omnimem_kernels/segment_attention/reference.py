"""XLA reference of segment attention: a row mask over the source and masked dense attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def segment_rows(starts: Int[Array, " segments"], count: Int[Array, ""], length: Int[Array, ""],
                 rows: int) -> Bool[Array, " rows"]:
  """Which of a source's `rows` rows lie in the first `count` segments [start, start + length)."""
  row = jnp.arange(rows, dtype=jnp.int32)[None, :]
  used = (jnp.arange(starts.shape[0]) < count)[:, None]
  return jnp.any(used & (row >= starts[:, None]) & (row < starts[:, None] + length), axis=0)


def segment_attention(q: Float[Array, "b n h d"], keys: Float[Array, "b h r d"], values: Float[Array, "b h r d"],
                      starts: Int[Array, " segments"], count: Int[Array, ""], length: Int[Array, ""], *,
                      scale: float) -> Float[Array, "b n h d"]:
  """Softmax attention of every query over the segments' rows; zeros when there are none."""
  mask = segment_rows(starts, count, length, keys.shape[2])
  out = jax.nn.dot_product_attention(q, keys.astype(q.dtype).transpose(0, 2, 1, 3),
                                     values.astype(q.dtype).transpose(0, 2, 1, 3), mask=mask[None, None, None, :],
                                     scale=scale)
  return jnp.where(jnp.any(mask), out, jnp.zeros_like(out))
