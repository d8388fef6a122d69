"""Query-shared block scoring, Adaptive Window Exclusion and a static-shape top-k.

Per head and per group of `group_size` consecutive queries, the group-mean query scores every pooled
key (fp32, no softmax, no sum over heads); the candidates of chunk c are the blocks of chunks
0..c - exclude_window_chunks (all of 0..c while c < exclude_window_chunks with progressive
exclusion) whose full-resolution K/V is still stored, and the top_k of them become pooled block ids,
-1 where fewer candidates exist (docs/architecture.md, 'Selection and Adaptive Window Exclusion').
This module holds the model's side (group means, candidates, id mapping, retrieval statistics); the
scoring and the top-k are the `omnimem_kernels.block_topk` op, which picks its backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from omnimem_kernels import block_topk
from omnimem_kernels.block_topk import reference as block_topk_reference
from omnimem_jax.config import ModelConfig
from omnimem_jax.memory.store import SlotTables, resident, slot_of_chunk


def group_mean_queries(q: Float[Array, "b h n d"], group_size: int) -> Float[Array, "b h g d"]:
  """Mean of each group of `group_size` consecutive queries, in float32."""
  batch, heads, tokens, head_dim = q.shape
  return q.astype(jnp.float32).reshape(batch, heads, tokens // group_size, group_size, head_dim).mean(axis=3)


def block_scores(q: Float[Array, "b h n d"], k_pooled: Float[Array, "b h blocks d"],
                 group_size: int) -> Float[Array, "b h g blocks"]:
  """Query-shared logits qbar . kbar / sqrt(d) of every (group, head) for every stored block, fp32
  (the scores `select_blocks` ranks, all of them: for diagnostics and tests)."""
  return block_topk_reference.block_scores(group_mean_queries(q, group_size), k_pooled, score_divisor(q.shape[-1]))


def score_divisor(head_dim: int) -> float:
  """sqrt(head_dim) as the float32 value both top-k backends divide by."""
  return float(np.sqrt(np.float32(head_dim)))


def candidate_blocks(tables: SlotTables, chunk_index: int | Int[Array, ""], config: ModelConfig, *,
                     resident_only: bool = True) -> Bool[Array, " blocks"]:
  """Which pooled blocks chunk c may select (Adaptive Window Exclusion, ca257ceb semantics): those of
  chunks 0..last in the pooled tier and, with `resident_only` (the model's rule), still stored at full
  resolution; without it, evicted chunks count too (to measure what eviction costs)."""
  memory = config.memory
  chunk_index = jnp.asarray(chunk_index, jnp.int32)
  last = chunk_index - memory.exclude_window_chunks
  if memory.progressive_exclude:
    last = jnp.where(chunk_index < memory.exclude_window_chunks, chunk_index, last)
  owner = tables.pooled
  slot_ok = (owner >= 0) & (owner <= last)
  if resident_only:
    slot_ok &= resident(tables, owner, memory)
  return jnp.repeat(slot_ok, config.blocks_per_chunk, total_repeat_length=owner.shape[0] * config.blocks_per_chunk)


def select_blocks(q: Float[Array, "b h n d"], k_pooled: Float[Array, "b h blocks d"],
                  tables: SlotTables, chunk_index: int | Int[Array, ""],
                  config: ModelConfig, *, implementation: str | Sequence[str] | None = None,
                  interpret: bool | None = None, resident_only: bool = True) -> Int[Array, "b h g k"]:
  """Top-k pooled block ids per (group, head), best first; ties go to the lower id; -1 pads.

  Args:
    q: the chunk's queries, heads-major.
    k_pooled: one layer's pooled keys (the pooled tier's blocks).
    tables: the slot tables, already recording chunk c (see `store.assign`).
    chunk_index: absolute chunk index c (may be traced).
    config: geometry and memory configuration (group_size, top_k, exclusion).
    implementation: the `omnimem_kernels.block_topk` backend or preference list (default per platform).
    interpret: run Pallas backends in interpret mode; default: on CPU.
    resident_only: see `candidate_blocks`.
  """
  memory = config.memory
  candidates = candidate_blocks(tables, chunk_index, config, resident_only=resident_only)
  return block_topk.block_top_k(group_mean_queries(q, memory.group_size), k_pooled, candidates, top_k=memory.top_k,
                                divisor=score_divisor(q.shape[-1]), implementation=implementation,
                                interpret=interpret)


def chunks_of_ids(ids: Int[Array, "*s"], tables: SlotTables, config: ModelConfig) -> Int[Array, "*s"]:
  """The chunk each pooled block id belongs to; -1 for padding ids."""
  return jnp.where(ids >= 0, tables.pooled[jnp.maximum(ids, 0) // config.blocks_per_chunk], -1)


def full_resolution_ids(ids: Int[Array, "*s"], tables: SlotTables, config: ModelConfig) -> Int[Array, "*s"]:
  """Pooled block ids as the full-resolution tier's slot-major block ids (what the selection kernel
  reads); -1 stays -1. The selected chunks are resident (`candidate_blocks`)."""
  blocks = config.blocks_per_chunk
  slots = slot_of_chunk(jnp.maximum(chunks_of_ids(ids, tables, config), 0), config.memory)
  return jnp.where(ids >= 0, slots * blocks + ids % blocks, -1)


def retrieval_distances(ids: Int[Array, "b h g k"], tables: SlotTables,
                        chunk_index: int | Int[Array, ""], config: ModelConfig) -> Int[Array, "b h g k"]:
  """How many chunks back each selected block lies (c minus its chunk); -1 for padding ids."""
  return jnp.where(ids >= 0, jnp.asarray(chunk_index, jnp.int32) - chunks_of_ids(ids, tables, config), -1)


def retrieval_histogram(distances: Int[Array, "*any"], max_distance: int) -> Int[Array, " bins"]:
  """Counts of selected blocks by distance 0..max_distance (the last bin holds everything farther)."""
  valid = distances >= 0
  bins = jnp.where(valid, jnp.minimum(distances, max_distance), 0)
  return jnp.zeros(max_distance + 1, jnp.int32).at[bins.ravel()].add(valid.ravel().astype(jnp.int32))
