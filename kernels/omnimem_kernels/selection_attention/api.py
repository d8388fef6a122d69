"""Public entry point of selection attention, dispatching over backends by preference list.

Backends are tried in order; one that cannot handle the request (wrong platform, shape or dtype)
raises `NotImplementedError` and the next is tried (`omnimem_kernels.dispatch`). Each Pallas backend module
is imported on first use, so a missing or broken backend never stops the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jaxtyping import Array, Float, Int, Shaped

from omnimem_kernels import dispatch, kv_quant
from omnimem_kernels.selection_attention import reference


def _xla(q, k_blocks, v_blocks, ids, *, k_scale, v_scale, scale, interpret):
  del interpret  # nothing to interpret: plain XLA
  return reference.selection_attention(q, k_blocks, v_blocks, ids, scale=scale, k_scale=k_scale, v_scale=v_scale)


def _triton(q, k_blocks, v_blocks, ids, *, k_scale, v_scale, scale, interpret):
  if not interpret and jax.default_backend() != "gpu":
    raise NotImplementedError("pallas triton runs on GPUs (or in interpret mode)")
  from omnimem_kernels.selection_attention import pallas_triton
  return pallas_triton.selection_attention(q, k_blocks, v_blocks, ids, scale=scale, k_scale=k_scale,
                                           v_scale=v_scale, interpret=interpret)


def _mosaic_gpu(q, k_blocks, v_blocks, ids, *, k_scale, v_scale, scale, interpret):
  if k_scale is not None or v_scale is not None:
    raise NotImplementedError("pallas mosaic_gpu reads plain 16-bit blocks, not compact blocks: use triton")
  if interpret:
    raise NotImplementedError("pallas mosaic_gpu has no CPU interpret mode here; its CPU twin is 'triton'")
  if jax.default_backend() != "gpu":
    raise NotImplementedError("pallas mosaic_gpu runs on NVIDIA Hopper GPUs")
  from omnimem_kernels.selection_attention import pallas_mosaic_gpu
  return pallas_mosaic_gpu.selection_attention(q, k_blocks, v_blocks, ids, scale=scale)


def _mosaic_tpu(q, k_blocks, v_blocks, ids, *, k_scale, v_scale, scale, interpret):
  from omnimem_kernels.selection_attention import pallas_mosaic_tpu
  return pallas_mosaic_tpu.selection_attention(q, k_blocks, v_blocks, ids, scale=scale, k_scale=k_scale,
                                               v_scale=v_scale, interpret=interpret)


IMPLEMENTATIONS: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {
    "xla": _xla, "triton": _triton, "mosaic_gpu": _mosaic_gpu, "mosaic_tpu": _mosaic_tpu}

_PREFERENCES: dict[str, tuple[str, ...]] = {
    "gpu_hopper": ("triton", "mosaic_gpu", "xla"),  # Triton measured faster on the H100 (README)
    "gpu": ("triton", "xla"),
    "tpu": ("mosaic_tpu", "xla"),
    "cpu": ("xla",),
}


def default_implementations(platform: str | None = None) -> tuple[str, ...]:
  """Backends tried, in order, on `platform` (default: JAX's default backend; "gpu" on a Hopper GPU
  means "gpu_hopper")."""
  return dispatch.preference_list(_PREFERENCES, platform)


def _check_shapes(q, k_blocks, v_blocks, ids) -> None:
  if q.ndim != 4:
    raise ValueError(f"q must be [batch, heads, tokens, head_dim], got shape {q.shape}")
  if k_blocks.ndim != 5 or v_blocks.shape != k_blocks.shape:
    raise ValueError("k_blocks and v_blocks must both be [batch, heads, num_blocks, block_tokens, head_dim], "
                     f"got {k_blocks.shape} and {v_blocks.shape}")
  if ids.ndim != 4 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"ids must be an integer [batch, heads, groups, top_k] array, got {ids.dtype}{list(ids.shape)}")
  batch, heads, tokens, head_dim = q.shape
  if k_blocks.shape[:2] != (batch, heads) or ids.shape[:2] != (batch, heads):
    raise ValueError(f"batch and head axes must agree: q {q.shape[:2]}, k_blocks {k_blocks.shape[:2]}, "
                     f"ids {ids.shape[:2]}")
  fmt = kv_quant.format_of(k_blocks, head_dim)
  if k_blocks.shape[-1] != kv_quant.stored_head_dim(head_dim, fmt):
    raise ValueError(f"head_dim mismatch: q has {head_dim}, {fmt} k_blocks store "
                     f"{kv_quant.stored_head_dim(head_dim, fmt)} a row, got {k_blocks.shape[-1]}")
  if ids.shape[2] == 0 or tokens % ids.shape[2]:
    raise ValueError(f"the {tokens} query tokens must split evenly into the {ids.shape[2]} groups of ids")


def _check_scales(k_blocks, v_blocks, k_scale, v_scale, head_dim: int) -> None:
  """Compact blocks (fp8, int4) need float32 [batch, heads, num_blocks] scales; plain float blocks none."""
  fmt = kv_quant.format_of(k_blocks, head_dim)
  if kv_quant.format_of(v_blocks, head_dim) != fmt:
    raise ValueError(f"k_blocks and v_blocks must have one format, got {fmt} and "
                     f"{kv_quant.format_of(v_blocks, head_dim)}")
  for name, block_scale in (("k_scale", k_scale), ("v_scale", v_scale)):
    if fmt == "bf16" and block_scale is not None:
      raise ValueError(f"plain {k_blocks.dtype} blocks take no {name}: scales come with fp8 or int4 blocks")
    if fmt != "bf16" and (block_scale is None or block_scale.shape != k_blocks.shape[:3]
                          or block_scale.dtype != jnp.float32):
      got = None if block_scale is None else f"{block_scale.dtype}{list(block_scale.shape)}"
      raise ValueError(f"{fmt} blocks need {name} as float32{list(k_blocks.shape[:3])} (batch, heads, "
                       f"num_blocks), got {got}")


def check_block_ids(ids: Int[Array, "..."], num_blocks: int) -> None:
  """Ids must lie in [-1, num_blocks). Concrete ids raise ValueError here; traced ids add a
  `checkify` check (run the jitted function under `checkify.checkify` to surface it)."""
  if isinstance(ids, jax.core.Tracer):
    bad = (ids < -1) | (ids >= num_blocks)
    checkify.check(~jnp.any(bad), f"block ids must lie in [-1, {num_blocks}); found ids in [{{lo}}, {{hi}}]",
                   lo=jnp.min(ids), hi=jnp.max(ids))
    return
  ids = np.asarray(ids)
  bad = (ids < -1) | (ids >= num_blocks)
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"block ids must lie in [-1, {num_blocks}) (the store's block count); ids{list(where)} = "
                     f"{int(ids[where])}, and {int(bad.sum())} ids are out of range in all")


def selection_attention(q: Float[Array, "b h n d"], k_blocks: Shaped[Array, "b h nblk bt dk"],
                        v_blocks: Shaped[Array, "b h nblk bt dk"], ids: Int[Array, "b h g k"], *,
                        k_scale: Float[Array, "b h nblk"] | None = None,
                        v_scale: Float[Array, "b h nblk"] | None = None,
                        implementation: str | Sequence[str] | None = None, interpret: bool | None = None,
                        scale: float | None = None,
                        check_ids: bool = False) -> tuple[Float[Array, "b h n d"], Float[Array, "b h n"]]:
  """Attention of each group of queries over its own listed KV blocks.

  Args:
    q: queries, the n tokens split into g consecutive groups (g = ids.shape[2]).
    k_blocks, v_blocks: the store viewed as blocks (`[..., slots, tokens, d]` reshaped, no copy): plain
      floats (dk = d), or compact blocks of one `kv_quant` format, uint8: fp8 bytes (dk = d) or packed
      int4 (dk = d / 2).
    ids: per (batch, head, group) the block indices to attend; -1 entries are skipped; a repeated id
      is attended as listed (its keys count twice).
    k_scale, v_scale: the compact blocks' float32 scales (None for plain blocks); the result is that of
      plain blocks `kv_quant.dequantize(blocks, scale, format)`.
    implementation: a backend name or a preference list; default `default_implementations()`.
    interpret: run Pallas backends in interpret mode; default: on CPU.
    scale: softmax scale, default 1 / sqrt(d).
    check_ids: range-check ids (interpret modes and gathers clamp silently).

  Returns:
    (o, lse): outputs in q's dtype, zeros for a group without valid ids; fp32 log-sum-exp of the
    scaled logits, -inf for such a group.
  """
  _check_shapes(q, k_blocks, v_blocks, ids)
  _check_scales(k_blocks, v_blocks, k_scale, v_scale, q.shape[-1])
  if check_ids:
    check_block_ids(ids, k_blocks.shape[2])
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  names = dispatch.resolve(implementation, default_implementations())
  return dispatch.dispatch("selection_attention", IMPLEMENTATIONS, names, q, k_blocks, v_blocks, ids,
                           k_scale=k_scale, v_scale=v_scale, scale=scale, interpret=dispatch.interpret_mode(interpret))
