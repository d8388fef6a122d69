"""The KV store: three tiers of one layer's history, all layers stacked, plus their slot tables.

A pytree preallocated once and carried (donated) through a rollout (docs/architecture.md, 'Store layout'):

- full resolution: every chunk's post-RoPE K/V in `capacity_chunks` chunk slots (a ring past the
  pinned ones), read by the selection branch and the dense baselines. Stored plain (the store dtype)
  or compact (`kv_format` "fp8" / "int4": `omnimem_kernels.kv_quant`, one scale per block and head).
- recent (compact stores only): the last `window_chunks` chunks again, plain, in a ring of their own,
  for the dense sliding branch, which reads them whole and so should not pay for a compact format.
- pooled: the mean-pooled K/V of every block of the last `pooled_slots` chunks (by default the
  full-resolution capacity; `generate.py` keeps the whole video), read by the compressed branch and
  the top-k, which thus see chunks whose full-resolution K/V was evicted (and never select them).

Every call of chunk c writes all tiers (last write wins). Block j of full-resolution slot s is rows
j*BT .. j*BT+BT-1 of `k[..., s, :, :]`, its "slot-major block id" s * blocks_per_chunk + j; block j of
pooled slot p is pooled entry p * blocks_per_chunk + j.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from omnimem_jax.config import MemoryConfig, ModelConfig
from omnimem_kernels import kv_quant

KV_FORMATS = kv_quant.FORMATS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKV:
  """One layer's history, or every layer's, stacked on axis 2 (after batch and heads).

  `k`, `v` hold the stored head_dim (head_dim / 2 bytes for int4); the scales and the recent ring have
  zero slots in a plain store.
  """

  k: Float[Array, "b h *l slots tokens d"]
  v: Float[Array, "b h *l slots tokens d"]
  k_scale: Float[Array, "b h *l scaled_blocks"]  # per block and head (compact stores), float32
  v_scale: Float[Array, "b h *l scaled_blocks"]
  k_recent: Float[Array, "b h *l recent_slots tokens d"]
  v_recent: Float[Array, "b h *l recent_slots tokens d"]
  k_pooled: Float[Array, "b h *l pooled_blocks d"]
  v_pooled: Float[Array, "b h *l pooled_blocks d"]

  @property
  def kv_format(self) -> str:
    """"bf16" (plain, whatever the float dtype), "fp8" or "int4": what the full-resolution tier holds."""
    return kv_quant.format_of(self.k, self.k_pooled.shape[-1])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotTables:
  """The absolute chunk each slot of each tier holds (-1 = empty)."""

  full: Int[Array, " slots"]
  recent: Int[Array, " recent_slots"]
  pooled: Int[Array, " pooled_slots"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVStore:
  """All layers' history plus the slot tables.

  The layer axis comes after batch and heads, so for each (batch, head) every layer's blocks are
  one contiguous run of rows: a kernel reads layer l's blocks in place at block offset
  l * slots * blocks_per_chunk, with no per-layer copy.
  """

  layers: LayerKV  # [B, H, L, ...]
  tables: SlotTables

  @property
  def slot_chunk(self) -> Int[Array, " slots"]:
    """The full-resolution slot table."""
    return self.tables.full


# The logical axis names of every store array (`omnimem_jax.sharding.tree_shardings` maps them onto a
# mesh): by heads and batch; the slot tables replicated.
_FULL_AXES = ("batch", "heads", "layers", "kv_blocks", None, "head_dim")
_BLOCK_AXES = ("batch", "heads", "layers", "kv_blocks", "head_dim")
_SCALE_AXES = ("batch", "heads", "layers", "kv_blocks")
LOGICAL_AXES = KVStore(layers=LayerKV(_FULL_AXES, _FULL_AXES, _SCALE_AXES, _SCALE_AXES, _FULL_AXES, _FULL_AXES,
                                      _BLOCK_AXES, _BLOCK_AXES),
                       tables=SlotTables((), (), ()))


def recent_slots(memory: MemoryConfig, kv_format: str) -> int:
  """Chunks of the plain recent ring: the sliding window's, for a compact omnimem store; else none."""
  return memory.window_chunks if kv_format != "bf16" and memory.mode == "omnimem" else 0


def check_format(memory: MemoryConfig, kv_format: str) -> None:
  """Raises ValueError unless `kv_format` is a known format this mode can use (compact: omnimem only,
  whose dense branches read plain tiers; the baselines read the full-resolution tier densely)."""
  if kv_format not in KV_FORMATS:
    raise ValueError(f"unknown KV format {kv_format!r}; choose one of {KV_FORMATS}")
  if kv_format != "bf16" and memory.mode != "omnimem":
    raise ValueError(f"a compact KV store ({kv_format}) serves the omnimem selection only; {memory.mode} mode "
                     "reads its whole history densely: use bf16")


