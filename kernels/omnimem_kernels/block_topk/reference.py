"""XLA reference of the block top-k: every score, then `lax.top_k` (which sorts every row)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def block_scores(qbar: Float[Array, "b h g d"], k_pooled: Float[Array, "b h nblk d"],
                 divisor: float) -> Float[Array, "b h g nblk"]:
  """qbar . kbar / divisor of every (group, head) for every block, float32."""
  scores = jnp.einsum("bhgd,bhjd->bhgj", qbar.astype(jnp.float32), k_pooled.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  return scores / divisor


def block_top_k(qbar: Float[Array, "b h g d"], k_pooled: Float[Array, "b h nblk d"], candidates: Bool[Array, " nblk"],
                *, top_k: int, divisor: float) -> Int[Array, "b h g k"]:
  """Ids of the top_k candidate blocks per (batch, head, group), best first, ties to the lower id;
  -1 where fewer candidates exist."""
  kept = min(top_k, k_pooled.shape[2])
  scores = jnp.where(candidates, block_scores(qbar, k_pooled, divisor), -jnp.inf)
  _, ids = jax.lax.top_k(scores, kept)
  ids = jnp.where(candidates[ids], ids, -1).astype(jnp.int32)
  if kept < top_k:
    ids = jnp.concatenate([ids, jnp.full((*ids.shape[:-1], top_k - kept), -1, jnp.int32)], axis=-1)
  return ids
