"""KV store: allocation, ring slots, writes, pooling, last-write-wins, eviction."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.configs import tiny
from omnimem_jax.memory import store
from omnimem_kernels import kv_quant


def random_chunk(config, rng, batch=2):
  shape = (batch, config.tokens_per_chunk, config.num_heads, config.head_dim)
  return (jnp.asarray(rng.standard_normal(shape), jnp.float32), jnp.asarray(rng.standard_normal(shape), jnp.float32))


def test_init_store_shapes_zeros_and_empty_slots():
  config = tiny(capacity_chunks=5)
  kv = store.init_store(config, batch_size=2, dtype=jnp.bfloat16)
  assert kv.layers.k.shape == (2, 4, 2, 5, 96, 16)  # [B, H, L, S, T, D]
  assert kv.layers.k_pooled.shape == (2, 4, 2, 5 * 24, 16)
  assert kv.layers.k.dtype == jnp.bfloat16 and kv.layers.kv_format == "bf16"
  assert kv.layers.k_scale.shape == (2, 4, 2, 0) and kv.layers.k_recent.shape == (2, 4, 2, 0, 96, 16)
  assert all(not np.asarray(x).any() for x in jax.tree.leaves(kv.layers))
  np.testing.assert_array_equal(kv.slot_chunk, -np.ones(5))
  assert kv.tables.recent.shape == (0,) and kv.tables.pooled.shape == (5,)


@pytest.mark.parametrize("kv_format, dtype, stored_d", [("fp8", jnp.uint8, 16), ("int4", jnp.uint8, 8)])
def test_compact_store_shapes(kv_format, dtype, stored_d):
  config = tiny(capacity_chunks=5, pooled_chunks=9)
  kv = store.init_store(config, batch_size=2, kv_format=kv_format)
  layers = kv.layers
  assert layers.k.shape == (2, 4, 2, 5, 96, stored_d) and layers.k.dtype == dtype and layers.kv_format == kv_format
  assert layers.k_scale.shape == (2, 4, 2, 5 * 24) and layers.k_scale.dtype == jnp.float32
  assert layers.k_recent.shape == (2, 4, 2, 3, 96, 16) and layers.k_recent.dtype == jnp.bfloat16
  assert layers.k_pooled.shape == (2, 4, 2, 9 * 24, 16)
  assert [t.shape for t in (kv.tables.full, kv.tables.recent, kv.tables.pooled)] == [(5,), (3,), (9,)]
  assert len({id(x) for x in jax.tree.leaves(layers)}) == 8  # separate buffers: each is donated


def test_compact_formats_serve_omnimem_only():
  with pytest.raises(ValueError, match="compact KV store.*window mode.*use bf16"):
    store.init_store(tiny(mode="window"), 1, kv_format="fp8")
  with pytest.raises(ValueError, match="unknown KV format 'fp16'"):
    store.init_store(tiny(), 1, kv_format="fp16")


@pytest.mark.parametrize("memory, expected", [
    (dict(capacity_chunks=4), [0, 1, 2, 3, 0, 1, 2, 3, 0]),
    (dict(mode="sink_window", capacity_chunks=4, local_attn_frames=12, sink_frames=3), [0, 1, 2, 3, 1, 2, 3, 1, 2]),
])
def test_slot_of_chunk_ring_with_pinned_prefix(memory, expected):
  config = tiny(**memory)
  np.testing.assert_array_equal(store.slot_of_chunk(jnp.arange(9), config.memory), expected)


def test_write_chunk_places_keys_and_block_means():
  config = tiny(capacity_chunks=4)
  rng = np.random.default_rng(1)
  layer = store.layer_kv(store.init_store(config, 2, jnp.float32).layers, 0)
  k, v = random_chunk(config, rng)
  layer = jax.jit(store.write_chunk, static_argnums=4)(layer, k, v, jnp.int32(6), config)  # slot 2
  k_np = np.asarray(k).transpose(0, 2, 1, 3)
  np.testing.assert_array_equal(np.asarray(layer.k[:, :, 2]), k_np)
  np.testing.assert_array_equal(np.asarray(layer.v[:, :, 2]), np.asarray(v).transpose(0, 2, 1, 3))
  for block in range(config.blocks_per_chunk):
    mean = k_np[:, :, 4 * block:4 * block + 4].mean(axis=2)
    np.testing.assert_allclose(np.asarray(layer.k_pooled[:, :, 2 * 24 + block]), mean, rtol=1e-6, atol=1e-6)
  others = np.delete(np.asarray(layer.k), 2, axis=2)
  assert not others.any()


def test_last_write_of_a_chunk_wins():
  config = tiny()
  rng = np.random.default_rng(2)
  layer = store.layer_kv(store.init_store(config, 1, jnp.float32).layers, 0)
  for _ in range(5):
    k, v = random_chunk(config, rng, batch=1)
    layer = store.write_chunk(layer, k, v, 3, config)
  np.testing.assert_array_equal(np.asarray(layer.k[:, :, 3]), np.asarray(k).transpose(0, 2, 1, 3))
  np.testing.assert_array_equal(np.asarray(layer.v[:, :, 3]), np.asarray(v).transpose(0, 2, 1, 3))


def test_ring_reuse_evicts_oldest_and_never_a_window_chunk():
  config = tiny(capacity_chunks=3)  # the minimum for a 3-chunk sliding window
  slot_chunk = jnp.full((3,), -1, jnp.int32)
  for chunk in range(10):
    slot_chunk = store.assign_slot(slot_chunk, chunk, config.memory)
    held = set(np.asarray(slot_chunk).tolist())
    window = {c for c in range(chunk - 2, chunk + 1) if c >= 0}
    assert window <= held, (chunk, held)
  assert sorted(np.asarray(slot_chunk).tolist()) == [7, 8, 9]


def test_sink_slot_is_never_reused():
  config = tiny(mode="sink_window", capacity_chunks=4)
  slot_chunk = jnp.full((4,), -1, jnp.int32)
  for chunk in range(12):
    slot_chunk = store.assign_slot(slot_chunk, chunk, config.memory)
  np.testing.assert_array_equal(slot_chunk, [0, 10, 11, 9])


def test_check_layer_reports_capacity_mismatch():
  config = tiny(capacity_chunks=4)
  layer = store.layer_kv(store.init_store(tiny(capacity_chunks=5), 1, jnp.float32).layers, 0)
  with pytest.raises(ValueError, match=r"store field k must be \[batch, 4 heads, 4, 96, 16\].*capacity_chunks=4"):
    store.check_layer(layer, config)


def test_write_into_the_stacked_store_touches_only_that_layer_and_slot():
  config = tiny(capacity_chunks=4)
  rng = np.random.default_rng(0)
  stacked = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32),
                         store.init_store(config, 2, jnp.float32, num_layers=3).layers)
  shape = (2, config.tokens_per_chunk, config.num_heads, config.head_dim)
  k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
  expected = store.write_chunk(store.layer_kv(stacked, 1), k, v, 6, config)  # chunk 6 -> slot 2
  result = store.write_chunk(stacked, k, v, 6, config, layer_index=jnp.int32(1))
  for name in ("k", "v", "k_pooled", "v_pooled"):
    np.testing.assert_array_equal(getattr(store.layer_kv(result, 1), name), getattr(expected, name))
    for other in (0, 2):
      np.testing.assert_array_equal(getattr(store.layer_kv(result, other), name),
                                    getattr(store.layer_kv(stacked, other), name))
  assert not np.array_equal(result.k[:, :, 1, 2], stacked.k[:, :, 1, 2])


def test_tiers_ring_independently():
  config = tiny(capacity_chunks=4, pooled_chunks=6)
  tables = store.written_tables(config.memory, 9, "fp8")  # chunks 0..8, assigned in order
  np.testing.assert_array_equal(tables.full, [8, 5, 6, 7])
  np.testing.assert_array_equal(tables.recent, [6, 7, 8])
  np.testing.assert_array_equal(tables.pooled, [6, 7, 8, 3, 4, 5])
  np.testing.assert_array_equal(store.resident(tables, jnp.array([3, 4, 5, 8, -1]), config.memory),
                                [False, False, True, True, False])


@pytest.mark.parametrize("kv_format", ["fp8", "int4"])
def test_write_chunk_fills_every_tier_of_a_compact_store(kv_format):
  config = tiny(capacity_chunks=4, pooled_chunks=6)
  rng = np.random.default_rng(3)
  layer = store.layer_kv(store.init_store(config, 2, jnp.float32, kv_format=kv_format).layers, 0)
  k, v = random_chunk(config, rng)
  layer = jax.jit(store.write_chunk, static_argnums=4)(layer, k, v, jnp.int32(7), config)  # slot 3, ring 1, pooled 1
  blocks, bt = config.blocks_per_chunk, config.memory.block_tokens
  for name, x in (("k", k), ("v", v)):
    heads_major = np.asarray(x).transpose(0, 2, 1, 3)
    expected = heads_major.reshape(2, 4, blocks, bt, 16)
    _, scale = kv_quant.quantize(jnp.asarray(expected), kv_format)
    stored_scale = getattr(layer, name + "_scale")[:, :, 3 * blocks:4 * blocks]
    np.testing.assert_allclose(stored_scale, scale, rtol=1e-6)  # XLA may divide by amax differently under jit
    stored = getattr(layer, name)[:, :, 3].reshape(2, 4, blocks, bt, -1)
    error = np.abs(np.asarray(kv_quant.dequantize(stored, stored_scale, kv_format)) - expected)
    bound = np.asarray(stored_scale)[..., None, None] * (0.5 if kv_format == "int4" else 16.0)  # half a step
    assert (error <= bound).all()
    np.testing.assert_array_equal(getattr(layer, name + "_recent")[:, :, 1], heads_major)
    means = heads_major.reshape(2, 4, blocks, bt, 16).mean(axis=3)
    np.testing.assert_allclose(getattr(layer, name + "_pooled")[:, :, blocks:2 * blocks], means, rtol=1e-6, atol=1e-6)
    assert not np.delete(np.asarray(getattr(layer, name)), 3, axis=2).view(np.uint8).any()
    assert not np.delete(np.asarray(getattr(layer, name + "_recent")), 1, axis=2).any()
