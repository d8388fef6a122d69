"""Public entry point of masked attention: one backend per name, the XLA one the reference.

Keys come heads-major (`[b, h, m, d]`, the store's layout) with a mask over their m rows; every
query attends to the valid keys. Backends:
  "xla":    `jax.nn.dot_product_attention` with the mask (any platform; the reference).
  "cudnn":  cuDNN flash attention with `key_value_seq_lengths`: the valid keys must come first
            (callers order slots resident-first).
  "splash": Pallas splash attention (TPU; interpret mode on CPU, which is how CI tests it), the mask
            as key segment ids, so valid keys may lie anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float


def _xla(q, keys, values, key_mask, *, scale):
  keys, values = (x.astype(q.dtype).transpose(0, 2, 1, 3) for x in (keys, values))
  return jax.nn.dot_product_attention(q, keys, values, mask=key_mask[None, None, None, :], scale=scale)


def _cudnn(q, keys, values, key_mask, *, scale):
  keys, values = (x.astype(q.dtype).transpose(0, 2, 1, 3) for x in (keys, values))
  lengths = jnp.full((q.shape[0],), jnp.sum(key_mask, dtype=jnp.int32))
  return jax.nn.dot_product_attention(q, keys, values, scale=scale, key_value_seq_lengths=lengths,
                                      implementation="cudnn")


def _splash(q, keys, values, key_mask, *, scale):
  backend = jax.default_backend()
  if backend not in ("tpu", "cpu"):
    raise ValueError(f"the splash dense attention is a TPU kernel (interpret mode on CPU), not for {backend}; use "
                     "'cudnn' or 'mosaic_gpu' on GPUs")
  from omnimem_kernels.masked_attention import pallas_splash_tpu
  return pallas_splash_tpu.masked_attention(q, keys.astype(q.dtype), values.astype(q.dtype), key_mask, scale=scale,
                                            interpret=backend == "cpu")


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {"xla": _xla, "cudnn": _cudnn, "splash": _splash}


def masked_attention(q: Float[Array, "b n h d"], keys: Float[Array, "b h m d"], values: Float[Array, "b h m d"],
                     key_mask: Bool[Array, " m"], *, implementation: str = "xla",
                     scale: float | None = None) -> Float[Array, "b n h d"]:
  """Softmax attention of every query over the keys where `key_mask` holds (scale default 1/sqrt(d))."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown masked attention implementation {implementation!r}; known: {sorted(IMPLEMENTATIONS)}")
  batch, _, heads, head_dim = q.shape
  if (keys.shape != values.shape or keys.ndim != 4 or (keys.shape[0], keys.shape[1], keys.shape[3]) != (
      batch, heads, head_dim) or key_mask.shape != (keys.shape[2],)):
    raise ValueError(f"keys and values must be [{batch}, {heads}, m, {head_dim}] (batch, heads, head_dim as q) "
                     f"with key_mask [m], got {keys.shape}, {values.shape}, {key_mask.shape}")
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  return IMPLEMENTATIONS[implementation](q, keys, values, key_mask, scale=scale)
