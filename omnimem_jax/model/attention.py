"""OmniMem self-attention over the KV store, and the baseline modes through the same entry point.

`chunk_self_attention` is one layer's attention for one DiT call on chunk c (docs/architecture.md,
'Branches and gates'): it writes the chunk's post-RoPE K/V into the store, then

  omnimem:      o = s(g_cmp) o_cmp + s(g_slc) o_slc + s(g_swa) o_swa,  s = sigmoid(clip(., -10, 10))
                o_cmp: dense over the pooled K/V of every stored chunk 0..c,
                o_swa: dense over the full K/V of chunks c - window_chunks + 1 .. c,
                o_slc: each (query group, head) over its own top-k blocks (memory.select);
  window:       dense over the last local_attn_frames frames (Self-Forcing);
  sink_window:  dense over the sink chunks plus the last local_attn_frames - sink_frames frames
                (LongLive);
  dense:        dense over every stored chunk.

Attention inside the current chunk is bidirectional in every branch. Keys are never re-rotated.
This module holds the branch math only. The dense branches are row segments of the store for
`omnimem_kernels.segment_attention`; the selection scores blocks with `omnimem_kernels.block_topk`
(through `memory.select`) and attends with `omnimem_kernels.selection_attention`. Each op picks its
backend from the `backends` argument (`omnimem_kernels.backends.Backends`; None fields: the op's
per-platform preference list).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from omnimem_kernels.backends import Backends
from omnimem_kernels.segment_attention import segment_attention
from omnimem_kernels.selection_attention import selection_attention
from omnimem_jax.config import MemoryConfig, ModelConfig
from omnimem_jax.memory.select import full_resolution_ids, select_blocks
from omnimem_jax.memory.store import (
  LayerKV,
  SlotTables,
  assign,
  check_layer,
  holds_chunks_through,
  layer_kv,
  recent_slots,
  ring_slot,
  slot_of_chunk,
  write_chunk,
)

GATE_ORDER = ("cmp", "slc", "swa")
GATE_CLIP = 10.0
SlotFn = Callable[[Int[Array, " n"]], Int[Array, " n"]]  # chunks -> a tier's slots


def _resident_first(ids: Int[Array, " n"], resident: Bool[Array, " n"]) -> tuple[Int[Array, " n"], Bool[Array, " n"]]:
  """Reorder (stably) so the resident entries come first: the used segments lead the segment list."""
  order = jnp.argsort(~resident, stable=True)
  return ids[order], resident[order]


def recent_chunk_ids(chunk_index: Int[Array, ""], count: int) -> Int[Array, " count"]:
  """Chunks c - count + 1 .. c (negative ids mean "before the video" and are never resident)."""
  return chunk_index - jnp.arange(count - 1, -1, -1, dtype=jnp.int32)


def attended_chunks(chunk_index: Int[Array, ""], memory: MemoryConfig) -> Int[Array, " n"] | None:
  """The chunks a dense branch reads at chunk c, as a static-length list; None means all stored chunks.

  For the sliding branch of "omnimem" and the "window" / "sink_window" baselines; -1 marks an unused
  entry (a sink chunk that is also recent appears once).
  """
  if memory.mode == "dense":
    return None
  recent = recent_chunk_ids(chunk_index, memory.recent_chunks)
  if memory.mode != "sink_window":
    return recent
  sink = jnp.arange(memory.pinned_chunks, dtype=jnp.int32)
  return jnp.concatenate([jnp.where(sink <= chunk_index, sink, -1),
                          jnp.where(recent >= memory.pinned_chunks, recent, -1)])


def _chunk_slots(slot_chunk: Int[Array, " slots"], chunk_index: Int[Array, ""], chunk_ids: Int[Array, " n"] | None,
                 slot_fn: SlotFn) -> tuple[Int[Array, " n"], Bool[Array, " n"]]:
  """The slots of the listed chunks (None: every slot) and which of them hold a chunk of 0..c."""
  if chunk_ids is None:
    return jnp.arange(slot_chunk.shape[0], dtype=jnp.int32), holds_chunks_through(slot_chunk, chunk_index)
  slots = slot_fn(jnp.maximum(chunk_ids, 0))
  return slots, (chunk_ids >= 0) & (chunk_ids <= chunk_index) & (slot_chunk[slots] == chunk_ids)


def chunk_segments(slot_chunk: Int[Array, " slots"], chunk_index: Int[Array, ""], chunk_ids: Int[Array, " n"] | None,
                   slot_fn: SlotFn, tokens: int) -> tuple[Int[Array, " n"], Int[Array, ""]]:
  """The listed chunks still stored (None: every slot holding a chunk of 0..c) as segments of a
  tier's rows: (first row of each, resident slots first; how many are used), each `tokens` rows (one
  slot). `slot_fn` maps chunks to the tier's slots, `slot_chunk` is its table."""
  slots, resident = _resident_first(*_chunk_slots(slot_chunk, chunk_index, chunk_ids, slot_fn))
  return slots * tokens, jnp.sum(resident, dtype=jnp.int32)


