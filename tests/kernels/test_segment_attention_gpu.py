"""GPU backends of segment attention against the shared suite (cuDNN on any NVIDIA GPU, the Mosaic
GPU kernel on Hopper), and the Mosaic kernel's key splits; skipped elsewhere."""

import jax.numpy as jnp
import numpy as np
import pytest

from omnimem_kernels.segment_attention import pallas_mosaic_gpu
from tests.kernels.segment_attention_suite import CASES, SegmentAttentionSuite, make_case, oracle, require_backend
from tests.kernels.selection_attention_suite import relative_error


@pytest.mark.gpu
class TestCudnnSegmentAttention(SegmentAttentionSuite):
  IMPLEMENTATION = "cudnn"
  DTYPES = (jnp.bfloat16,)  # cuDNN flash attention takes 16-bit inputs


@pytest.mark.gpu
class TestMosaicGpuSegmentAttention(SegmentAttentionSuite):
  IMPLEMENTATION = "mosaic_gpu"
  DTYPES = (jnp.bfloat16,)

  @pytest.fixture(autouse=True)
  def _hopper_only(self):
    require_backend("mosaic_gpu")


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("splits", [None, 1, 2, 5])  # None: the default; 5 leaves some CTAs no key step
def test_mosaic_gpu_matches_oracle(name, seed, splits):
  require_backend("mosaic_gpu")
  q, keys, values, starts, count, length = make_case(seed, name)
  rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (q, keys, values)]
  bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
  out = pallas_mosaic_gpu.segment_attention(bf16(q), bf16(keys), bf16(values), jnp.asarray(starts), jnp.int32(count),
                                            jnp.int32(length), scale=q.shape[-1] ** -0.5, splits=splits)
  assert out.dtype == jnp.bfloat16 and out.shape == q.shape
  if count:
    assert relative_error(out, oracle(*rounded, starts, count, length)) < 1e-2
  else:
    assert not np.asarray(out, np.float32).any()
