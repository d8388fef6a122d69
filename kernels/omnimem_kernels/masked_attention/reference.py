"""XLA reference of masked attention: `jax.nn.dot_product_attention` with the key mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def key_validity(keys: int, key_mask: Bool[Array, " m"] | None,
                 key_length: Int[Array, ""] | None) -> Bool[Array, " m"] | None:
  """Which of the `keys` keys count, from a mask or a count of leading valid keys (None: all)."""
  if key_length is not None:
    return jnp.arange(keys, dtype=jnp.int32) < key_length
  return key_mask


def masked_attention(q: Float[Array, "b n h d"], keys: Float[Array, "b m h d"], values: Float[Array, "b m h d"],
                     key_mask: Bool[Array, " m"] | None, key_length: Int[Array, ""] | None, *,
                     scale: float) -> Float[Array, "b n h d"]:
  """Softmax attention of every query over the valid keys (see `api.masked_attention`)."""
  mask = key_validity(keys.shape[1], key_mask, key_length)
  return jax.nn.dot_product_attention(q, keys, values, mask=None if mask is None else mask[None, None, None, :],
                                      scale=scale)
