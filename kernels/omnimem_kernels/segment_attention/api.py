"""Public entry point of segment attention, dispatching over backends by preference list.

The keys are `count` segments of `length` rows of a heads-major row source (`[b, h, rows, d]`: the
store's layout, read in place), segment i starting at row `starts[i]`; every query attends densely
to them. The segments must not overlap. This is the dense branches' op: the sliding window is the
recent chunks' slots, the compressed branch the pooled rows of the stored chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from omnimem_kernels import dispatch
from omnimem_kernels.segment_attention import reference


def _xla(q, keys, values, starts, count, length, *, scale):
  return reference.segment_attention(q, keys, values, starts, count, length, scale=scale)


def _mosaic_gpu(q, keys, values, starts, count, length, *, scale):
  if jax.default_backend() != "gpu":
    raise NotImplementedError("pallas mosaic_gpu runs on NVIDIA Hopper GPUs")
  from omnimem_kernels.segment_attention import pallas_mosaic_gpu
  return pallas_mosaic_gpu.segment_attention(q, keys, values, starts, count, length, scale=scale)


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {"xla": _xla, "mosaic_gpu": _mosaic_gpu}

_PREFERENCES: dict[str, tuple[str, ...]] = {"gpu_hopper": ("mosaic_gpu", "xla")}


def default_implementations(platform: str | None = None) -> tuple[str, ...]:
  """Backends tried, in order, on `platform` (default: JAX's; "gpu_hopper" on a Hopper GPU)."""
  return dispatch.preference_list(_PREFERENCES, platform)


def segment_attention(q: Float[Array, "b n h d"], keys: Float[Array, "b h r d"], values: Float[Array, "b h r d"],
                      starts: Int[Array, " segments"], count: int | Int[Array, ""], length: int | Int[Array, ""], *,
                      implementation: str | Sequence[str] | None = None,
                      scale: float | None = None) -> Float[Array, "b n h d"]:
  """Dense attention of the queries over `count` row segments of a heads-major source.

  Args:
    q: queries (tokens-major, as the model holds them).
    keys, values: the row source (a store layer viewed as rows, no copy).
    starts: the first row of each segment; entries past `count` are ignored.
    count: how many segments are used (0: the output is zeros).
    length: the rows of each segment.
    implementation: a backend name or a preference list; default `default_implementations()`.
    scale: softmax scale, default 1 / sqrt(d).
  """
  if q.ndim != 4:
    raise ValueError(f"q must be [batch, tokens, heads, head_dim], got shape {q.shape}")
  batch, _, heads, head_dim = q.shape
  if keys.ndim != 4 or keys.shape != values.shape or (keys.shape[0], keys.shape[1], keys.shape[3]) != (
      batch, heads, head_dim):
    raise ValueError(f"keys and values must both be [{batch}, {heads}, rows, {head_dim}] (batch, heads, rows, "
                     f"head_dim as q), got {keys.shape} and {values.shape}")
  if starts.ndim != 1 or jnp.ndim(count) or jnp.ndim(length):
    raise ValueError(f"starts must be [segments], count and length scalars, got shapes {starts.shape}, "
                     f"{jnp.shape(count)}, {jnp.shape(length)}")
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  names = default_implementations() if implementation is None else (
      (implementation,) if isinstance(implementation, str) else tuple(implementation))
  as_int = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
  return dispatch.dispatch("segment_attention", IMPLEMENTATIONS, names, q, keys, values, as_int(starts),
                           as_int(count), as_int(length), scale=scale)
