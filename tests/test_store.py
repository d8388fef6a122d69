"""KV store: allocation, ring slots, writes, pooling, last-write-wins, eviction."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.configs import tiny
from omnimem_jax.memory import store


def random_chunk(config, rng, batch=2):
  shape = (batch, config.tokens_per_chunk, config.num_heads, config.head_dim)
  return (jnp.asarray(rng.standard_normal(shape), jnp.float32), jnp.asarray(rng.standard_normal(shape), jnp.float32))


def test_init_store_shapes_zeros_and_empty_slots():
  config = tiny(capacity_chunks=5)
  kv = store.init_store(config, batch_size=2, dtype=jnp.bfloat16)
  assert kv.layers.k.shape == (2, 4, 2, 5, 96, 16)  # [B, H, L, S, T, D]
  assert kv.layers.k_pooled.shape == (2, 4, 2, 5 * 24, 16)
  assert kv.layers.k.dtype == jnp.bfloat16
  assert all(not np.asarray(x).any() for x in jax.tree.leaves(kv.layers))
  np.testing.assert_array_equal(kv.slot_chunk, -np.ones(5))


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
