"""Masked attention through cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`).

cuDNN takes a key count per batch entry (`key_value_seq_lengths`), not a mask: it serves attention
over all keys or over the first `key_length` keys (callers put the valid keys first). It runs on
NVIDIA GPUs for 16-bit inputs only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def masked_attention(q: Float[Array, "b n h d"], keys: Float[Array, "b m h d"], values: Float[Array, "b m h d"],
                     key_length: Int[Array, ""] | None, *, scale: float) -> Float[Array, "b n h d"]:
  """Softmax attention of every query over the first `key_length` keys (None: all of them)."""
  lengths = None if key_length is None else jnp.full((q.shape[0],), key_length, jnp.int32)
  return jax.nn.dot_product_attention(q, keys, values, scale=scale, key_value_seq_lengths=lengths,
                                      implementation="cudnn")
