"""The KV store: full-resolution K/V in chunk slots plus mean-pooled K/V of every block.

A pytree preallocated once and carried (donated) through a rollout (DESIGN.md section 4). Chunk c
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
  """One layer's history (or all layers', stacked on a leading axis)."""

  k: Float[Array, "*l b h slots tokens d"]
  v: Float[Array, "*l b h slots tokens d"]
  k_pooled: Float[Array, "*l b h blocks d"]
  v_pooled: Float[Array, "*l b h blocks d"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVStore:
  """All layers' history plus the table of which absolute chunk each slot holds (-1 = empty)."""

  layers: LayerKV  # leading axis: layer
  slot_chunk: Int[Array, " slots"]


def init_store(config: ModelConfig, batch_size: int, dtype: jnp.dtype = jnp.bfloat16,
               num_layers: int | None = None) -> KVStore:
  """An empty store (zeros, never `jnp.empty`: unused slots must not hold NaN garbage)."""
  num_layers = config.num_layers if num_layers is None else num_layers
  slots = config.memory.capacity_chunks
  lead = (num_layers, batch_size, config.num_heads)
  full = (*lead, slots, config.tokens_per_chunk, config.head_dim)
  pooled = (*lead, slots * config.blocks_per_chunk, config.head_dim)
  layers = LayerKV(jnp.zeros(full, dtype), jnp.zeros(full, dtype), jnp.zeros(pooled, dtype), jnp.zeros(pooled, dtype))
  return KVStore(layers=layers, slot_chunk=jnp.full((slots,), -1, jnp.int32))


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
                chunk_index: int | Int[Array, ""], config: ModelConfig) -> LayerKV:
  """Stores chunk c's post-RoPE keys and values (block order) and their block means in its slot."""
  batch, tokens, heads, head_dim = k.shape
  block_tokens = config.memory.block_tokens
  blocks = tokens // block_tokens
  slot = slot_of_chunk(chunk_index, config.memory)

  def pool(x):
    return x.astype(jnp.float32).reshape(batch, heads, blocks, block_tokens, head_dim).mean(axis=3)

  def put(store, update, start):
    return jax.lax.dynamic_update_slice_in_dim(store, update.astype(store.dtype), start, axis=2)

  k_heads, v_heads = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  return LayerKV(
      k=put(layer.k, k_heads[:, :, None], slot),
      v=put(layer.v, v_heads[:, :, None], slot),
      k_pooled=put(layer.k_pooled, pool(k_heads), slot * blocks),
      v_pooled=put(layer.v_pooled, pool(v_heads), slot * blocks),
  )


def store_layer_chunk(layers: LayerKV, layer_index: Int[Array, ""], layer: LayerKV,
                      chunk_index: int | Int[Array, ""], config: ModelConfig) -> LayerKV:
  """Copies chunk c's slot (K/V and pooled entries) of one updated `layer` into the stacked `layers`.

  Only the slot is written, in place when `layers` is a scan carry; writing the whole layer back
  would copy every slot of the history on every call.
  """
  slot = slot_of_chunk(chunk_index, config.memory)
  blocks = config.blocks_per_chunk

  def put(stacked, updated, start, size, axis):
    part = jax.lax.dynamic_slice_in_dim(updated, start, size, axis=axis)
    starts = [jnp.int32(0)] * stacked.ndim
    starts[0], starts[axis + 1] = jnp.asarray(layer_index, jnp.int32), jnp.asarray(start, jnp.int32)
    return jax.lax.dynamic_update_slice(stacked, part[None].astype(stacked.dtype), starts)

  return LayerKV(k=put(layers.k, layer.k, slot, 1, 2), v=put(layers.v, layer.v, slot, 1, 2),
                 k_pooled=put(layers.k_pooled, layer.k_pooled, slot * blocks, blocks, 2),
                 v_pooled=put(layers.v_pooled, layer.v_pooled, slot * blocks, blocks, 2))

