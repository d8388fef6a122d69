"""Masked attention against the shared suite: the XLA reference, and Pallas splash attention (the
TPU backend) in interpret mode on CPU; plus the op's dispatcher and input errors. cuDNN runs the
suite on GPUs (test_masked_attention_gpu.py)."""

import jax
import jax.numpy as jnp
import pytest

from omnimem_kernels.masked_attention import api, pallas_splash_tpu
from tests.kernels.masked_attention_suite import MaskedAttentionSuite, make_case, oracle
from tests.kernels.selection_attention_suite import relative_error


class TestXlaMaskedAttention(MaskedAttentionSuite):
  IMPLEMENTATION = "xla"


@pytest.mark.skipif(jax.default_backend() not in ("cpu", "tpu"), reason="splash is a TPU kernel (interpret on CPU)")
class TestSplashMaskedAttention(MaskedAttentionSuite):
  IMPLEMENTATION = "splash"


def test_splash_over_several_blocks():
  """128-row blocks: 3 query blocks and 3 key blocks, the last of each padded."""
  q, keys, values, key_mask = make_case(1, tokens=300, rows=330)
  out = pallas_splash_tpu.masked_attention(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values),
                                           jnp.asarray(key_mask), scale=q.shape[-1] ** -0.5, block_q=128,
                                           block_kv=128, interpret=True)
  assert relative_error(out, oracle(q, keys, values, key_mask)) < 1e-5


def test_default_preference_lists():
  assert api.default_implementations("cpu") == api.default_implementations("tpu") == ("xla",)
  assert api.default_implementations("gpu") == api.default_implementations("gpu_hopper") == ("cudnn", "xla")


def test_cudnn_refuses_off_gpu_and_dispatch_falls_through():
  q, keys, values, key_mask = (jnp.asarray(x) for x in make_case(5))
  if jax.default_backend() != "gpu":
    with pytest.raises(NotImplementedError, match="cudnn: cuDNN attention runs on NVIDIA GPUs"):
      api.masked_attention(q, keys, values, key_mask, implementation="cudnn")
  with jax.default_matmul_precision("highest"):
    out = api.masked_attention(q, keys, values, key_mask, implementation=("cudnn", "xla"))
    expected = api.masked_attention(q, keys, values, key_mask, implementation="xla")
  assert relative_error(out, expected) < 1e-6


def test_bad_inputs_raise_clear_errors():
  q, keys, values, key_mask = (jnp.asarray(x) for x in make_case(2))
  with pytest.raises(ValueError, match=r"unknown masked_attention implementation\(s\) \['flash'\]"):
    api.masked_attention(q, keys, values, key_mask, implementation="flash")
  with pytest.raises(ValueError, match=r"key_mask must be a bool \[300\]"):
    api.masked_attention(q, keys, values, key_mask[:-1])
  with pytest.raises(ValueError, match="head_dim as q"):
    api.masked_attention(q, keys[:, :, :1], values[:, :, :1], key_mask)
  with pytest.raises(ValueError, match="not both"):
    api.masked_attention(q, keys, values, key_mask, key_length=3)
  with pytest.raises(ValueError, match=r"key_length must lie in \[0, 300\]"):
    api.masked_attention(q, keys, values, key_length=301)
