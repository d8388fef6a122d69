"""Shared correctness suite for every block top-k backend (subclass per backend).

Each backend's test module subclasses `BlockTopKSuite` and sets IMPLEMENTATION (and INTERPRET for
Pallas backends run on CPU). The oracle ranks the candidates by float64 scores, ties to the lower id.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimem_kernels.block_topk import api


def oracle_scores(qbar, k_pooled, divisor):
  """[b, h, g, blocks] float64 scores qbar . kbar / divisor."""
  return np.einsum("bhgd,bhjd->bhgj", np.asarray(qbar, np.float64), np.asarray(k_pooled, np.float64)) / divisor


def oracle(qbar, k_pooled, candidates, top_k, divisor):
  """[b, h, g, top_k] ids: candidates by (-score, id), -1 past the candidates."""
  scores = oracle_scores(qbar, k_pooled, divisor)
  ids = np.full((*scores.shape[:3], top_k), -1)
  allowed = np.flatnonzero(candidates)
  for row in np.ndindex(*scores.shape[:3]):
    ranked = sorted(allowed, key=lambda block: (-scores[row][block], block))[:top_k]
    ids[row][:len(ranked)] = ranked
  return ids


def check_against_oracle(ids, qbar, k_pooled, candidates, top_k, divisor, exact: bool, tolerance: float = 0.0):
  """ids equal the oracle's where `exact`; otherwise a differing row may only swap near-tied blocks:
  its valid ids are distinct candidates, best first, as many as the oracle's, and each one scores
  within `tolerance` of the oracle's choice at its rank."""
  ids = np.asarray(ids)
  expected = oracle(qbar, k_pooled, candidates, top_k, divisor)
  assert ids.shape == expected.shape and ids.dtype == np.int32
  if exact:
    np.testing.assert_array_equal(ids, expected)
    return
  scores = oracle_scores(qbar, k_pooled, divisor)
  for row in np.argwhere((ids != expected).any(axis=-1)):
    row = tuple(row)
    got, want = ids[row], expected[row]
    np.testing.assert_array_equal(got < 0, want < 0)  # as many valid ids, padding last
    valid = got[got >= 0]
    assert len(set(valid.tolist())) == len(valid) and candidates[valid].all(), (row, got)
    np.testing.assert_allclose(scores[row][valid], scores[row][want[want >= 0]], rtol=0, atol=tolerance)


def make_inputs(seed, batch, heads, groups, head_dim, blocks, candidate_fraction, integers=False, dtype=np.float32):
  """Group-mean queries, pooled keys, candidates (first block excluded, last one included)."""
  rng = np.random.default_rng(seed)
  draw = (lambda shape: rng.integers(-2, 3, shape).astype(np.float32)) if integers else (
      lambda shape: rng.standard_normal(shape).astype(np.float32))
  qbar = draw((batch, heads, groups, head_dim))
  k_pooled = np.array(jnp.asarray(draw((batch, heads, blocks, head_dim)), dtype).astype(jnp.float32))
  candidates = rng.random(blocks) < candidate_fraction
  candidates[[0, -1]] = [False, True]
  return qbar, k_pooled, candidates


SHAPES = {
    # batch, heads, groups, head_dim, blocks, candidate_fraction, top_k
    "tiny": (2, 3, 5, 16, 40, 0.7, 4),
    "few_candidates": (1, 2, 4, 16, 48, 0.1, 8),  # fewer candidates than top_k: -1 padding
    "top_k_over_blocks": (1, 2, 3, 16, 6, 1.0, 8),  # more ids asked than blocks exist
    "real_geometry": (1, 12, 6, 128, 240, 0.8, 16),  # the model's head_dim and top_k
}


