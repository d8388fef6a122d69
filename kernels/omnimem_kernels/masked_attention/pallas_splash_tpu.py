"""Masked attention through Pallas splash attention (TPU), the key mask as segment ids.

Splash takes heads-major `[h, n, d]` inputs per batch entry: the queries are scaled and transposed
once, and so are the keys and values (where they were gathered from a heads-major store, XLA folds
the two transposes away). Sequences are padded to whole blocks: padded keys get segment id 0 (never
attended), padded queries are dropped. Splash's static mask is full; the dynamic validity of each
key travels as its segment id (valid keys 1, queries 1), so valid keys may lie anywhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
  splash_attention_kernel as splash,
)
from jax.experimental.pallas.ops.tpu.splash_attention import (
  splash_attention_mask as splash_mask,
)
from jaxtyping import Array, Bool, Float

LANES = 128  # TPU lane width: block sizes are multiples of it


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _pad_rows(x: jax.Array, rows: int, axis: int) -> jax.Array:
  padding = [(0, 0)] * x.ndim
  padding[axis] = (0, rows - x.shape[axis])
  return jnp.pad(x, padding)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_kv", "interpret"))
def masked_attention(q: Float[Array, "b n h d"], keys: Float[Array, "b m h d"], values: Float[Array, "b m h d"],
                     key_mask: Bool[Array, " m"] | None, *, scale: float, block_q: int = 512, block_kv: int = 512,
                     interpret: bool = False) -> Float[Array, "b n h d"]:
  """Softmax attention of every query over the keys where `key_mask` holds (None: every key; see
  `api.masked_attention`). Rows with no valid key are left to the caller.

  `block_q` / `block_kv` are capped at the padded sequence lengths (multiples of 128).
  """
  _, tokens, heads, _ = q.shape
  rows = keys.shape[1]
  key_mask = jnp.ones((rows,), jnp.bool_) if key_mask is None else key_mask
  block_q = min(block_q, _round_up(tokens, LANES))
  block_kv = min(block_kv, _round_up(rows, LANES))
  padded_tokens, padded_rows = _round_up(tokens, block_q), _round_up(rows, block_kv)
  queries = _pad_rows((q.astype(jnp.float32) * scale).astype(q.dtype).transpose(0, 2, 1, 3), padded_tokens, 2)
  keys, values = (_pad_rows(x.transpose(0, 2, 1, 3), padded_rows, 2) for x in (keys, values))
  segment_ids = splash.SegmentIds(q=jnp.ones((padded_tokens,), jnp.int32),
                                  kv=_pad_rows(key_mask.astype(jnp.int32), padded_rows, 0))
  mask = splash_mask.MultiHeadMask([splash_mask.FullMask((padded_tokens, padded_rows))] * heads)
  kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret,
                                  block_sizes=splash.BlockSizes(block_q=block_q, block_kv=block_kv,
                                                                block_kv_compute=block_kv))
  out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(queries, keys, values, segment_ids)  # [b, h, n, d]
  return out[:, :, :tokens].transpose(0, 2, 1, 3)
