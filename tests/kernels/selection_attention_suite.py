"""Shared correctness suite for every selection-attention backend (subclass per backend).

Each backend's test module subclasses `SelectionAttentionSuite` and sets IMPLEMENTATION (and
INTERPRET for Pallas twins run on CPU). The oracle is a float64 NumPy loop over explicit key lists;
for compact blocks it runs on their float64 dequantisation (`tests/kernels/kv_quant_oracle.py`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from omnimem_kernels import kv_quant
from omnimem_kernels.selection_attention import api
from tests.kernels import kv_quant_oracle


def oracle(q, k_blocks, v_blocks, ids):
  """o, lse per query: softmax over the concatenated keys of the listed blocks (repeats count)."""
  batch, heads, tokens, head_dim = q.shape
  groups = ids.shape[2]
  group_size = tokens // groups
  out = np.zeros(q.shape, np.float64)
  lse = np.full((batch, heads, tokens), -np.inf)
  for b in range(batch):
    for h in range(heads):
      for g in range(groups):
        listed = [block for block in ids[b, h, g] if block >= 0]
        if not listed:
          continue
        keys = np.concatenate([k_blocks[b, h, block] for block in listed]).astype(np.float64)
        values = np.concatenate([v_blocks[b, h, block] for block in listed]).astype(np.float64)
        rows = slice(g * group_size, (g + 1) * group_size)
        logits = q[b, h, rows].astype(np.float64) @ keys.T / np.sqrt(head_dim)
        peak = logits.max(axis=1, keepdims=True)
        weights = np.exp(logits - peak)
        out[b, h, rows] = weights @ values / weights.sum(axis=1, keepdims=True)
        lse[b, h, rows] = np.log(weights.sum(axis=1)) + peak[:, 0]
  return out, lse


def make_inputs(seed, batch, heads, groups, group_size, num_blocks, block_tokens, head_dim, top_k):
  """Random q/K/V; ids with -1 padding, a repeated id, both boundary ids and one empty group."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, heads, groups * group_size, head_dim)).astype(np.float32)
  k_blocks = rng.standard_normal((batch, heads, num_blocks, block_tokens, head_dim)).astype(np.float32)
  v_blocks = rng.standard_normal((batch, heads, num_blocks, block_tokens, head_dim)).astype(np.float32)
  ids = np.stack([np.pad(rng.permutation(num_blocks)[:top_k], (0, max(0, top_k - num_blocks)), constant_values=-1)
                  for _ in range(batch * heads * groups)])
  ids = ids.reshape(batch, heads, groups, top_k).astype(np.int32)
  ids[rng.random(ids.shape) < 0.25] = -1
  ids[0, 0, 0, :2] = [0, num_blocks - 1]
  ids[0, -1, 1, :3] = [num_blocks - 1, 2, 2]  # a repeated block
  ids[-1, 0, -1] = -1  # a group with no valid id
  return q, k_blocks, v_blocks, ids


def make_compact_inputs(seed, fmt, *shape):
  """make_inputs with K/V stored in `fmt`: (q, k_data, v_data, ids, scales), scales the kwargs k_scale,
  v_scale. Listed among the blocks: a block of zeros (scale 0; ids[0, 0, 0]) and an outlier block
  (ids[0, -1, 1], listed twice)."""
  q, k_blocks, v_blocks, ids = make_inputs(seed, *shape)
  for blocks in (k_blocks, v_blocks):
    blocks[0, 0, 0] = 0.0
    blocks[0, -1, 2, 1, 3] = 40.0 * np.abs(blocks[0, -1, 2]).max()
  (k_data, k_scale), (v_data, v_scale) = (kv_quant.quantize(jnp.asarray(x), fmt) for x in (k_blocks, v_blocks))
  assert k_scale[0, 0, 0] == 0 and (ids[0, 0, 0] == 0).any() and (ids[0, -1, 1] == 2).sum() == 2
  return q, k_data, v_data, ids, dict(k_scale=k_scale, v_scale=v_scale)


def dequantised(k_data, v_data, scales, fmt):
  """Float64 K and V values of compact blocks."""
  return (kv_quant_oracle.dequantize(np.asarray(data), np.asarray(scales[name]), fmt)
          for data, name in ((k_data, "k_scale"), (v_data, "v_scale")))


SHAPES = {
    # batch, heads, groups, group_size, num_blocks, block_tokens, head_dim, top_k
    "tiny": (2, 3, 6, 2, 12, 4, 16, 4),
    "real_tiles": (1, 2, 4, 15, 10, 30, 128, 6),  # 15-query groups, 30-token blocks, d=128
    "more_slots_than_blocks": (1, 1, 2, 4, 3, 8, 16, 5),
    "twelve_heads": (1, 12, 2, 15, 20, 30, 128, 16),  # the real head count and top-k, few groups
}


def relative_error(out, expected) -> float:
  """||out - expected|| / ||expected|| over finite entries."""
  out, expected = np.asarray(out, np.float64), np.asarray(expected, np.float64)
  finite = np.isfinite(expected)
  return float(np.linalg.norm(out[finite] - expected[finite]) / np.linalg.norm(expected[finite]))