class BlockTopKSuite:
  IMPLEMENTATION: str = "xla"
  INTERPRET: bool | None = None

  def run(self, qbar, k_pooled, candidates, *, top_k, divisor, k_dtype=jnp.float32):
    return api.block_top_k(jnp.asarray(qbar), jnp.asarray(k_pooled, k_dtype), jnp.asarray(candidates), top_k=top_k,
                           divisor=divisor, implementation=self.IMPLEMENTATION, interpret=self.INTERPRET)

  @pytest.mark.parametrize("shape", sorted(SHAPES))
  @pytest.mark.parametrize("seed", [0, 1])
  def test_matches_oracle(self, shape, seed):
    *dims, top_k = SHAPES[shape]
    qbar, k_pooled, candidates = make_inputs(seed, *dims)
    divisor = float(np.sqrt(np.float32(dims[3])))
    ids = jax.jit(lambda *x: self.run(*x, top_k=top_k, divisor=divisor))(qbar, k_pooled, candidates)
    check_against_oracle(ids, qbar, k_pooled, candidates, top_k, divisor, exact=False, tolerance=1e-5)

  @pytest.mark.parametrize("shape", sorted(SHAPES))
  def test_exact_ties_go_to_the_lower_id(self, shape):
    """Small-integer inputs: scores are exact in float32 and many tie, so the id order decides."""
    *dims, top_k = SHAPES[shape]
    qbar, k_pooled, candidates = make_inputs(2, *dims, integers=True)
    ids = self.run(qbar, k_pooled, candidates, top_k=top_k, divisor=4.0)
    check_against_oracle(ids, qbar, k_pooled, candidates, top_k, 4.0, exact=True)

  def test_duplicate_blocks_keep_both_lower_id_first(self):
    """Two blocks with the same pooled key (and the best score) both make the top-k, lower id first."""
    qbar, k_pooled, candidates = make_inputs(3, *SHAPES["tiny"][:-1])
    qbar[:] = qbar[:, :, :1]
    k_pooled[:, :, 30] = k_pooled[:, :, 7] = 4.0 * qbar[:, :, 0]
    candidates[[7, 30]] = True
    ids = np.asarray(self.run(qbar, k_pooled, candidates, top_k=4, divisor=4.0))
    np.testing.assert_array_equal(ids[..., :2], np.broadcast_to([7, 30], ids[..., :2].shape))
    check_against_oracle(ids, qbar, k_pooled, candidates, 4, 4.0, exact=False, tolerance=1e-5)

  def test_no_candidate_gives_all_minus_one(self):
    qbar, k_pooled, candidates = make_inputs(4, *SHAPES["tiny"][:-1])
    ids = np.asarray(self.run(qbar, k_pooled, np.zeros_like(candidates), top_k=4, divisor=4.0))
    np.testing.assert_array_equal(ids, -1)

  def test_bf16_pooled_keys(self):
    """The store's bf16 pooled keys, scored in float32 (the oracle sees the same bf16 values)."""
    *dims, top_k = SHAPES["real_geometry"]
    qbar, k_pooled, candidates = make_inputs(5, *dims, dtype=jnp.bfloat16)
    ids = self.run(qbar, k_pooled, candidates, top_k=top_k, divisor=float(np.sqrt(np.float32(128))),
                   k_dtype=jnp.bfloat16)
    check_against_oracle(ids, qbar, k_pooled, candidates, top_k, float(np.sqrt(np.float32(128))), exact=False,
                         tolerance=1e-5)

  @pytest.mark.parametrize("shape", ["tiny", "few_candidates"])  # few_candidates: -1 padded ids
  def test_differentiable_functions_of_the_ids(self, shape):
    """The op sits inside a differentiated function (training differentiates the rollout): the ids carry
    no gradient, the gathered keys and the queries do. Integer inputs: exact scores, so every backend
    picks the XLA reference's ids and the gradients are equal bit for bit."""
    *dims, top_k = SHAPES[shape]
    qbar, k_pooled, candidates = (jnp.asarray(x) for x in make_inputs(6, *dims, integers=True))

    def selected_score(qbar, k_pooled, implementation):
      """sum of qbar . k_pooled[id] over each row's valid ids."""
      ids = api.block_top_k(qbar, k_pooled, candidates, top_k=top_k, divisor=4.0, implementation=implementation,
                            interpret=self.INTERPRET)
      chosen = jnp.take_along_axis(k_pooled[:, :, None], jnp.maximum(ids, 0)[..., None], axis=3)  # [b, h, g, k, d]
      return jnp.sum(jnp.where(ids[..., None] >= 0, chosen * qbar[:, :, :, None], 0.0))

    gradient = jax.jit(jax.value_and_grad(selected_score, argnums=(0, 1)), static_argnums=2)
    value, (d_qbar, d_k_pooled) = gradient(qbar, k_pooled, self.IMPLEMENTATION)
    expected_value, (expected_d_qbar, expected_d_k_pooled) = gradient(qbar, k_pooled, "xla")
    assert float(value) == float(expected_value) and np.abs(d_k_pooled).sum() > 0
    np.testing.assert_array_equal(d_qbar, expected_d_qbar)
    np.testing.assert_array_equal(d_k_pooled, expected_d_k_pooled)