def compressed_segments(slot_chunk: Int[Array, " slots"], chunk_index: Int[Array, ""],
                        blocks_per_chunk: int) -> tuple[Int[Array, " slots"], Int[Array, ""], Int[Array, ""]]:
  """The pooled rows of the slots holding chunks 0..c as (starts, count, length) segments of a
  layer's pooled rows: one segment when those slots come first (always so in a rollout, which
  writes chunks in order), else one segment per slot (a rewound store whose later slots hold later
  chunks)."""
  slots = slot_chunk.shape[0]
  stored = holds_chunks_through(slot_chunk, chunk_index)
  count = jnp.sum(stored, dtype=jnp.int32)
  prefix = jnp.all(stored == (jnp.arange(slots) < count))
  order, _ = _resident_first(jnp.arange(slots, dtype=jnp.int32), stored)
  starts = jnp.where(prefix, 0, order * blocks_per_chunk)
  return starts, jnp.where(prefix, jnp.minimum(count, 1), count), jnp.where(prefix, count, 1) * blocks_per_chunk


def _row_source(keys: Float[Array, "b h ..."], values: Float[Array, "b h ..."], layer_index: int | Int[Array, ""] | None
                ) -> tuple[Float[Array, "b h r d"], Float[Array, "b h r d"], Int[Array, ""] | int]:
  """A store's keys and values viewed as heads-major rows (free: the store's layout), and the row
  where layer `layer_index` starts in them (0 for one layer's store): a stacked store is read in
  place, with no copy of the layer."""
  rows = lambda x: x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])  # noqa: E731
  if layer_index is None:
    return rows(keys), rows(values), 0
  return rows(keys), rows(values), layer_index * math.prod(keys.shape[3:-1])


def chunk_attention(q: Float[Array, "b n h d"], layer: LayerKV, tables: SlotTables,
                    chunk_index: Int[Array, ""], chunk_ids: Int[Array, " n"] | None, memory: MemoryConfig, *,
                    backends: Backends = Backends(), layer_index: int | Int[Array, ""] | None = None
                    ) -> Float[Array, "b n h d"]:
  """Dense attention over the plain K/V of the listed chunks (None: every slot) that are still
  stored: the sliding branch and the baselines. A compact store's recent ring serves the listed
  chunks; a plain store's full-resolution tier serves them all.

  `layer` is one layer's store, or with `layer_index` the stacked store of every layer (read in
  place). `tables` already record chunk c. The dense op runs on `backends.dense`.
  """
  ring = layer.k_recent.shape[-3]
  if ring and chunk_ids is not None:
    keys, values, offset = _row_source(layer.k_recent, layer.v_recent, layer_index)
    table, slot_fn = tables.recent, lambda chunks: ring_slot(chunks, ring)
  else:
    keys, values, offset = _row_source(layer.k, layer.v, layer_index)
    table, slot_fn = tables.full, lambda chunks: slot_of_chunk(chunks, memory)
  tokens = layer.k.shape[-2]
  starts, count = chunk_segments(table, chunk_index, chunk_ids, slot_fn, tokens)
  return segment_attention(q, keys, values, starts + offset, count, tokens, max_rows=starts.shape[0] * tokens,
                           implementation=backends.dense)


