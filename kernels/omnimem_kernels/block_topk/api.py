"""Public entry point of the block top-k, dispatching over backends by preference list.

Given the group-mean queries and the pooled keys of every stored block, each (batch, head, group)
keeps the ids of its top_k candidate blocks by `qbar . kbar / divisor`: best first, ties to the
lower id, -1 where fewer candidates exist. Backends:
  "xla":    every score, then `lax.top_k` (any platform; the reference).
  "triton": two Pallas Triton kernels, a parallel scoring pass and a select pass that reads back
            only the tiles that can hold a winner (GPUs; interpret mode on CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from omnimem_kernels import dispatch
from omnimem_kernels.block_topk import reference


def _xla(qbar, k_pooled, candidates, *, top_k, divisor, interpret):
  del interpret  # nothing to interpret: plain XLA
  return reference.block_top_k(qbar, k_pooled, candidates, top_k=top_k, divisor=divisor)


def _triton(qbar, k_pooled, candidates, *, top_k, divisor, interpret):
  if not interpret and jax.default_backend() != "gpu":
    raise NotImplementedError("pallas triton runs on GPUs (or in interpret mode)")
  from omnimem_kernels.block_topk import pallas_triton
  return pallas_triton.block_top_k(qbar, k_pooled, candidates, top_k=top_k, divisor=divisor, interpret=interpret)


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {"xla": _xla, "triton": _triton}

_PREFERENCES: dict[str, tuple[str, ...]] = {
    "gpu_hopper": ("triton", "xla"),  # lax.top_k sorts every row: 2.75 ms at 80 chunks on an H100, Triton 0.22
    "gpu": ("triton", "xla"),
}


def default_implementations(platform: str | None = None) -> tuple[str, ...]:
  """Backends tried, in order, on `platform` (default: JAX's; "gpu_hopper" on a Hopper GPU)."""
  return dispatch.preference_list(_PREFERENCES, platform)


def block_top_k(qbar: Float[Array, "b h g d"], k_pooled: Float[Array, "b h nblk d"], candidates: Bool[Array, " nblk"],
                *, top_k: int, divisor: float, implementation: str | Sequence[str] | None = None,
                interpret: bool | None = None) -> Int[Array, "b h g k"]:
  """Top-k block ids per (batch, head, group) among the candidates, int32, -1 padded.

  Args:
    qbar: the group-mean queries (float32).
    k_pooled: the pooled key of every block (the store's pooled keys, any float dtype).
    candidates: which blocks may be selected (shared by every head and group).
    top_k: ids kept per row.
    divisor: scores are `qbar . kbar / divisor` (sqrt(head_dim) for the model).
    implementation: a backend name or a preference list; default `default_implementations()`.
    interpret: run Pallas backends in interpret mode; default: on CPU.

  The ids are integers and carry no gradient, so `qbar` and `k_pooled` enter through
  `lax.stop_gradient`: every backend, the Pallas ones (which have no JVP rule) included, can sit inside a
  differentiated function, whose gradient flows through what it computes from the ids instead.
  """
  if qbar.ndim != 4 or k_pooled.ndim != 4 or qbar.shape[:2] != k_pooled.shape[:2] or qbar.shape[3] != k_pooled.shape[3]:
    raise ValueError(f"qbar must be [batch, heads, groups, d] and k_pooled [batch, heads, blocks, d] with the same "
                     f"batch, heads and d, got {qbar.shape} and {k_pooled.shape}")
  if candidates.shape != (k_pooled.shape[2],) or candidates.dtype != jnp.bool_:
    raise ValueError(f"candidates must be a bool [{k_pooled.shape[2]}] array, got {candidates.dtype}"
                     f"{list(candidates.shape)}")
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")
  names = dispatch.resolve(implementation, default_implementations())
  qbar, k_pooled = jax.lax.stop_gradient((qbar, k_pooled))
  return dispatch.dispatch("block_topk", IMPLEMENTATIONS, names, qbar, k_pooled, candidates, top_k=top_k,
                           divisor=divisor, interpret=dispatch.interpret_mode(interpret))
