"""Query-shared block scoring, Adaptive Window Exclusion and a static-shape top-k.

Per head and per group of `group_size` consecutive queries, the group-mean query scores every pooled
key (fp32, no softmax, no sum over heads); the candidates of chunk c are the stored blocks of chunks
0..c - exclude_window_chunks (all of 0..c while c < exclude_window_chunks with progressive
exclusion), and the top_k of them become slot-major block ids, -1 where fewer candidates exist.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from omnimem_jax.config import ModelConfig
from omnimem_jax.memory.store import holds_chunks_through


def group_mean_queries(q: Float[Array, "b h n d"], group_size: int) -> Float[Array, "b h g d"]:
  """Mean of each group of `group_size` consecutive queries, in float32."""
  batch, heads, tokens, head_dim = q.shape
  return q.astype(jnp.float32).reshape(batch, heads, tokens // group_size, group_size, head_dim).mean(axis=3)


def block_scores(q: Float[Array, "b h n d"], k_pooled: Float[Array, "b h blocks d"],
                 group_size: int) -> Float[Array, "b h g blocks"]:
  """Query-shared logits qbar . kbar / sqrt(d) of every (group, head) for every stored block, fp32."""
  group_queries = group_mean_queries(q, group_size)
  scores = jnp.einsum("bhgd,bhjd->bhgj", group_queries, k_pooled.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  return scores / jnp.sqrt(jnp.float32(q.shape[-1]))


def candidate_blocks(slot_chunk: Int[Array, " slots"], chunk_index: int | Int[Array, ""],
                     config: ModelConfig) -> Bool[Array, " blocks"]:
  """Which slot-major blocks chunk c may select (Adaptive Window Exclusion, ca257ceb semantics)."""
  memory = config.memory
  chunk_index = jnp.asarray(chunk_index, jnp.int32)
  last = chunk_index - memory.exclude_window_chunks
  if memory.progressive_exclude:
    last = jnp.where(chunk_index < memory.exclude_window_chunks, chunk_index, last)
  slot_ok = holds_chunks_through(slot_chunk, last)
  return jnp.repeat(slot_ok, config.blocks_per_chunk, total_repeat_length=slot_chunk.shape[0] * config.blocks_per_chunk)


def default_topk_implementation() -> str:
  """The Pallas Triton scoring + top-k kernels on GPUs (XLA's top_k sorts every row), else XLA."""
  return "triton" if jax.default_backend() == "gpu" else "xla"


def select_blocks(q: Float[Array, "b h n d"], k_pooled: Float[Array, "b h blocks d"],
                  slot_chunk: Int[Array, " slots"], chunk_index: int | Int[Array, ""],
                  config: ModelConfig, *, implementation: str | None = None,
                  interpret: bool = False) -> Int[Array, "b h g k"]:
  """Top-k slot-major block ids per (group, head), best first; ties go to the lower id; -1 pads.

  `slot_chunk` must already record chunk c in its slot (see `store.assign_slot`).
  `implementation`: "xla" (scores, then `lax.top_k`) or "triton" (the Pallas Triton kernels of
  `kernels.block_topk`, falling back to XLA for shapes it refuses); default per platform.
  `interpret` runs the kernel in interpret mode (CPU tests).
  """
  memory = config.memory
  candidates = candidate_blocks(slot_chunk, chunk_index, config)
  implementation = default_topk_implementation() if implementation is None else implementation
  if implementation == "triton":
    from kernels.block_topk import pallas_triton
    try:
      return pallas_triton.block_top_k(group_mean_queries(q, memory.group_size), k_pooled, candidates,
                                       top_k=memory.top_k, divisor=float(np.sqrt(np.float32(q.shape[-1]))),
                                       interpret=interpret)
    except NotImplementedError:
      pass
  elif implementation != "xla":
    raise ValueError(f"unknown top-k implementation {implementation!r}; known: ('xla', 'triton')")
  top_k = min(memory.top_k, k_pooled.shape[2])
  scores = block_scores(q, k_pooled, memory.group_size)
  scores = jnp.where(candidates, scores, -jnp.inf)
  _, ids = jax.lax.top_k(scores, top_k)
  ids = jnp.where(candidates[ids], ids, -1).astype(jnp.int32)
  if top_k < memory.top_k:
    pad = jnp.full((*ids.shape[:-1], memory.top_k - top_k), -1, jnp.int32)
    ids = jnp.concatenate([ids, pad], axis=-1)
  return ids


def retrieval_distances(ids: Int[Array, "b h g k"], slot_chunk: Int[Array, " slots"],
                        chunk_index: int | Int[Array, ""], config: ModelConfig) -> Int[Array, "b h g k"]:
  """How many chunks back each selected block lies (c minus its chunk); -1 for padding ids."""
  owner = slot_chunk[jnp.maximum(ids, 0) // config.blocks_per_chunk]
  return jnp.where(ids >= 0, jnp.asarray(chunk_index, jnp.int32) - owner, -1)


def retrieval_histogram(distances: Int[Array, "*any"], max_distance: int) -> Int[Array, " bins"]:
  """Counts of selected blocks by distance 0..max_distance (the last bin holds everything farther)."""
  valid = distances >= 0
  bins = jnp.where(valid, jnp.minimum(distances, max_distance), 0)
  return jnp.zeros(max_distance + 1, jnp.int32).at[bins.ravel()].add(valid.ravel().astype(jnp.int32))
