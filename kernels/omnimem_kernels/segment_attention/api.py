"""Public entry point of segment attention, dispatching over backends by preference list.

The keys are `count` segments of `length` rows of a heads-major row source (`[b, h, rows, d]`: the
store's layout, read in place), segment i starting at row `starts[i]`; every query attends densely
to them (rows of overlapping segments count once per segment). This is the dense branches' op: the
sliding window is the recent chunks' slots, the compressed branch the pooled rows of the stored
chunks. Backends:
  "mosaic_gpu": a Pallas Mosaic GPU kernel reading the segments in place (Hopper, 16-bit inputs,
                shapes its TMA tiles can view).
  "cudnn":      the segments' rows gathered (`reference.gather_segments`), then cuDNN flash
                attention (NVIDIA GPUs, 16-bit inputs).
  "splash":     the gathered rows through Pallas splash attention (TPUs; interpret mode on CPU).
  "xla":        the gathered rows through XLA attention (any platform; the reference).
A backend that cannot take the inputs raises `NotImplementedError` and the next one is tried
(`omnimem_kernels.dispatch`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from omnimem_kernels import dispatch, shapes
from omnimem_kernels.segment_attention import reference


def _gathered(masked_implementation: str) -> Callable[..., jax.Array]:
  """The gather-based backend running masked attention's `masked_implementation` backend."""
  return functools.partial(reference.segment_attention, implementation=masked_implementation)


def _mosaic_gpu(q, keys, values, starts, count, length, *, max_rows, scale, interpret):
  del max_rows  # the kernel reads the segments in place
  if interpret or dispatch.platform_name() != "gpu_hopper":
    raise NotImplementedError("pallas mosaic_gpu segment attention runs on NVIDIA Hopper GPUs (no interpret mode)")
  from omnimem_kernels.segment_attention import pallas_mosaic_gpu
  return pallas_mosaic_gpu.segment_attention(q, keys, values, starts, count, length, scale=scale)


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "xla": _gathered("xla"), "cudnn": _gathered("cudnn"), "splash": _gathered("splash"), "mosaic_gpu": _mosaic_gpu}

_PREFERENCES: dict[str, tuple[str, ...]] = {
    "gpu_hopper": ("mosaic_gpu", "cudnn", "xla"),  # float32 inputs, or shapes the kernel refuses: cuDNN, XLA
    "gpu": ("cudnn", "xla"),
    "tpu": ("splash", "xla"),
    "cpu": ("xla",),
}


def default_implementations(platform: str | None = None) -> tuple[str, ...]:
  """Backends tried, in order, on `platform` (default: JAX's; "gpu_hopper" on a Hopper GPU)."""
  return dispatch.preference_list(_PREFERENCES, platform)


def _check_inputs(q, keys, values, starts, count, length, max_rows) -> None:
  shapes.check_queries_and_keys(q, keys, values, heads_major=True)
  if starts.ndim != 1 or not starts.shape[0] or jnp.ndim(count) or jnp.ndim(length):
    raise ValueError(f"starts must be [segments] (at least one entry), count and length scalars, got shapes "
                     f"{starts.shape}, {jnp.shape(count)}, {jnp.shape(length)}")
  if max_rows < 1:
    raise ValueError(f"max_rows must be >= 1, got {max_rows}")
  if isinstance(count, jax.core.Tracer) or isinstance(length, jax.core.Tracer):
    return
  if not 0 <= count <= starts.shape[0]:
    raise ValueError(f"count must lie in [0, {starts.shape[0]}] (the segments listed), got {count}")
  if count * length > max_rows:
    raise ValueError(f"{count} segments of {length} rows exceed max_rows = {max_rows}")


def segment_attention(q: Float[Array, "b n h d"], keys: Float[Array, "b h r d"], values: Float[Array, "b h r d"],
                      starts: Int[Array, " segments"], count: int | Int[Array, ""], length: int | Int[Array, ""], *,
                      max_rows: int | None = None, implementation: str | Sequence[str] | None = None,
                      scale: float | None = None, interpret: bool | None = None) -> Float[Array, "b n h d"]:
  """Dense attention of the queries over `count` row segments of a heads-major source.

  Args:
    q: queries (tokens-major, as the model holds them).
    keys, values: the row source (a store viewed as rows, no copy; cast to q's dtype where gathered).
    starts: the first row of each segment; entries past `count` are ignored (any value).
    count: how many segments are used (0: the output is zeros).
    length: the rows of each segment.
    max_rows: a static bound on count * length, the rows the gather-based backends gather
      (default: the source's rows).
    implementation: a backend name or a preference list; default `default_implementations()`.
    scale: softmax scale, default 1 / sqrt(d).
    interpret: run Pallas backends in interpret mode; default: on CPU.
  """
  max_rows = keys.shape[2] if max_rows is None else max_rows
  _check_inputs(q, keys, values, starts, count, length, max_rows)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  as_int = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
  names = dispatch.resolve(implementation, default_implementations())
  return dispatch.dispatch("segment_attention", IMPLEMENTATIONS, names, q, keys, values, as_int(starts), as_int(count),
                           as_int(length), max_rows=max_rows, scale=scale, interpret=dispatch.interpret_mode(interpret))