def init_store(config: ModelConfig, batch_size: int, dtype: jnp.dtype = jnp.bfloat16,
               num_layers: int | None = None, kv_format: str = "bf16") -> KVStore:
  """An empty store (zeros, never `jnp.empty`: unused slots must not hold NaN garbage). `dtype` is the
  plain tiers' dtype; `kv_format` the full-resolution tier's ("bf16": plain at `dtype`)."""
  memory = config.memory
  check_format(memory, kv_format)
  num_layers = config.num_layers if num_layers is None else num_layers
  slots, blocks, tokens = memory.capacity_chunks, config.blocks_per_chunk, config.tokens_per_chunk
  lead = (batch_size, config.num_heads, num_layers)
  compact = kv_format != "bf16"
  full_dtype = kv_quant.storage_dtype(kv_format) if compact else dtype
  ring = recent_slots(memory, kv_format)
  shapes = {"k": ((slots, tokens, kv_quant.stored_head_dim(config.head_dim, kv_format)), full_dtype),
            "k_scale": ((slots * blocks if compact else 0,), jnp.float32),
            "k_recent": ((ring, tokens, config.head_dim), dtype),
            "k_pooled": ((memory.pooled_slots * blocks, config.head_dim), dtype)}
  fields = {}
  for name, (shape, field_dtype) in shapes.items():  # separate K and V buffers (each is donated)
    for kind in ("k", "v"):
      fields[kind + name[1:]] = jnp.zeros((*lead, *shape), field_dtype)
  return KVStore(layers=LayerKV(**fields), tables=init_tables(memory, kv_format))


def init_tables(memory: MemoryConfig, kv_format: str = "bf16") -> SlotTables:
  """Slot tables of a store for `memory` and `kv_format`, every slot empty."""
  sizes = (memory.capacity_chunks, recent_slots(memory, kv_format), memory.pooled_slots)
  return SlotTables(*(jnp.full((n,), -1, jnp.int32) for n in sizes))


def layer_kv(layers: LayerKV, layer_index: int | Int[Array, ""]) -> LayerKV:
  """Layer l's store out of the stacked one."""
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, layer_index, axis=2, keepdims=False), layers)


def ring_slot(chunk_index: int | Int[Array, "*s"], slots: int, pinned: int = 0) -> Int[Array, "*s"]:
  """Slot of chunk c in a tier of `slots` slots: c itself while c < pinned, then a ring over the rest."""
  chunk_index = jnp.asarray(chunk_index, jnp.int32)
  return jnp.where(chunk_index < pinned, chunk_index, pinned + (chunk_index - pinned) % (slots - pinned))


def slot_of_chunk(chunk_index: int | Int[Array, "*s"], memory: MemoryConfig) -> Int[Array, "*s"]:
  """Full-resolution slot holding chunk c (the sink of "sink_window" pinned, then a ring)."""
  return ring_slot(chunk_index, memory.capacity_chunks, memory.pinned_chunks)


def pooled_slot(chunk_index: int | Int[Array, "*s"], memory: MemoryConfig) -> Int[Array, "*s"]:
  """Pooled slot holding chunk c: laid out as the full-resolution tier, over `pooled_slots` slots (so the
  two tiers coincide when pooled_chunks is the capacity)."""
  return ring_slot(chunk_index, memory.pooled_slots, memory.pinned_chunks)


def assign_slot(slot_chunk: Int[Array, " slots"], chunk_index: int | Int[Array, ""],
                memory: MemoryConfig) -> Int[Array, " slots"]:
  """The full-resolution slot table once chunk c owns its slot (evicting the chunk held there). Idempotent."""
  return slot_chunk.at[slot_of_chunk(chunk_index, memory)].set(jnp.asarray(chunk_index, jnp.int32))


def assign(tables: SlotTables, chunk_index: int | Int[Array, ""], memory: MemoryConfig) -> SlotTables:
  """Every table once chunk c owns its slot in each tier. Idempotent."""
  chunk_index = jnp.asarray(chunk_index, jnp.int32)
  recent = tables.recent
  if recent.shape[0]:
    recent = recent.at[ring_slot(chunk_index, recent.shape[0])].set(chunk_index)
  return SlotTables(full=assign_slot(tables.full, chunk_index, memory), recent=recent,
                    pooled=tables.pooled.at[pooled_slot(chunk_index, memory)].set(chunk_index))


def written_tables(memory: MemoryConfig, num_chunks: int, kv_format: str = "bf16") -> SlotTables:
  """The slot tables once chunks 0 .. num_chunks - 1 were written in order (a rollout's, or a benchmark's
  filled store): `assign` chunk by chunk, so ring reuse evicts as it does in a run."""
  tables = init_tables(memory, kv_format)
  for chunk in range(num_chunks):
    tables = assign(tables, chunk, memory)
  return tables


