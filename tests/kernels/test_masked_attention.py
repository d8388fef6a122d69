"""Masked attention (the dense branches on gathered slots) against a float64 oracle: the XLA
reference, and Pallas splash attention (the TPU backend) in interpret mode. cuDNN is checked on GPUs
through the model (tests/kernels/test_dense_branches_gpu.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimem_kernels.masked_attention import api, pallas_splash_tpu
from tests.kernels.selection_attention_suite import relative_error


def oracle(q, keys, values, key_mask):
  """[b, n, h, d] float64 softmax over the valid keys (heads-major keys)."""
  logits = np.einsum("bnhd,bhmd->bhnm", q.astype(np.float64), keys.astype(np.float64)) / np.sqrt(q.shape[-1])
  logits = np.where(key_mask, logits, -np.inf)
  weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
  weights /= weights.sum(axis=-1, keepdims=True)
  return np.einsum("bhnm,bhmd->bnhd", weights, values.astype(np.float64))


def make_case(seed, tokens=200, rows=300, batch=2, heads=2, head_dim=64):
  """Scattered valid keys (not a prefix: splash needs no order), token and row counts off the blocks."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, tokens, heads, head_dim)).astype(np.float32)
  keys, values = (rng.standard_normal((batch, heads, rows, head_dim)).astype(np.float32) for _ in range(2))
  key_mask = rng.random(rows) < 0.6
  key_mask[[0, rows - 1]] = [False, True]  # an invalid first key, a valid last one
  return q, keys, values, key_mask


@pytest.mark.parametrize("implementation", ["xla", "splash"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_oracle(implementation, dtype):
  if implementation == "splash" and jax.default_backend() not in ("cpu", "tpu"):
    pytest.skip("splash is a TPU kernel (interpret mode on CPU)")
  q, keys, values, key_mask = make_case(0)
  cast = lambda x: jnp.asarray(x, dtype)
  with jax.default_matmul_precision("highest"):
    out = api.masked_attention(cast(q), cast(keys), cast(values), jnp.asarray(key_mask), implementation=implementation)
  assert out.shape == q.shape and out.dtype == dtype
  rounded = [np.asarray(cast(x), np.float64) for x in (q, keys, values)]
  assert relative_error(out, oracle(*rounded, key_mask)) < (1e-5 if dtype == jnp.float32 else 1e-2)


def test_splash_over_several_blocks():
  """128-row blocks: 3 query blocks and 3 key blocks, the last of each padded."""
  q, keys, values, key_mask = make_case(1, tokens=300, rows=330)
  out = pallas_splash_tpu.masked_attention(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values),
                                           jnp.asarray(key_mask), scale=q.shape[-1] ** -0.5, block_q=128,
                                           block_kv=128, interpret=True)
  assert relative_error(out, oracle(q, keys, values, key_mask)) < 1e-5


def test_bad_inputs_raise_clear_errors():
  q, keys, values, key_mask = (jnp.asarray(x) for x in make_case(2))
  with pytest.raises(ValueError, match="unknown masked attention implementation"):
    api.masked_attention(q, keys, values, key_mask, implementation="flash")
  with pytest.raises(ValueError, match=r"key_mask \[m\]"):
    api.masked_attention(q, keys, values, key_mask[:-1])
  with pytest.raises(ValueError, match="head_dim as q"):
    api.masked_attention(q, keys[:, :1], values[:, :1], key_mask)
