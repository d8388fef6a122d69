"""Block selection: query-shared scores, Adaptive Window Exclusion, top-k ties and -1 padding."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.configs import tiny
from omnimem_jax.memory import select, store


def filled_tables(config, last_chunk):
  return store.written_tables(config.memory, last_chunk + 1)


def brute_force_ids(q, k_pooled, tables, chunk, config):
  """Per (b, h, g): candidates by the AWE rule among resident chunks, sorted by (-score, id), in float64."""
  memory = config.memory
  batch, heads, tokens, head_dim = q.shape
  groups = tokens // memory.group_size
  last = chunk - memory.exclude_window_chunks
  if memory.exclude_window_chunks == 0 or (memory.progressive_exclude and chunk < memory.exclude_window_chunks):
    last = chunk
  out = np.full((batch, heads, groups, memory.top_k), -1)
  pooled, full = np.asarray(tables.pooled), set(np.asarray(tables.full).tolist())
  for b in range(batch):
    for h in range(heads):
      for g in range(groups):
        qbar = q[b, h, g * memory.group_size:(g + 1) * memory.group_size].astype(np.float64).mean(axis=0)
        ranked = []
        for block in range(k_pooled.shape[2]):
          owner = pooled[block // config.blocks_per_chunk]
          if 0 <= owner <= last and owner in full:
            ranked.append((-(qbar @ k_pooled[b, h, block]) / np.sqrt(head_dim), block))
        chosen = [block for _, block in sorted(ranked)[:memory.top_k]]
        out[b, h, g, :len(chosen)] = chosen
  return out


def random_inputs(config, seed, batch=2):
  rng = np.random.default_rng(seed)
  slots = config.memory.pooled_slots * config.blocks_per_chunk
  q = rng.standard_normal((batch, config.num_heads, config.tokens_per_chunk, config.head_dim)).astype(np.float32)
  k_pooled = rng.standard_normal((batch, config.num_heads, slots, config.head_dim)).astype(np.float32)
  return q, k_pooled


@pytest.mark.parametrize("memory", [
    dict(),
    dict(exclude_window_chunks=0),
    dict(progressive_exclude=False),
    dict(group_size=1),
    dict(top_k=9, exclude_window_chunks=2),
    dict(capacity_chunks=4, pooled_chunks=7),  # chunks 0..c-4 of the pooled tier are evicted
])
@pytest.mark.parametrize("chunk", [0, 2, 3, 5, 9])
def test_select_blocks_matches_brute_force(memory, chunk):
  config = tiny(**memory)
  q, k_pooled = random_inputs(config, seed=chunk)
  tables = filled_tables(config, chunk)
  ids = jax.jit(select.select_blocks, static_argnums=4)(q, k_pooled, tables, jnp.int32(chunk), config)
  expected = brute_force_ids(q, k_pooled, tables, chunk, config)
  assert ids.shape == expected.shape and ids.dtype == jnp.int32
  np.testing.assert_array_equal(np.sort(np.asarray(ids), axis=-1), np.sort(expected, axis=-1))


def test_awe_switches_on_at_chunk_three():
  config = tiny()
  q, k_pooled = random_inputs(config, seed=7)
  per_chunk = config.blocks_per_chunk
  for chunk, allowed_chunks in ((0, {0}), (1, {0, 1}), (2, {0, 1, 2}), (3, {0}), (5, {0, 1, 2})):
    ids = np.asarray(select.select_blocks(q, k_pooled, filled_tables(config, chunk), chunk, config))
    assert (ids >= 0).all()
    assert set((ids // per_chunk).ravel().tolist()) <= allowed_chunks


def test_fewer_candidates_than_top_k_pads_with_minus_one():
  config = tiny(top_k=30)  # one chunk holds 24 blocks
  q, k_pooled = random_inputs(config, seed=3)
  ids = np.asarray(select.select_blocks(q, k_pooled, filled_tables(config, 0), 0, config))
  np.testing.assert_array_equal(ids[..., 24:], -1)
  np.testing.assert_array_equal(np.sort(ids[..., :24], axis=-1), np.broadcast_to(np.arange(24), ids[..., :24].shape))
  # No progressive exclusion: nothing is outside the window yet, so nothing is selected.
  strict = tiny(progressive_exclude=False)
  ids = np.asarray(select.select_blocks(q, k_pooled, filled_tables(strict, 2), 2, strict))
  np.testing.assert_array_equal(ids, -1)


def test_more_top_k_than_stored_blocks_pads():
  config = tiny(top_k=200, capacity_chunks=3)  # 72 blocks in the whole store
  q, k_pooled = random_inputs(config, seed=4)
  ids = np.asarray(select.select_blocks(q, k_pooled, filled_tables(config, 2), 2, config))
  assert ids.shape[-1] == 200
  np.testing.assert_array_equal(ids[..., 72:], -1)


def test_equal_scores_break_ties_to_the_lower_id_deterministically():
  config = tiny()
  q, k_pooled = random_inputs(config, seed=5)
  k_pooled[:] = k_pooled[:, :, :1]  # every block has the same pooled key -> all scores equal
  for chunk, first in ((2, 0), (4, 0)):
    ids = np.asarray(jax.jit(select.select_blocks, static_argnums=4)(
        q, k_pooled, filled_tables(config, chunk), jnp.int32(chunk), config))
    np.testing.assert_array_equal(ids, np.broadcast_to(np.arange(first, first + 4), ids.shape))
  # Two tied best blocks in chunk 1 beat everything else; the lower id comes first.
  q[:] = q[:, :, :1]  # every query (so every group mean) is the same vector w
  k_pooled[:, :, 30] = k_pooled[:, :, 40] = k_pooled[:, :, 0] + q[:, :, 0]  # score + |w|^2 / sqrt(d)
  ids = np.asarray(select.select_blocks(q, k_pooled, filled_tables(config, 2), 2, config))
  np.testing.assert_array_equal(ids[..., :2], np.broadcast_to([30, 40], ids[..., :2].shape))


def test_group_scores_are_mean_query_logits():
  config = tiny()
  q, k_pooled = random_inputs(config, seed=6)
  scores = np.asarray(select.block_scores(q, k_pooled, group_size=2))
  logits = np.einsum("bhnd,bhjd->bhnj", q.astype(np.float64), k_pooled.astype(np.float64)) / 4.0
  expected = logits.reshape(*logits.shape[:2], -1, 2, logits.shape[-1]).mean(axis=3)
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


def test_retrieval_distances_and_histogram():
  config = tiny(capacity_chunks=4)
  tables = filled_tables(config, 6)  # slots hold chunks [4, 5, 6, 3]
  per_chunk = config.blocks_per_chunk
  ids = jnp.array([[[[0 * per_chunk + 1, 3 * per_chunk, -1, 2 * per_chunk + 23]]]], jnp.int32)
  distances = select.retrieval_distances(ids, tables, 6, config)
  np.testing.assert_array_equal(distances, [[[[2, 3, -1, 0]]]])
  np.testing.assert_array_equal(select.retrieval_histogram(distances, max_distance=2), [1, 0, 2])
