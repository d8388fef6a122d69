"""OmniMem self-attention over the KV store, and the baseline modes through the same entry point.

`chunk_self_attention` is one layer's attention for one DiT call on chunk c (DESIGN.md section 3):
it writes the chunk's post-RoPE K/V into the store, then

  omnimem:      o = s(g_cmp) o_cmp + s(g_slc) o_slc + s(g_swa) o_swa,  s = sigmoid(clip(., -10, 10))
                o_cmp: dense over the pooled K/V of every stored chunk 0..c,
                o_swa: dense over the full K/V of chunks c - window_chunks + 1 .. c,
                o_slc: each (query group, head) over its own top-k blocks (memory.select);
  window:       dense over the last local_attn_frames frames (Self-Forcing);
  sink_window:  dense over the sink chunks plus the last local_attn_frames - sink_frames frames
                (LongLive);
  dense:        dense over every stored chunk.

Attention inside the current chunk is bidirectional in every branch. Keys are never re-rotated.
Dense branches run through `omnimem_kernels.segment_attention` (the Mosaic GPU kernel reading the store in
place) on Hopper GPUs, and elsewhere through `omnimem_kernels.masked_attention` on gathered slots: cuDNN on
other GPUs, Pallas splash attention on TPUs, XLA otherwise (`default_dense_implementation`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from omnimem_kernels import dispatch
from omnimem_kernels.backends import Backends
from omnimem_kernels.masked_attention import api as masked_api
from omnimem_kernels.segment_attention import api as segment_api
from omnimem_kernels.selection_attention import api as selection_api
from omnimem_jax.config import MemoryConfig, ModelConfig
from omnimem_jax.memory.select import select_blocks
from omnimem_jax.memory.store import (
  LayerKV,
  assign_slot,
  check_layer,
  holds_chunks_through,
  layer_kv,
  slot_of_chunk,
  write_chunk,
)

GATE_ORDER = ("cmp", "slc", "swa")
GATE_CLIP = 10.0


DENSE_IMPLEMENTATIONS = ("xla", "cudnn", "mosaic_gpu", "splash")


def default_dense_implementation(dtype: jnp.dtype) -> str:
  """Pallas splash attention on TPUs. On GPUs, for 16-bit inputs: the Mosaic GPU segment kernel on
  Hopper, cuDNN flash attention on others. XLA otherwise (cuDNN has no f32 path)."""
  if jax.default_backend() == "tpu":
    return "splash"
  if jax.default_backend() != "gpu" or jnp.dtype(dtype).itemsize != 2:
    return "xla"
  return "mosaic_gpu" if dispatch.platform_name() == "gpu_hopper" else "cudnn"


def cudnn_or_xla(dtype: jnp.dtype) -> str:
  """cuDNN flash attention for 16-bit inputs on GPUs, XLA otherwise (plain [b, n, h, d] attention)."""
  return "cudnn" if jax.default_backend() == "gpu" and jnp.dtype(dtype).itemsize == 2 else "xla"


def _resident_first(ids: Int[Array, " n"], resident: Bool[Array, " n"]) -> tuple[Int[Array, " n"], Bool[Array, " n"]]:
  """Reorder (stably) so the resident entries come first, as the cuDNN length mask needs."""
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
                 memory: MemoryConfig) -> tuple[Int[Array, " n"], Bool[Array, " n"]]:
  """The slots of the listed chunks (None: every slot) and which of them hold a chunk of 0..c."""
  if chunk_ids is None:
    return jnp.arange(slot_chunk.shape[0], dtype=jnp.int32), holds_chunks_through(slot_chunk, chunk_index)
  slots = slot_of_chunk(jnp.maximum(chunk_ids, 0), memory)
  return slots, (chunk_ids >= 0) & (chunk_ids <= chunk_index) & (slot_chunk[slots] == chunk_ids)


def _chunk_keys(layer: LayerKV, slot_chunk: Int[Array, " slots"], chunk_index: Int[Array, ""],
                chunk_ids: Int[Array, " n"] | None, memory: MemoryConfig, resident_first: bool):
  """Full-resolution keys, values [b, h, m, d] of the listed chunks (None: every slot) and the key mask."""
  tokens = layer.k.shape[3]
  slots, resident = _chunk_slots(slot_chunk, chunk_index, chunk_ids, memory)
  if chunk_ids is None and not resident_first:  # every slot, in place
    keys, values = layer.k, layer.v
  else:
    if resident_first:  # for cuDNN's length mask
      slots, resident = _resident_first(slots, resident)
    keys, values = jnp.take(layer.k, slots, axis=2), jnp.take(layer.v, slots, axis=2)
  batch, heads, count, _, head_dim = keys.shape
  keys = keys.reshape(batch, heads, count * tokens, head_dim)
  values = values.reshape(batch, heads, count * tokens, head_dim)
  return keys, values, jnp.repeat(resident, tokens, total_repeat_length=count * tokens)


def _compressed_keys(layer: LayerKV, slot_chunk: Int[Array, " slots"], chunk_index: Int[Array, ""],
                     resident_first: bool):
  """Pooled keys, values [b, h, m, d] of every slot and the mask of those holding chunks 0..c."""
  slots = slot_chunk.shape[0]
  blocks_per_chunk = layer.k_pooled.shape[2] // slots
  stored = holds_chunks_through(slot_chunk, chunk_index)
  keys, values = layer.k_pooled, layer.v_pooled
  if resident_first:  # the gather fuses with the [b, m, h, d] transpose cuDNN needs anyway
    order, stored = _resident_first(jnp.arange(slots, dtype=jnp.int32), stored)
    keys, values = (jnp.take(x.reshape(*x.shape[:2], slots, blocks_per_chunk, x.shape[-1]), order, axis=2
                             ).reshape(x.shape) for x in (keys, values))
  return keys, values, jnp.repeat(stored, blocks_per_chunk, total_repeat_length=layer.k_pooled.shape[2])


def _rows(x: Float[Array, "b h ..."]) -> Float[Array, "b h r d"]:
  """A store array viewed as heads-major rows (free: the store's layout)."""
  return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


def _segment_attention(q: Float[Array, "b n h d"], keys: Float[Array, "b h r d"], values: Float[Array, "b h r d"],
                       starts: Int[Array, " m"], count: Int[Array, ""], length: int | Int[Array, ""]):
  """The segment kernel on GPUs (None where it cannot take the shapes: the caller falls back to cuDNN);
  elsewhere the XLA segment reference, which keeps the segment bookkeeping testable on CPUs."""
  implementation = "mosaic_gpu" if jax.default_backend() == "gpu" else "xla"
  try:
    return segment_api.segment_attention(q, keys, values, starts, count, length, implementation=implementation)
  except NotImplementedError:
    return None


def _chunk_segments(layer: LayerKV, slot_chunk, chunk_index, chunk_ids, memory: MemoryConfig):
  """The listed chunks as segments of the full-resolution rows: resident slots first, one slot each."""
  tokens = layer.k.shape[3]
  slots, resident = _resident_first(*_chunk_slots(slot_chunk, chunk_index, chunk_ids, memory))
  return slots * tokens, jnp.sum(resident, dtype=jnp.int32), tokens


def _compressed_segments(layer: LayerKV, slot_chunk, chunk_index):
  """The pooled rows of the slots holding chunks 0..c: one segment when those slots come first
  (always so in a rollout, which writes chunks in order), else one segment per slot (a rewound
  store whose later slots hold later chunks)."""
  slots = slot_chunk.shape[0]
  blocks_per_chunk = layer.k_pooled.shape[2] // slots
  stored = holds_chunks_through(slot_chunk, chunk_index)
  count = jnp.sum(stored, dtype=jnp.int32)
  prefix = jnp.all(stored == (jnp.arange(slots) < count))
  order, _ = _resident_first(jnp.arange(slots, dtype=jnp.int32), stored)
  starts = jnp.where(prefix, 0, order * blocks_per_chunk)
  return starts, jnp.where(prefix, jnp.minimum(count, 1), count), jnp.where(prefix, count, 1) * blocks_per_chunk


def _segment_source(view: tuple[jax.Array, jax.Array], stacked: tuple[jax.Array, jax.Array] | None,
                    layer_index: Int[Array, ""] | None) -> tuple[jax.Array, jax.Array, Int[Array, ""] | int]:
  """Heads-major key and value rows the segment kernel reads, and the row where the layer of `view`
  (its keys and values) starts in them: the stacked store of every layer when given (read in place:
  no copy of the layer), else `view` itself."""
  if stacked is None:
    return _rows(view[0]), _rows(view[1]), 0
  return _rows(stacked[0]), _rows(stacked[1]), layer_index * math.prod(view[0].shape[2:-1])


def chunk_attention(q: Float[Array, "b n h d"], layer: LayerKV, slot_chunk: Int[Array, " slots"],
                    chunk_index: Int[Array, ""], chunk_ids: Int[Array, " n"] | None,
                    memory: MemoryConfig, implementation: str = "xla", stacked: LayerKV | None = None,
                    layer_index: Int[Array, ""] | None = None) -> Float[Array, "b n h d"]:
  """Dense attention over the full-resolution K/V of the listed chunks that are still stored.

  With `stacked` (every layer's store; `layer` is layer `layer_index` of it), the segment kernel
  reads the stacked store in place.
  """
  if implementation == "mosaic_gpu":
    keys, values, offset = _segment_source((layer.k, layer.v), None if stacked is None else (stacked.k, stacked.v),
                                           layer_index)
    starts, count, length = _chunk_segments(layer, slot_chunk, chunk_index, chunk_ids, memory)
    out = _segment_attention(q, keys, values, starts + offset, count, length)
    if out is not None:
      return out
    implementation = cudnn_or_xla(q.dtype)
  keys, values, mask = _chunk_keys(layer, slot_chunk, chunk_index, chunk_ids, memory, implementation == "cudnn")
  return masked_api.masked_attention(q, keys, values, mask, implementation=implementation)


def compressed_attention(q: Float[Array, "b n h d"], layer: LayerKV, slot_chunk: Int[Array, " slots"],
                         chunk_index: Int[Array, ""], implementation: str = "xla", stacked: LayerKV | None = None,
                         layer_index: Int[Array, ""] | None = None) -> Float[Array, "b n h d"]:
  """Dense attention over the pooled K/V of every stored chunk 0..c (current chunk included); with
  `stacked`, read in place as in `chunk_attention`."""
  if implementation == "mosaic_gpu":
    keys, values, offset = _segment_source((layer.k_pooled, layer.v_pooled),
                                           None if stacked is None else (stacked.k_pooled, stacked.v_pooled),
                                           layer_index)
    starts, count, length = _compressed_segments(layer, slot_chunk, chunk_index)
    out = _segment_attention(q, keys, values, starts + offset, count, length)
    if out is not None:
      return out
    implementation = cudnn_or_xla(q.dtype)
  keys, values, mask = _compressed_keys(layer, slot_chunk, chunk_index, implementation == "cudnn")
  return masked_api.masked_attention(q, keys, values, mask, implementation=implementation)


def selection_branch(q: Float[Array, "b n h d"], layer: LayerKV, slot_chunk: Int[Array, " slots"],
                     chunk_index: Int[Array, ""], config: ModelConfig,
                     implementation: str | Sequence[str] | None = None,
                     topk_implementation: str | None = None, stacked: LayerKV | None = None,
                     layer_index: Int[Array, ""] | None = None) -> Float[Array, "b n h d"]:
  """Each (query group, head) attends to its own top-k blocks, read from the store's block view.

  With `stacked` (every layer's store, [B, H, L, ...]) the kernel reads layer `layer_index`'s blocks
  straight from it, at block offset layer_index * slots * blocks_per_chunk: no per-layer copy.
  """
  q_heads = q.transpose(0, 2, 1, 3)
  ids = select_blocks(q_heads, layer.k_pooled, slot_chunk, chunk_index, config, implementation=topk_implementation)
  source = layer if stacked is None else stacked
  batch, heads, head_dim = source.k.shape[0], source.k.shape[1], source.k.shape[-1]
  num_blocks = source.k.size // (batch * heads * config.memory.block_tokens * head_dim)
  if stacked is not None:
    ids = jnp.where(ids >= 0, ids + layer_index * layer.k_pooled.shape[2], ids)
  block_view = (batch, heads, num_blocks, config.memory.block_tokens, head_dim)
  out, _ = selection_api.selection_attention(
      q_heads, source.k.reshape(block_view), source.v.reshape(block_view), ids,
      implementation=implementation, check_ids=config.memory.debug_checks)
  return out.transpose(0, 2, 1, 3)


def gate_branches(gate_logits: Float[Array, "b n h 3"], o_cmp: Float[Array, "b n h d"],
                  o_slc: Float[Array, "b n h d"], o_swa: Float[Array, "b n h d"]) -> Float[Array, "b n h d"]:
  """sigmoid(clip(g, -10, 10)) weighted sum of the branches, gate order (cmp, slc, swa)."""
  gates = jax.nn.sigmoid(jnp.clip(gate_logits.astype(jnp.float32), -GATE_CLIP, GATE_CLIP))
  return sum(gates[..., i, None] * branch.astype(jnp.float32) for i, branch in enumerate((o_cmp, o_slc, o_swa)))


def _check_inputs(q, k, v, layer, slot_chunk, chunk_index, gate_logits, config: ModelConfig) -> None:
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
  if slot_chunk.shape != (config.memory.capacity_chunks,):
    raise ValueError(f"slot_chunk must be [{config.memory.capacity_chunks}], got {tuple(slot_chunk.shape)}")
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
                         layer: LayerKV, slot_chunk: Int[Array, " slots"], chunk_index: int | Int[Array, ""],
                         gate_logits: Float[Array, "b n h 3"] | None, config: ModelConfig, *,
                         backends: Backends = Backends(),
                         layer_index: int | Int[Array, ""] | None = None) -> tuple[Float[Array, "b n h d"], LayerKV]:
  """One layer's self-attention of chunk c over its history, in the mode of `config.memory`.

  Args:
    q, k, v: the chunk's queries, keys, values: post-RoPE (absolute frames), tokens in block order.
    layer: this layer's store; chunk c's K/V are written into its slot before attending. With
      `layer_index`, the stacked store of every layer ([B, H, L, ...]): the chunk is written into
      layer `layer_index` in place and the branches read that layer from it without copying it.
    slot_chunk: the store's slot table before this call (chunk c's slot is assigned here too; the
      caller records `store.assign_slot(slot_chunk, c)` once for all layers).
    chunk_index: absolute chunk index c; may be traced, so a rollout compiles once.
    gate_logits: `x_sa @ Wg + bg` reshaped per head, order (cmp, slc, swa); omnimem mode only.
    config: geometry and memory configuration.
    backends: the backend of each op (selection, top-k, dense); None fields: per platform.

  Returns:
    (attention output before the output projection, updated store: the layer's, or the stacked one).
  """
  view = layer if layer_index is None else layer_kv(layer, layer_index)
  _check_inputs(q, k, v, view, slot_chunk, chunk_index, gate_logits, config)
  implementation, topk_implementation = backends.selection, backends.topk
  dense = default_dense_implementation(q.dtype) if backends.dense is None else backends.dense
  if dense not in DENSE_IMPLEMENTATIONS:
    raise ValueError(f"unknown dense_implementation {dense!r}; known: {DENSE_IMPLEMENTATIONS}")
  memory = config.memory
  chunk_index = jnp.asarray(chunk_index, jnp.int32)
  slot_chunk = assign_slot(slot_chunk, chunk_index, memory)
  layer = write_chunk(layer, k, v, chunk_index, config, layer_index)
  view = layer if layer_index is None else layer_kv(layer, layer_index)
  recent = attended_chunks(chunk_index, memory)
  stacked = None if layer_index is None else layer
  layer_index = None if layer_index is None else jnp.asarray(layer_index, jnp.int32)
  o_swa = chunk_attention(q, view, slot_chunk, chunk_index, recent, memory, dense, stacked, layer_index)
  if memory.mode != "omnimem":
    return o_swa, layer
  o_cmp = compressed_attention(q, view, slot_chunk, chunk_index, dense, stacked, layer_index)
  o_slc = selection_branch(q, view, slot_chunk, chunk_index, config, implementation, topk_implementation,
                           stacked=stacked, layer_index=layer_index)
  return gate_branches(gate_logits, o_cmp, o_slc, o_swa).astype(q.dtype), layer
