"""Public entry point of masked attention, dispatching over backends by preference list.

Every query attends to the valid keys: all of them, those where `key_mask` holds, or the first
`key_length` (valid keys first: the form cuDNN takes). Queries, keys and values are tokens-major
(`[b, tokens, heads, d]`, as `jax.nn.dot_product_attention` takes them). Backends:
  "xla":    `jax.nn.dot_product_attention` with the mask (any platform; the reference).
  "cudnn":  cuDNN flash attention (NVIDIA GPUs, 16-bit inputs); a key count, not a mask: it refuses
            `key_mask` (give `key_length`).
  "splash": Pallas splash attention (TPUs; interpret mode on CPU), the mask as key segment ids, so
            valid keys may lie anywhere.
A backend that cannot take the inputs raises `NotImplementedError` and the next one is tried
(`omnimem_kernels.dispatch`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from omnimem_kernels import dispatch, shapes
from omnimem_kernels.masked_attention import reference


def _xla(q, keys, values, key_mask, key_length, *, scale, interpret):
  del interpret  # nothing to interpret: plain XLA
  return reference.masked_attention(q, keys, values, key_mask, key_length, scale=scale)


def _cudnn(q, keys, values, key_mask, key_length, *, scale, interpret):
  if interpret or jax.default_backend() != "gpu":
    raise NotImplementedError("cuDNN attention runs on NVIDIA GPUs")
  if jnp.dtype(q.dtype).itemsize != 2:
    raise NotImplementedError(f"cuDNN flash attention takes 16-bit inputs, got {q.dtype}")
  if key_mask is not None:
    raise NotImplementedError("cuDNN takes a count of leading valid keys, not a mask: give key_length")
  from omnimem_kernels.masked_attention import cudnn
  return cudnn.masked_attention(q, keys, values, key_length, scale=scale)


def _splash(q, keys, values, key_mask, key_length, *, scale, interpret):
  if not interpret and jax.default_backend() != "tpu":
    raise NotImplementedError("pallas splash attention runs on TPUs (or in interpret mode, on CPU)")
  from omnimem_kernels.masked_attention import pallas_splash_tpu
  return pallas_splash_tpu.masked_attention(q, keys, values, reference.key_validity(keys.shape[1], key_mask,
                                                                                      key_length),
                                            scale=scale, interpret=interpret)


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {"xla": _xla, "cudnn": _cudnn, "splash": _splash}

_PREFERENCES: dict[str, tuple[str, ...]] = {
    "gpu_hopper": ("cudnn", "xla"),  # cuDNN refuses float32 inputs and masks: XLA takes those
    "gpu": ("cudnn", "xla"),
}


def default_implementations(platform: str | None = None) -> tuple[str, ...]:
  """Backends tried, in order, on `platform` (default: JAX's; "gpu_hopper" on a Hopper GPU)."""
  return dispatch.preference_list(_PREFERENCES, platform)


def _check_inputs(q, keys, values, key_mask, key_length) -> None:
  shapes.check_queries_and_keys(q, keys, values, heads_major=False)
  if key_mask is not None and key_length is not None:
    raise ValueError("give key_mask or key_length, not both")
  if key_mask is not None and (key_mask.shape != (keys.shape[1],) or key_mask.dtype != jnp.bool_):
    raise ValueError(f"key_mask must be a bool [{keys.shape[1]}] array (one entry per key), got {key_mask.dtype}"
                     f"{list(key_mask.shape)}")
  if key_length is not None and jnp.ndim(key_length):
    raise ValueError(f"key_length must be a scalar, got shape {jnp.shape(key_length)}")
  if key_length is not None and not isinstance(key_length, jax.core.Tracer) and not 0 <= key_length <= keys.shape[1]:
    raise ValueError(f"key_length must lie in [0, {keys.shape[1]}] (the keys given), got {key_length}")


def masked_attention(q: Float[Array, "b n h d"], keys: Float[Array, "b m h d"], values: Float[Array, "b m h d"],
                     key_mask: Bool[Array, " m"] | None = None, *, key_length: int | Int[Array, ""] | None = None,
                     implementation: str | Sequence[str] | None = None, scale: float | None = None,
                     interpret: bool | None = None) -> Float[Array, "b n h d"]:
  """Softmax attention of every query over the valid keys; zeros where no key is valid.

  Args:
    q: queries.
    keys, values: keys and values (cast to q's dtype).
    key_mask: which keys count (None: every key, unless `key_length` is given).
    key_length: the first `key_length` keys count (valid keys first); at most one of the two.
    implementation: a backend name or a preference list; default `default_implementations()`.
    scale: softmax scale, default 1 / sqrt(d).
    interpret: run Pallas backends in interpret mode; default: on CPU.
  """
  _check_inputs(q, keys, values, key_mask, key_length)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  keys, values = keys.astype(q.dtype), values.astype(q.dtype)
  key_length = None if key_length is None else jnp.asarray(key_length, jnp.int32)
  names = dispatch.resolve(implementation, default_implementations())
  out = dispatch.dispatch("masked_attention", IMPLEMENTATIONS, names, q, keys, values, key_mask, key_length,
                          scale=scale, interpret=dispatch.interpret_mode(interpret))
  if key_mask is None and key_length is None:
    return out
  any_key = jnp.any(key_mask) if key_length is None else key_length > 0
  return jnp.where(any_key, out, jnp.zeros_like(out))
