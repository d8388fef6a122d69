"""XLA reference of the selection branch: gather each (group, head)'s blocks, dense f32 softmax.

It materialises the gathered keys ([b, h, g, k, block, d]); the Pallas backends must not, and are
tested against this.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Shaped

from omnimem_kernels import kv_quant


def _listed_values(blocks: Shaped[Array, "b h nblk bt dk"], block_scale: Float[Array, "b h nblk"] | None,
                   index: Int[Array, "b h g k"], fmt: str) -> Float[Array, "b h g k bt d"]:
  """The listed blocks (index >= 0) as float32 values: plain blocks cast, compact ones dequantised."""
  gather = jax.vmap(jax.vmap(lambda x, idx: x[idx]))  # over batch, heads
  scales = None if block_scale is None else gather(block_scale, index)
  return kv_quant.dequantize(gather(blocks, index), scales, fmt)


def selection_attention(q: Float[Array, "b h n d"], k_blocks: Shaped[Array, "b h nblk bt dk"],
                        v_blocks: Shaped[Array, "b h nblk bt dk"], ids: Int[Array, "b h g k"], *, scale: float,
                        k_scale: Float[Array, "b h nblk"] | None = None, v_scale: Float[Array, "b h nblk"] | None = None
                        ) -> tuple[Float[Array, "b h n d"], Float[Array, "b h n"]]:
  """Softmax attention of each group's queries over the listed blocks; -1 ids are skipped. Compact
  blocks (`kv_quant` formats, with their scales) are dequantised after the gather."""
  batch, heads, tokens, head_dim = q.shape
  groups = ids.shape[2]
  valid = ids >= 0
  fmt = kv_quant.format_of(k_blocks, head_dim)
  k_sel = _listed_values(k_blocks, k_scale, jnp.where(valid, ids, 0), fmt)  # [b, h, g, k, bt, d]
  v_sel = _listed_values(v_blocks, v_scale, jnp.where(valid, ids, 0), fmt)
  q_groups = q.astype(jnp.float32).reshape(batch, heads, groups, tokens // groups, head_dim)

  logits = jnp.einsum("bhgqd,bhgktd->bhgqkt", q_groups, k_sel, precision=jax.lax.Precision.HIGHEST) * scale
  logits = jnp.where(valid[:, :, :, None, :, None], logits, -jnp.inf)
  row_max = jnp.max(logits, axis=(4, 5), keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  probs = jnp.exp(logits - row_max)
  denom = jnp.sum(probs, axis=(4, 5))  # [b, h, g, q]; 0 when the group has no valid id
  out = jnp.einsum("bhgqkt,bhgktd->bhgqd", probs, v_sel, precision=jax.lax.Precision.HIGHEST)
  out = jnp.where(denom[..., None] > 0, out / jnp.where(denom > 0, denom, 1.0)[..., None], 0.0)
  lse = jnp.where(denom > 0, jnp.log(jnp.where(denom > 0, denom, 1.0)) + row_max[..., 0, 0], -jnp.inf)
  return out.reshape(q.shape).astype(q.dtype), lse.reshape(batch, heads, tokens)
