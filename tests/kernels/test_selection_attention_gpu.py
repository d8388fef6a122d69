"""GPU runs of the Pallas Triton and Mosaic GPU kernels against the float64 oracle (skipped on CPU).

`test_window_geometry` is pure Python and runs everywhere.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimem_kernels.selection_attention import api, pallas_mosaic_gpu
from tests.kernels.selection_attention_suite import SHAPES, SelectionAttentionSuite, make_inputs, oracle, relative_error

gpu = pytest.mark.gpu


@gpu
class TestTritonGpu(SelectionAttentionSuite):
  IMPLEMENTATION = "triton"


MOSAIC_SHAPES = {
    # batch, heads, groups, group_size, num_blocks, block_tokens, head_dim, top_k
    "twelve_heads": SHAPES["twelve_heads"],  # the real 30-token blocks, 12 heads, top-16 (2 groups: padded to 4)
    # 16 blocks of 30 tokens, top-16: every group lists the last blocks, whose windows are clamped to the store's
    # end; batch 2, 8 groups (2 CTAs per head)
    "store_end_30_token_blocks": (2, 12, 8, 15, 16, 30, 128, 16),
    "twelve_heads_32_token_blocks": (2, 12, 8, 15, 40, 32, 128, 16),
    "few_blocks_16_token_blocks": (1, 2, 4, 15, 6, 16, 64, 8),
}


def _bf16(x):
  return jnp.asarray(x, jnp.bfloat16)


def _check_against_oracle(inputs, out, lse):
  q, k_blocks, v_blocks, ids = inputs
  rounded = [np.asarray(_bf16(x), np.float32) for x in (q, k_blocks, v_blocks)]
  expected_out, expected_lse = oracle(*rounded, ids)
  assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
  assert relative_error(out, expected_out) < 1e-2
  assert relative_error(lse, expected_lse) < 1e-2
  assert np.array_equal(np.isneginf(np.asarray(lse)), np.isneginf(expected_lse))
  empty = ids[-1, 0, -1]  # make_inputs leaves this group without a valid id
  assert (empty == -1).all()
  group_size = q.shape[2] // ids.shape[2]
  assert not np.asarray(out, np.float32)[-1, 0, -group_size:].any()


@gpu
@pytest.mark.parametrize("shape", sorted(MOSAIC_SHAPES))
@pytest.mark.parametrize("seed", [0, 1])
def test_mosaic_gpu_matches_oracle(shape, seed):
  inputs = make_inputs(seed, *MOSAIC_SHAPES[shape])
  q, k_blocks, v_blocks, ids = inputs
  num_blocks = k_blocks.shape[2]
  assert (ids[0, 0, 0, :2] == [0, num_blocks - 1]).all() and (ids[0, -1, 1, 1:3] == 2).all()  # ends, a duplicate
  assert (ids == -1).any()
  out, lse = api.selection_attention(_bf16(q), _bf16(k_blocks), _bf16(v_blocks), jnp.asarray(ids),
                                     implementation="mosaic_gpu")
  _check_against_oracle(inputs, out, lse)


@gpu
@pytest.mark.parametrize("geometry", [dict(fetch_rows=48), dict(slot_rows=48), dict(fetch_rows=48, slot_rows=48),
                                      dict(stages=1), dict(stages=6)])
def test_mosaic_gpu_window_geometries(geometry):
  """Non-default windows of 30-token blocks: 48-row windows, four 48-row slots per 192-key step (partly
  or wholly filled), one stage, six stages."""
  inputs = make_inputs(7, *MOSAIC_SHAPES["store_end_30_token_blocks"])
  q, k_blocks, v_blocks, ids = inputs
  out, lse = pallas_mosaic_gpu.selection_attention(_bf16(q), _bf16(k_blocks), _bf16(v_blocks), jnp.asarray(ids),
                                                   scale=1 / np.sqrt(q.shape[-1]), **geometry)
  _check_against_oracle(inputs, out, lse)


@gpu
@pytest.mark.parametrize("case", ["f32_inputs", "store_rows_not_8_aligned"])
def test_mosaic_gpu_refuses_and_dispatch_falls_through(case):
  if case == "f32_inputs":
    inputs = make_inputs(2, *SHAPES["twelve_heads"])
    q, k_blocks, v_blocks = (jnp.asarray(x) for x in inputs[:3])
    match = "16-bit float"
  else:
    inputs = make_inputs(2, 1, 2, 4, 15, 7, 30, 128, 4)  # 7 x 30 = 210 rows: not whole 8-row TMA tiles
    q, k_blocks, v_blocks = (_bf16(x) for x in inputs[:3])
    match = "multiple of 8"
  ids = jnp.asarray(inputs[3])
  with pytest.raises(NotImplementedError, match=match):
    api.selection_attention(q, k_blocks, v_blocks, ids, implementation="mosaic_gpu")
  out, _ = api.selection_attention(q, k_blocks, v_blocks, ids)
  rounded = [np.asarray(x, np.float32) for x in (q, k_blocks, v_blocks)]
  assert relative_error(out, oracle(*rounded, inputs[3])[0]) < 1e-2


@gpu
def test_hopper_prefers_triton_then_mosaic_gpu():
  if jax.devices()[0].compute_capability != "9.0":
    pytest.skip("not a Hopper GPU")
  assert api.default_implementations() == ("triton", "mosaic_gpu", "xla")


def test_window_geometry():
  """(fetch_rows, slot_rows, per_step): aligned windows hold a block at any 8-aligned offset."""
  assert pallas_mosaic_gpu.window_geometry(30, 16) == (40, 64, 1)  # offsets 0, 2, 4, 6: 36 rows -> 40
  assert pallas_mosaic_gpu.window_geometry(30, 16, slot_rows=48) == (40, 48, 4)  # 4 slots: a 192-key step
  assert pallas_mosaic_gpu.window_geometry(30, 16, fetch_rows=48) == (48, 64, 1)
  assert pallas_mosaic_gpu.window_geometry(24, 16) == (24, 32, 2)  # 64-key steps before smaller slots
  assert pallas_mosaic_gpu.window_geometry(32, 16) == (32, 32, 2)  # aligned blocks: offset 0
  assert pallas_mosaic_gpu.window_geometry(16, 8) == (16, 16, 4)
  assert pallas_mosaic_gpu.window_geometry(4, 16) == (8, 8, 8)
  with pytest.raises(NotImplementedError, match="window geometry"):
    pallas_mosaic_gpu.window_geometry(30, 16, fetch_rows=32)  # a block at offset 6 would not fit
  with pytest.raises(NotImplementedError, match="window geometry"):
    pallas_mosaic_gpu.window_geometry(253, 16)  # 253 + 7 rows: no window within the QK wgmma's 256 keys
