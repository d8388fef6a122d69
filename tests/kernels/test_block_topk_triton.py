"""The scoring + top-k Triton kernels against the shared suite (interpret mode on CPU; on a GPU too)
and against `select_blocks`' XLA path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimem_jax.memory import select
from omnimem_jax.memory.store import assign_slot
from tests.configs import plain_tables, tiny
from tests.kernels.block_topk_suite import BlockTopKSuite


class TestTritonInterpret(BlockTopKSuite):
  IMPLEMENTATION = "triton"
  INTERPRET = True


@pytest.mark.gpu
class TestTritonGpu(BlockTopKSuite):
  IMPLEMENTATION = "triton"
  INTERPRET = False


def _scores(q, k_pooled, config, tables, chunk):
  scores = np.asarray(select.block_scores(q, k_pooled, config.memory.group_size))
  return np.where(np.asarray(select.candidate_blocks(tables, chunk, config)), scores, -np.inf)


def _assert_same_selection(ids, expected, scores):
  """Equal ids, except where two candidates' scores tie to f32 rounding (then either may win)."""
  ids, expected = np.asarray(ids), np.asarray(expected)
  for row in np.argwhere((ids != expected).any(axis=-1)):
    got, want, s = ids[tuple(row)], expected[tuple(row)], scores[tuple(row)]
    got_s = np.where(got >= 0, s[np.maximum(got, 0)], -np.inf)
    want_s = np.where(want >= 0, s[np.maximum(want, 0)], -np.inf)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("chunk, capacity", [(1, 8), (5, 8), (11, 6)])  # AWE warm-up, in order, ring wrapped
def test_matches_xla_top_k(chunk, capacity, dtype):
  config = tiny(capacity_chunks=capacity)
  rng = np.random.default_rng(chunk)
  q = jnp.asarray(rng.standard_normal((2, config.num_heads, config.tokens_per_chunk, config.head_dim)), jnp.float32)
  blocks = capacity * config.blocks_per_chunk
  k_pooled = jnp.asarray(rng.standard_normal((2, config.num_heads, blocks, config.head_dim)), dtype)
  slot_chunk = jnp.asarray([c if c <= chunk else -1 for c in range(capacity)], jnp.int32)
  if chunk >= capacity:
    slot_chunk = jnp.arange(chunk - capacity + 1, chunk + 1, dtype=jnp.int32)
  tables = plain_tables(assign_slot(slot_chunk, chunk, config.memory))
  ids = select.select_blocks(q, k_pooled, tables, chunk, config, implementation="triton", interpret=True)
  expected = select.select_blocks(q, k_pooled, tables, chunk, config, implementation="xla")
  assert ids.shape == expected.shape and ids.dtype == jnp.int32
  _assert_same_selection(ids, expected, _scores(q, k_pooled, config, tables, chunk))


def test_real_head_dim_and_top_k_with_ties():
  base = tiny(capacity_chunks=8)
  config = dataclasses.replace(base, dim=128 * 2, num_heads=2, memory=dataclasses.replace(base.memory, top_k=16))
  rng = np.random.default_rng(0)
  # Small integers: many exactly tied scores, so "lower id wins" is exercised.
  q = jnp.asarray(rng.integers(-1, 2, (1, 2, config.tokens_per_chunk, 128)), jnp.float32)
  k_pooled = jnp.asarray(rng.integers(-2, 3, (1, 2, 8 * config.blocks_per_chunk, 128)), jnp.bfloat16)
  tables = plain_tables(list(range(8)))
  ids = select.select_blocks(q, k_pooled, tables, 7, config, implementation="triton", interpret=True)
  expected = select.select_blocks(q, k_pooled, tables, 7, config, implementation="xla")
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(expected))


def test_unknown_implementation_is_refused():
  config = tiny()
  with pytest.raises(ValueError, match=r"unknown block_topk implementation\(s\) \['cuda'\]"):
    select.select_blocks(jnp.zeros((1, config.num_heads, config.tokens_per_chunk, config.head_dim)),
                         jnp.zeros((1, config.num_heads, 8 * config.blocks_per_chunk, config.head_dim)),
                         plain_tables(list(range(8))), 3, config, implementation="cuda")


@pytest.mark.gpu
def test_gpu_kernel_matches_xla_at_the_real_shape():
  from omnimem_jax.config import ModelConfig

  base = ModelConfig()
  config = dataclasses.replace(base, memory=dataclasses.replace(base.memory, capacity_chunks=10))
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((1, 12, config.tokens_per_chunk, 128)), jnp.bfloat16)
  k_pooled = jnp.asarray(rng.standard_normal((1, 12, 10 * config.blocks_per_chunk, 128)), jnp.bfloat16)
  tables = plain_tables(list(range(10)))
  ids = select.select_blocks(q, k_pooled, tables, 9, config, implementation="triton")
  expected = select.select_blocks(q, k_pooled, tables, 9, config, implementation="xla")
  _assert_same_selection(ids, expected, _scores(q, k_pooled, config, tables, 9))



@pytest.mark.parametrize("integers", [False, True])  # integers: exact ties across tiles
def test_many_tiles_match_lax_top_k(integers):
  from omnimem_kernels.block_topk import pallas_triton

  rng = np.random.default_rng(3)
  draw = (lambda shape: rng.integers(-2, 3, shape)) if integers else rng.standard_normal
  qbar = jnp.asarray(draw((1, 2, 20, 16)), jnp.float32)
  k_pooled = jnp.asarray(draw((1, 2, 600, 16)), jnp.bfloat16)  # 38 tiles of 16
  candidates = jnp.asarray(rng.random(600) < 0.8)
  ids = pallas_triton.block_top_k(qbar, k_pooled, candidates, top_k=16, divisor=4.0, interpret=True, tile=16)
  scores = jnp.einsum("bhgd,bhjd->bhgj", qbar, k_pooled.astype(jnp.float32), precision="highest") / 4.0
  _, expected = jax.lax.top_k(jnp.where(candidates, scores, -jnp.inf), 16)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(jnp.where(candidates[expected], expected, -1)))


@pytest.mark.parametrize("integers", [False, True])  # integers: exact ties, also at the tile-maxima bound
@pytest.mark.parametrize("candidate_fraction", [0.8, 0.02])  # 0.02: fewer than top_k candidates
def test_many_tiles_prune_by_the_tile_maxima_bound(integers, candidate_fraction):
  from omnimem_kernels.block_topk import pallas_triton

  rng = np.random.default_rng(3)
  draw = (lambda shape: rng.integers(-2, 3, shape)) if integers else rng.standard_normal
  qbar = jnp.asarray(draw((2, 2, 37, 16)), jnp.float32)
  k_pooled = jnp.asarray(draw((2, 2, 600, 16)), jnp.bfloat16)  # 38 tiles of 16, the last one partial
  candidates = jnp.asarray(rng.random(600) < candidate_fraction)
  ids = pallas_triton.block_top_k(qbar, k_pooled, candidates, top_k=16, divisor=4.0, interpret=True, rows=16,
                                  tile=16)
  scores = jnp.einsum("bhgd,bhjd->bhgj", qbar, k_pooled.astype(jnp.float32), precision="highest") / 4.0
  _, expected = jax.lax.top_k(jnp.where(candidates, scores, -jnp.inf), 16)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(jnp.where(candidates[expected], expected, -1)))
