"""GPU runs of the Pallas Triton and Mosaic GPU kernels against the float64 oracle (skipped on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.selection_attention import api
from tests.kernels.selection_attention_suite import SHAPES, SelectionAttentionSuite, make_inputs, oracle, relative_error

pytestmark = pytest.mark.gpu


class TestTritonGpu(SelectionAttentionSuite):
  IMPLEMENTATION = "triton"


MOSAIC_SHAPES = {
    # batch, heads, groups, group_size, num_blocks, block_tokens, head_dim, top_k
    "twelve_heads_32_token_blocks": (2, 12, 8, 15, 40, 32, 128, 16),
    "few_blocks_16_token_blocks": (1, 2, 4, 15, 6, 16, 64, 8),
}


def _bf16(x):
  return jnp.asarray(x, jnp.bfloat16)


@pytest.mark.parametrize("shape", sorted(MOSAIC_SHAPES))
@pytest.mark.parametrize("seed", [0, 1])
def test_mosaic_gpu_matches_oracle(shape, seed):
  q, k_blocks, v_blocks, ids = make_inputs(seed, *MOSAIC_SHAPES[shape])
  out, lse = api.selection_attention(_bf16(q), _bf16(k_blocks), _bf16(v_blocks), jnp.asarray(ids),
                                     implementation="mosaic_gpu")
  rounded = [np.asarray(_bf16(x), np.float32) for x in (q, k_blocks, v_blocks)]
  expected_out, expected_lse = oracle(*rounded, ids)
  assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
  assert relative_error(out, expected_out) < 1e-2
  assert relative_error(lse, expected_lse) < 1e-2
  assert np.array_equal(np.isneginf(np.asarray(lse)), np.isneginf(expected_lse))
  empty = ids[-1, 0, -1]  # make_inputs leaves this group without a valid id
  assert (empty == -1).all()
  group_size = MOSAIC_SHAPES[shape][3]
  assert not np.asarray(out, np.float32)[-1, 0, -group_size:].any()


def test_mosaic_gpu_refuses_unaligned_blocks_and_dispatch_falls_through():
  inputs = make_inputs(2, *SHAPES["twelve_heads"])  # 30-token blocks: TMA starts not 8-row aligned
  q, k_blocks, v_blocks = (_bf16(x) for x in inputs[:3])
  with pytest.raises(NotImplementedError, match="mosaic_gpu"):
    api.selection_attention(q, k_blocks, v_blocks, jnp.asarray(inputs[3]), implementation="mosaic_gpu")
  out, _ = api.selection_attention(q, k_blocks, v_blocks, jnp.asarray(inputs[3]))
  rounded = [np.asarray(x, np.float32) for x in (q, k_blocks, v_blocks)]
  assert relative_error(out, oracle(*rounded, inputs[3])[0]) < 1e-2


def test_hopper_prefers_mosaic_gpu():
  if jax.devices()[0].compute_capability != "9.0":
    pytest.skip("not a Hopper GPU")
  assert api.default_implementations() == ("mosaic_gpu", "triton", "xla")