def holds_chunks_through(slot_chunk: Int[Array, " slots"], last_chunk: int | Int[Array, ""]) -> Bool[Array, " slots"]:
  """Which slots hold one of the chunks 0..last_chunk (chunks newer than last_chunk are not history)."""
  return (slot_chunk >= 0) & (slot_chunk <= last_chunk)


def resident(tables: SlotTables, chunks: Int[Array, "*s"], memory: MemoryConfig) -> Bool[Array, "*s"]:
  """Whether the full-resolution K/V of each listed chunk is still stored (negative ids: no)."""
  return (chunks >= 0) & (tables.full[slot_of_chunk(jnp.maximum(chunks, 0), memory)] == chunks)


def check_layer(layer: LayerKV, config: ModelConfig) -> None:
  """Raises ValueError unless `layer` is one layer's store for `config`."""
  memory = config.memory
  slots, tokens, blocks = memory.capacity_chunks, config.tokens_per_chunk, config.blocks_per_chunk
  stored_d = kv_quant.stored_head_dim(config.head_dim, layer.kv_format)
  recent = recent_slots(memory, layer.kv_format)
  scaled = slots * blocks if layer.kv_format != "bf16" else 0
  expected = {"k": ((slots, tokens), stored_d), "v": ((slots, tokens), stored_d), "k_scale": ((scaled,), None),
              "v_scale": ((scaled,), None), "k_recent": ((recent, tokens), config.head_dim),
              "v_recent": ((recent, tokens), config.head_dim),
              "k_pooled": ((memory.pooled_slots * blocks,), config.head_dim),
              "v_pooled": ((memory.pooled_slots * blocks,), config.head_dim)}
  for name, (middle, last) in expected.items():
    shape = getattr(layer, name).shape
    want = (*middle, last) if last is not None else middle
    if len(shape) != 2 + len(want) or shape[2:] != want or shape[1] != config.num_heads:
      raise ValueError(
          f"store field {name} must be [batch, {config.num_heads} heads, {', '.join(map(str, want))}] for this "
          f"config (capacity_chunks={slots}, pooled_slots={memory.pooled_slots}, kv format {layer.kv_format}), "
          f"got {shape}")


def write_chunk(layer: LayerKV, k: Float[Array, "b n h d"], v: Float[Array, "b n h d"],
                chunk_index: int | Int[Array, ""], config: ModelConfig,
                layer_index: int | Int[Array, ""] | None = None) -> LayerKV:
  """Stores chunk c's post-RoPE keys and values (block order) in every tier: full resolution (quantised
  for a compact store), the recent ring (if any) and the block means (computed in float32).

  `layer` is one layer's store, or with `layer_index` the stacked store, written in place there.
  """
  batch, tokens, heads, head_dim = k.shape
  block_tokens = config.memory.block_tokens
  blocks = tokens // block_tokens
  lead = () if layer_index is None else (jnp.asarray(layer_index, jnp.int32),)
  slot = slot_of_chunk(chunk_index, config.memory)

  def put(store, update, start):
    update = update.reshape(batch, heads, *(1,) * len(lead), *update.shape[2:]).astype(store.dtype)
    zero = jnp.int32(0)
    where = (zero, zero, *lead, start, *(zero,) * (update.ndim - 3 - len(lead)))
    return jax.lax.dynamic_update_slice(store, update, where)

  def blockwise(x):  # [B, H, blocks, BT, D] float32
    return x.astype(jnp.float32).reshape(batch, heads, blocks, block_tokens, head_dim)

  def full(store, scales, x):
    if layer.kv_format == "bf16":
      return put(store, x[:, :, None], slot), scales
    data, scale = kv_quant.quantize(blockwise(x), layer.kv_format)
    return put(store, data.reshape(batch, heads, 1, tokens, -1), slot), put(scales, scale, slot * blocks)

  def recent(store, x):
    ring = store.shape[-3]
    return store if ring == 0 else put(store, x[:, :, None], ring_slot(chunk_index, ring))

  def pooled(store, x):
    return put(store, blockwise(x).mean(axis=3), pooled_slot(chunk_index, config.memory) * blocks)

  k_heads, v_heads = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  new_k, k_scale = full(layer.k, layer.k_scale, k_heads)
  new_v, v_scale = full(layer.v, layer.v_scale, v_heads)
  return LayerKV(k=new_k, v=new_v, k_scale=k_scale, v_scale=v_scale, k_recent=recent(layer.k_recent, k_heads),
                 v_recent=recent(layer.v_recent, v_heads), k_pooled=pooled(layer.k_pooled, k_heads),
                 v_pooled=pooled(layer.v_pooled, v_heads))
