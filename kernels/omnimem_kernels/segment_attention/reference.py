"""The gather-based segment attention: the segments' rows gathered in place, then masked attention.

Row r < max_rows of the gathered keys is row r % length of segment r // length (the source's row
starts[r // length] + r % length); the first count * length rows are valid, so the valid rows come
first (the form cuDNN's key count needs) and no mask array is built. The gather reads only those
rows of the source (a stacked store is not copied per layer). With masked attention's XLA backend
this is the reference; its "cudnn" and "splash" backends make the op's backends of those names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from omnimem_kernels.masked_attention import api as masked_api


def segment_rows(starts: Int[Array, " segments"], count: Int[Array, ""], length: Int[Array, ""],
                 max_rows: int) -> tuple[Int[Array, " max_rows"], Int[Array, ""]]:
  """The source row of each of `max_rows` gathered rows, and how many lead as valid (min(count *
  length, max_rows)); the rest point at row 0 and are masked."""
  row = jnp.arange(max_rows, dtype=jnp.int32)
  per_segment = jnp.maximum(length, 1)
  segment = jnp.minimum(row // per_segment, starts.shape[0] - 1)
  valid = jnp.minimum(jnp.clip(count, 0, starts.shape[0]) * jnp.maximum(length, 0), max_rows)
  return jnp.where(row < valid, starts[segment] + row % per_segment, 0), valid


def gather_segments(keys: Float[Array, "b h r d"], values: Float[Array, "b h r d"], starts: Int[Array, " segments"],
                    count: Int[Array, ""], length: Int[Array, ""], max_rows: int
                    ) -> tuple[Float[Array, "b m h d"], Float[Array, "b m h d"], Int[Array, ""]]:
  """The segments' keys and values, tokens-major [b, max_rows, h, d] (XLA fuses the transpose into
  the gather), and the count of leading valid rows."""
  rows, valid = segment_rows(starts, count, length, max_rows)
  gather = lambda x: jnp.take(x, rows, axis=2, mode="clip").transpose(0, 2, 1, 3)  # noqa: E731
  return gather(keys), gather(values), valid


def segment_attention(q: Float[Array, "b n h d"], keys: Float[Array, "b h r d"], values: Float[Array, "b h r d"],
                      starts: Int[Array, " segments"], count: Int[Array, ""], length: Int[Array, ""], *,
                      max_rows: int, scale: float, implementation: str = "xla",
                      interpret: bool = False) -> Float[Array, "b n h d"]:
  """Softmax attention of every query over the segments' rows (zeros when there are none), through
  masked attention's `implementation` backend."""
  keys, values, valid = gather_segments(keys, values, starts, count, length, max_rows)
  return masked_api.masked_attention(q, keys, values, key_length=valid, implementation=implementation, scale=scale,
                                     interpret=interpret)
