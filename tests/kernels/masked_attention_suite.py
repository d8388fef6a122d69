"""Shared correctness suite for every masked-attention backend (subclass per backend).

Each backend's test module subclasses `MaskedAttentionSuite` and sets IMPLEMENTATION, DTYPES (what the
backend takes) and TAKES_MASKS (False for a backend that reads a count of leading valid keys only).
The oracle is a float64 softmax over the valid keys.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimem_kernels.masked_attention import api
from tests.kernels.selection_attention_suite import relative_error


def oracle(q, keys, values, key_mask):
  """[b, n, h, d] float64 softmax over the valid keys (tokens-major keys); zeros with none."""
  if not key_mask.any():
    return np.zeros(q.shape)
  logits = np.einsum("bnhd,bmhd->bhnm", q.astype(np.float64), keys.astype(np.float64)) / np.sqrt(q.shape[-1])
  logits = np.where(key_mask, logits, -np.inf)
  weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
  weights /= weights.sum(axis=-1, keepdims=True)
  return np.einsum("bhnm,bmhd->bnhd", weights, values.astype(np.float64))


def make_case(seed, tokens=200, rows=300, batch=2, heads=2, head_dim=64):
  """Scattered valid keys (not a prefix), token and row counts off the 128-row blocks; an invalid
  first key, a valid last one."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, tokens, heads, head_dim)).astype(np.float32)
  keys, values = (rng.standard_normal((batch, rows, heads, head_dim)).astype(np.float32) for _ in range(2))
  key_mask = rng.random(rows) < 0.6
  key_mask[[0, rows - 1]] = [False, True]
  return q, keys, values, key_mask


def tolerance(dtype) -> float:
  return 1e-5 if dtype == jnp.float32 else 1e-2


class MaskedAttentionSuite:
  IMPLEMENTATION: str = "xla"
  DTYPES: tuple = (jnp.float32, jnp.bfloat16)
  TAKES_MASKS: bool = True

  def run(self, q, keys, values, key_mask=None, *, dtype, **kwargs):
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
      return api.masked_attention(cast(q), cast(keys), cast(values), None if key_mask is None else jnp.asarray(
          key_mask), implementation=self.IMPLEMENTATION, **kwargs)

  def check(self, out, case, key_mask, dtype):
    q, keys, values, _ = case
    assert out.shape == q.shape and out.dtype == dtype
    rounded = [np.asarray(jnp.asarray(x, dtype), np.float64) for x in (q, keys, values)]
    expected = oracle(*rounded, key_mask)
    if key_mask.any():
      assert relative_error(out, expected) < tolerance(dtype)
    else:
      assert not np.asarray(out, np.float32).any()

  @pytest.mark.parametrize("dtype_index", [0, 1])
  @pytest.mark.parametrize("seed", [0, 1])
  def test_scattered_mask_matches_oracle(self, dtype_index, seed):
    if dtype_index >= len(self.DTYPES):
      pytest.skip("dtype not taken by this backend")
    dtype, case = self.DTYPES[dtype_index], make_case(seed)
    if not self.TAKES_MASKS:
      with pytest.raises(NotImplementedError, match="key_length"):
        self.run(*case, dtype=dtype)
      return
    self.check(self.run(*case, dtype=dtype), case, case[3], dtype)

  @pytest.mark.parametrize("key_length", [0, 1, 129, 300])  # none, the first key, past one block, all
  def test_leading_keys_match_oracle(self, key_length):
    dtype, case = self.DTYPES[-1], make_case(2)
    key_mask = np.arange(case[1].shape[1]) < key_length
    out = jax.jit(lambda *x, n: self.run(*x, dtype=dtype, key_length=n))(*case[:3], n=jnp.int32(key_length))
    self.check(out, case, key_mask, dtype)

  def test_every_key_without_a_mask(self):
    dtype, case = self.DTYPES[0], make_case(3, tokens=48, rows=520)
    self.check(self.run(*case[:3], dtype=dtype), case, np.ones(520, bool), dtype)

  def test_empty_mask_gives_zeros(self):
    if not self.TAKES_MASKS:
      pytest.skip("takes key counts only")
    dtype, case = self.DTYPES[0], make_case(4)
    key_mask = np.zeros(case[1].shape[1], bool)
    self.check(self.run(*case[:3], key_mask, dtype=dtype), case, key_mask, dtype)
