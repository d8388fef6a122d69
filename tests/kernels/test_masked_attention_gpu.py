"""cuDNN masked attention against the shared suite (on a GPU; skipped elsewhere)."""

import jax.numpy as jnp
import pytest

from tests.kernels.masked_attention_suite import MaskedAttentionSuite


@pytest.mark.gpu
class TestCudnnMaskedAttention(MaskedAttentionSuite):
  IMPLEMENTATION = "cudnn"
  DTYPES = (jnp.bfloat16,)  # cuDNN flash attention takes 16-bit inputs
  TAKES_MASKS = False  # a count of leading valid keys