def compressed_attention(q: Float[Array, "b n h d"], layer: LayerKV, tables: SlotTables,
                         chunk_index: Int[Array, ""], *, backends: Backends = Backends(),
                         layer_index: int | Int[Array, ""] | None = None) -> Float[Array, "b n h d"]:
  """Dense attention over the pooled K/V of every chunk 0..c the pooled tier holds (current chunk
  included, evicted full-resolution chunks too); the store as in `chunk_attention`, the dense op on
  `backends.dense`."""
  keys, values, offset = _row_source(layer.k_pooled, layer.v_pooled, layer_index)
  blocks = layer.k_pooled.shape[-2]  # one layer's: pooled slots x blocks_per_chunk
  starts, count, length = compressed_segments(tables.pooled, chunk_index, blocks // tables.pooled.shape[0])
  return segment_attention(q, keys, values, starts + offset, count, length, max_rows=blocks,
                           implementation=backends.dense)


def selection_branch(q: Float[Array, "b n h d"], layer: LayerKV, tables: SlotTables,
                     chunk_index: Int[Array, ""], config: ModelConfig, *, backends: Backends = Backends(),
                     layer_index: int | Int[Array, ""] | None = None
                     ) -> tuple[Float[Array, "b n h d"], Int[Array, "b h g k"]]:
  """Each (query group, head) attends to its own top-k blocks, read (and, from a compact store,
  dequantised) by the kernel from the full-resolution tier's block view.

  The store as in `chunk_attention`: with `layer_index` the kernel reads that layer's blocks
  straight from the stacked store, at block offset layer_index * slots * blocks_per_chunk. Top-k
  runs on `backends.topk` over the pooled tier, the attention on `backends.selection`.

  Returns:
    (output, the selected layer-local pooled block ids [B, H, groups, top_k], -1 padded).
  """
  q_heads = q.transpose(0, 2, 1, 3)
  pooled = layer.k_pooled if layer_index is None else layer_kv(layer, layer_index).k_pooled
  ids = select_blocks(q_heads, pooled, tables, chunk_index, config, implementation=backends.topk)
  full_ids = full_resolution_ids(ids, tables, config)
  batch, heads, stored_d = layer.k.shape[0], layer.k.shape[1], layer.k.shape[-1]
  layer_blocks = config.memory.capacity_chunks * config.blocks_per_chunk
  num_blocks = layer.k.size // (batch * heads * config.memory.block_tokens * stored_d)
  if layer_index is not None:
    full_ids = jnp.where(full_ids >= 0, full_ids + layer_index * layer_blocks, full_ids)
  block_view = (batch, heads, num_blocks, config.memory.block_tokens, stored_d)
  scales = {}
  if layer.kv_format != "bf16":
    scales = dict(k_scale=layer.k_scale.reshape(batch, heads, -1), v_scale=layer.v_scale.reshape(batch, heads, -1))
  out, _ = selection_attention(q_heads, layer.k.reshape(block_view), layer.v.reshape(block_view), full_ids, **scales,
                               implementation=backends.selection, check_ids=config.memory.debug_checks)
  return out.transpose(0, 2, 1, 3), ids


def gate_branches(gate_logits: Float[Array, "b n h 3"], o_cmp: Float[Array, "b n h d"],
                  o_slc: Float[Array, "b n h d"], o_swa: Float[Array, "b n h d"]) -> Float[Array, "b n h d"]:
  """sigmoid(clip(g, -10, 10)) weighted sum of the branches, gate order (cmp, slc, swa)."""
  gates = jax.nn.sigmoid(jnp.clip(gate_logits.astype(jnp.float32), -GATE_CLIP, GATE_CLIP))
  return sum(gates[..., i, None] * branch.astype(jnp.float32) for i, branch in enumerate((o_cmp, o_slc, o_swa)))


def _check_inputs(q, k, v, layer, tables, chunk_index, gate_logits, config: ModelConfig) -> None:
  expected = (config.tokens_per_chunk, config.num_heads, config.head_dim)
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
      raise ValueError(f"{name} must be [batch, {expected[0]} tokens, {expected[1]} heads, {expected[2]}] for this "
                       f"config, got {tuple(x.shape)}")
  if not (q.shape[0] == k.shape[0] == v.shape[0]):
    raise ValueError(f"q, k, v batch sizes differ: {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
  check_layer(layer, config)
  if layer.k.shape[0] != q.shape[0]:
    raise ValueError(f"store batch {layer.k.shape[0]} != query batch {q.shape[0]}")
  memory = config.memory
  for name, slots in (("full", memory.capacity_chunks), ("recent", recent_slots(memory, layer.kv_format)),
                      ("pooled", memory.pooled_slots)):
    table = getattr(tables, name)
    if table.shape != (slots,):
      raise ValueError(f"slot table {name} must be [{slots}] for this config and store, got {tuple(table.shape)}")
  if jnp.ndim(chunk_index) != 0:
    raise ValueError(f"chunk_index must be a scalar, got shape {jnp.shape(chunk_index)}")
  if not isinstance(chunk_index, jax.core.Tracer) and int(chunk_index) < 0:
    raise ValueError(f"chunk_index must be >= 0, got {int(chunk_index)}")
  if config.memory.mode == "omnimem":
    gates = (q.shape[0], *expected[:2], len(GATE_ORDER))
    if gate_logits is None or tuple(gate_logits.shape) != gates:
      got = None if gate_logits is None else tuple(gate_logits.shape)
      raise ValueError(f"omnimem mode needs gate_logits of shape {gates} (order cmp, slc, swa), got {got}")
  elif gate_logits is not None:
    raise ValueError(f"{config.memory.mode} mode has no gates; pass gate_logits=None")


def chunk_self_attention(q: Float[Array, "b n h d"], k: Float[Array, "b n h d"], v: Float[Array, "b n h d"],
                         layer: LayerKV, tables: SlotTables, chunk_index: int | Int[Array, ""],
                         gate_logits: Float[Array, "b n h 3"] | None, config: ModelConfig, *,
                         backends: Backends = Backends(), layer_index: int | Int[Array, ""] | None = None
                         ) -> tuple[Float[Array, "b n h d"], LayerKV, Int[Array, "b h g k"] | None]:
  """One layer's self-attention of chunk c over its history, in the mode of `config.memory`.

  Args:
    q, k, v: the chunk's queries, keys, values: post-RoPE (absolute frames), tokens in block order.
    layer: this layer's store; chunk c's K/V are written into its slot before attending. With
      `layer_index`, the stacked store of every layer ([B, H, L, ...]): the chunk is written into
      layer `layer_index` in place and the branches read that layer from it without copying it.
    tables: the store's slot tables before this call (chunk c's slots are assigned here too; the
      caller records `store.assign(tables, c, memory)` once for all layers).
    chunk_index: absolute chunk index c; may be traced, so a rollout compiles once.
    gate_logits: `x_sa @ Wg + bg` reshaped per head, order (cmp, slc, swa); omnimem mode only.
    config: geometry and memory configuration.
    backends: the backend of each op (selection, top-k, dense); None fields: per platform.
    layer_index: which layer of a stacked `layer` this is (None: `layer` is one layer's store).

  Returns:
    (attention output before the output projection, updated store: the layer's, or the stacked one,
    the block ids the selection chose: layer-local pooled ids [B, H, groups, top_k] (block j of pooled
    slot p is p * blocks_per_chunk + j), -1 padded; None outside omnimem mode).
  """
  view = layer if layer_index is None else layer_kv(layer, layer_index)
  _check_inputs(q, k, v, view, tables, chunk_index, gate_logits, config)
  memory = config.memory
  chunk_index = jnp.asarray(chunk_index, jnp.int32)
  tables = assign(tables, chunk_index, memory)
  layer = write_chunk(layer, k, v, chunk_index, config, layer_index)
  layer_index = None if layer_index is None else jnp.asarray(layer_index, jnp.int32)
  o_swa = chunk_attention(q, layer, tables, chunk_index, attended_chunks(chunk_index, memory), memory,
                          backends=backends, layer_index=layer_index)
  if memory.mode != "omnimem":
    return o_swa, layer, None
  o_cmp = compressed_attention(q, layer, tables, chunk_index, backends=backends, layer_index=layer_index)
  o_slc, ids = selection_branch(q, layer, tables, chunk_index, config, backends=backends, layer_index=layer_index)
  return gate_branches(gate_logits, o_cmp, o_slc, o_swa).astype(q.dtype), layer, ids