class SelectionAttentionSuite:
  IMPLEMENTATION: str = "xla"
  INTERPRET: bool = False

  def run(self, q, k_blocks, v_blocks, ids, **kwargs):
    return api.selection_attention(jnp.asarray(q), jnp.asarray(k_blocks), jnp.asarray(v_blocks),
                                   jnp.asarray(ids), implementation=self.IMPLEMENTATION,
                                   interpret=self.INTERPRET, **kwargs)

  @pytest.mark.parametrize("shape", sorted(SHAPES))
  @pytest.mark.parametrize("seed", [0, 1])
  def test_matches_oracle_f32(self, shape, seed):
    inputs = make_inputs(seed, *SHAPES[shape])
    out, lse = jax.jit(self.run)(*inputs)
    expected_out, expected_lse = oracle(*inputs)
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), expected_lse, rtol=1e-5, atol=1e-5)

  def test_f32_relative_error(self):
    inputs = make_inputs(6, *SHAPES["twelve_heads"])
    out, lse = self.run(*inputs)
    expected_out, expected_lse = oracle(*inputs)
    assert relative_error(out, expected_out) < 1e-5 and relative_error(lse, expected_lse) < 1e-5
    assert np.array_equal(np.isneginf(np.asarray(lse)), np.isneginf(expected_lse))

  def test_empty_group_gives_zero_output_and_minus_inf_lse(self):
    q, k_blocks, v_blocks, ids = make_inputs(3, *SHAPES["tiny"])
    ids[:] = -1
    ids[1, 2, 3, 0] = 5
    out, lse = self.run(q, k_blocks, v_blocks, ids)
    out, lse = np.asarray(out).reshape(2, 3, 6, 2, 16), np.asarray(lse).reshape(2, 3, 6, 2)
    assert np.isneginf(lse[0]).all() and not out[0].any()
    np.testing.assert_allclose(out[1, 2, 3], oracle(q, k_blocks, v_blocks, ids)[0][1, 2, 6:8], rtol=1e-5, atol=1e-5)

  def test_bf16_inputs(self):
    inputs = make_inputs(4, *SHAPES["real_tiles"])
    q, k_blocks, v_blocks, ids = inputs
    out, lse = self.run(q.astype(jnp.bfloat16), k_blocks.astype(jnp.bfloat16), v_blocks.astype(jnp.bfloat16), ids)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    expected_out, expected_lse = oracle(*inputs)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected_out, rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(np.asarray(lse), expected_lse, rtol=3e-2, atol=3e-2)
    rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (q, k_blocks, v_blocks)]
    assert relative_error(out, oracle(*rounded, ids)[0]) < 1e-2

  def test_out_of_range_ids_raise_under_check(self):
    q, k_blocks, v_blocks, ids = make_inputs(5, *SHAPES["tiny"])
    bad = ids.copy()
    bad[1, 1, 1, 1] = 12  # == num_blocks
    with pytest.raises(ValueError, match=r"block ids must lie in \[-1, 12\).*ids\[1, 1, 1, 1\] = 12"):
      self.run(q, k_blocks, v_blocks, bad, check_ids=True)
    bad[1, 1, 1, 1] = -2
    with pytest.raises(ValueError, match=r"ids\[1, 1, 1, 1\] = -2"):
      self.run(q, k_blocks, v_blocks, bad, check_ids=True)
    checked = checkify.checkify(jax.jit(lambda *args: self.run(*args, check_ids=True)))
    error, _ = checked(q, k_blocks, v_blocks, ids)
    error.throw()  # valid ids pass
    error, _ = checked(q, k_blocks, v_blocks, bad)
    with pytest.raises(checkify.JaxRuntimeError, match=r"block ids must lie in \[-1, 12\); found ids in \[-2, 11\]"):
      error.throw()

  @pytest.mark.parametrize("shape", ["tiny", "real_tiles"])
  @pytest.mark.parametrize("fmt", ["fp8", "int4"])
  def test_compact_blocks_match_oracle_and_reference(self, fmt, shape):
    """f32 queries over compact blocks: the oracle on the dequantised blocks, and the XLA reference on
    the same compact blocks to float32 rounding (-1 padding, a repeated id, an empty group, a zero block,
    an outlier block)."""
    q, k_data, v_data, ids, scales = make_compact_inputs(8, fmt, *SHAPES[shape])
    out, lse = jax.jit(self.run)(q, k_data, v_data, ids, **scales)
    expected_out, expected_lse = oracle(q, *dequantised(k_data, v_data, scales, fmt), ids)
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), expected_lse, rtol=1e-5, atol=1e-5)
    assert np.isneginf(np.asarray(lse)[-1, 0, -q.shape[2] // ids.shape[2]:]).all()  # the empty group
    reference_out, reference_lse = api.selection_attention(q, k_data, v_data, ids, implementation="xla", **scales)
    for result, reference in ((out, reference_out), (lse, reference_lse)):  # rounding: relative to the magnitudes
      reference = np.asarray(reference)
      atol = 2e-6 * np.abs(reference[np.isfinite(reference)]).max()
      np.testing.assert_allclose(np.asarray(result), reference, rtol=2e-6, atol=atol)

  @pytest.mark.parametrize("fmt", ["fp8", "int4"])
  def test_compact_blocks_bf16_queries(self, fmt):
    q, k_data, v_data, ids, scales = make_compact_inputs(9, fmt, *SHAPES["real_tiles"])
    out, lse = self.run(q.astype(jnp.bfloat16), k_data, v_data, ids, **scales)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    rounded_q = np.asarray(jnp.asarray(q, jnp.bfloat16), np.float32)
    expected_out, expected_lse = oracle(rounded_q, *dequantised(k_data, v_data, scales, fmt), ids)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected_out, rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(np.asarray(lse), expected_lse, rtol=3e-2, atol=3e-2)
    assert relative_error(out, expected_out) < 1e-2
