"""The KV store: full-resolution K/V in chunk slots plus mean-pooled K/V of every block.

A pytree preallocated once and carried (donated) through a rollout (docs/architecture.md, 'Store layout'). Chunk c
lives in slot `slot_of_chunk(c)`; every DiT call of that chunk overwrites the same slot (noisy K/V on
the denoising steps, clean K/V on the context pass). Past `capacity_chunks` slots the oldest unpinned
slot is reused (a ring), which never touches the attention window because the config requires
capacity >= pinned + window chunks. Block j of slot s is rows j*BT .. j*BT+BT-1 of `k[..., s, :, :]`
and pooled entry `s * blocks_per_chunk + j` ("slot-major block id").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from omnimem_jax.config import MemoryConfig, ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKV:
  """One layer's history, or every layer's, stacked on axis 2 (after batch and heads)."""

  k: Float[Array, "b h *l slots tokens d"]
  v: Float[Array, "b h *l slots tokens d"]
  k_pooled: Float[Array, "b h *l blocks d"]
  v_pooled: Float[Array, "b h *l blocks d"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVStore:
  """All layers' history plus the table of which absolute chunk each slot holds (-1 = empty).

  The layer axis comes after batch and heads, so for each (batch, head) every layer's blocks are
  one contiguous run of rows: a kernel reads layer l's blocks in place at block offset
  l * slots * blocks_per_chunk, with no per-layer copy.
  """

  layers: LayerKV  # [B, H, L, ...]
  slot_chunk: Int[Array, " slots"]


# The logical axis names of every store array (`omnimem_jax.sharding.tree_shardings` maps them onto a
# mesh): K/V [B, H, L, S, T, D] and pooled [B, H, L, S*NB, D] by heads and batch; the slot table replicated.
_FULL_AXES = ("batch", "heads", "layers", "kv_blocks", None, "head_dim")
_POOLED_AXES = ("batch", "heads", "layers", "kv_blocks", "head_dim")
LOGICAL_AXES = KVStore(layers=LayerKV(_FULL_AXES, _FULL_AXES, _POOLED_AXES, _POOLED_AXES), slot_chunk=())


def init_store(config: ModelConfig, batch_size: int, dtype: jnp.dtype = jnp.bfloat16,
               num_layers: int | None = None) -> KVStore:
  """An empty store (zeros, never `jnp.empty`: unused slots must not hold NaN garbage)."""
  num_layers = config.num_layers if num_layers is None else num_layers
  slots = config.memory.capacity_chunks
  lead = (batch_size, config.num_heads, num_layers)
  full = (*lead, slots, config.tokens_per_chunk, config.head_dim)
  pooled = (*lead, slots * config.blocks_per_chunk, config.head_dim)
  layers = LayerKV(jnp.zeros(full, dtype), jnp.zeros(full, dtype), jnp.zeros(pooled, dtype), jnp.zeros(pooled, dtype))
  return KVStore(layers=layers, slot_chunk=jnp.full((slots,), -1, jnp.int32))


def layer_kv(layers: LayerKV, layer_index: int | Int[Array, ""]) -> LayerKV:
  """Layer l's store out of the stacked one."""
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, layer_index, axis=2, keepdims=False), layers)


def slot_of_chunk(chunk_index: int | Int[Array, "*s"], memory: MemoryConfig) -> Int[Array, "*s"]:
  """Slot holding chunk c: c itself while c < pinned, then a ring over the unpinned slots."""
  chunk_index = jnp.asarray(chunk_index, jnp.int32)
  pinned = memory.pinned_chunks
  ring = memory.capacity_chunks - pinned
  return jnp.where(chunk_index < pinned, chunk_index, pinned + (chunk_index - pinned) % ring)


def assign_slot(slot_chunk: Int[Array, " slots"], chunk_index: int | Int[Array, ""],
                memory: MemoryConfig) -> Int[Array, " slots"]:
  """The slot table once chunk c owns its slot (evicting the chunk held there). Idempotent."""
  return slot_chunk.at[slot_of_chunk(chunk_index, memory)].set(jnp.asarray(chunk_index, jnp.int32))


def holds_chunks_through(slot_chunk: Int[Array, " slots"], last_chunk: int | Int[Array, ""]) -> Bool[Array, " slots"]:
  """Which slots hold one of the chunks 0..last_chunk (chunks newer than last_chunk are not history)."""
  return (slot_chunk >= 0) & (slot_chunk <= last_chunk)


def check_layer(layer: LayerKV, config: ModelConfig) -> None:
  """Raises ValueError unless `layer` is one layer's store for `config`."""
  slots, tokens, blocks = config.memory.capacity_chunks, config.tokens_per_chunk, config.blocks_per_chunk
  for name, shape, expected in (("k", layer.k.shape, (slots, tokens)), ("v", layer.v.shape, (slots, tokens)),
                                ("k_pooled", layer.k_pooled.shape, (slots * blocks,)),
                                ("v_pooled", layer.v_pooled.shape, (slots * blocks,))):
    rank = 3 + len(expected)
    if len(shape) != rank or shape[2:-1] != expected or shape[1] != config.num_heads or shape[-1] != config.head_dim:
      raise ValueError(
          f"store field {name} must be [batch, {config.num_heads} heads, {', '.join(map(str, expected))}, "
          f"{config.head_dim}] for this config (capacity_chunks={slots}), got {shape}")


def write_chunk(layer: LayerKV, k: Float[Array, "b n h d"], v: Float[Array, "b n h d"],
                chunk_index: int | Int[Array, ""], config: ModelConfig,
                layer_index: int | Int[Array, ""] | None = None) -> LayerKV:
  """Stores chunk c's post-RoPE keys and values (block order) and their block means in its slot.

  `layer` is one layer's store, or with `layer_index` the stacked store, written in place there.
  """
  batch, tokens, heads, head_dim = k.shape
  block_tokens = config.memory.block_tokens
  blocks = tokens // block_tokens
  slot = slot_of_chunk(chunk_index, config.memory)
  lead = () if layer_index is None else (jnp.asarray(layer_index, jnp.int32),)

  def pool(x):
    return x.astype(jnp.float32).reshape(batch, heads, blocks, block_tokens, head_dim).mean(axis=3)

  def put(store, update, start):
    update = update.reshape(batch, heads, *(1,) * len(lead), *update.shape[2:]).astype(store.dtype)
    zero = jnp.int32(0)
    return jax.lax.dynamic_update_slice(store, update, (zero, zero, *lead, start, *(zero,) * (update.ndim - 3 - len(lead))))

  k_heads, v_heads = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  return LayerKV(
      k=put(layer.k, k_heads[:, :, None], slot),
      v=put(layer.v, v_heads[:, :, None], slot),
      k_pooled=put(layer.k_pooled, pool(k_heads), slot * blocks),
      v_pooled=put(layer.v_pooled, pool(v_heads), slot * blocks),
  )
