"""Input checks the dense attention ops share (one-line ValueErrors naming the expected shapes)."""

from __future__ import annotations

import jax


def check_queries_and_keys(q: jax.Array, keys: jax.Array, values: jax.Array, *, heads_major: bool) -> None:
  """q must be [batch, tokens, heads, d]; keys and values one shape with q's batch, heads and d:
  heads-major [batch, heads, rows, d] (a store's layout) or tokens-major [batch, rows, heads, d]."""
  if q.ndim != 4:
    raise ValueError(f"q must be [batch, tokens, heads, head_dim], got shape {q.shape}")
  batch, _, heads, head_dim = q.shape
  heads_axis = 1 if heads_major else 2
  if keys.ndim != 4 or keys.shape != values.shape or (keys.shape[0], keys.shape[heads_axis], keys.shape[3]) != (
      batch, heads, head_dim):
    layout = f"{heads}, rows" if heads_major else f"rows, {heads}"
    raise ValueError(f"keys and values must both be [{batch}, {layout}, {head_dim}] (batch, heads, head_dim as q), "
                     f"got {keys.shape} and {values.shape}")
