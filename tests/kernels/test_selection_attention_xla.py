"""The XLA reference backend against the shared suite, plus the dispatcher's behaviour."""

import jax.numpy as jnp
import numpy as np
import pytest

from omnimem_kernels import dispatch
from omnimem_kernels.selection_attention import api
from tests.kernels.selection_attention_suite import (SHAPES, SelectionAttentionSuite, make_compact_inputs, make_inputs,
                                                     oracle)


class TestXlaSelectionAttention(SelectionAttentionSuite):
  IMPLEMENTATION = "xla"


def test_default_preference_lists_end_in_xla():
  for platform in ("cpu", "gpu", "tpu"):
    assert api.default_implementations(platform)[-1] == "xla"
  assert api.default_implementations("cpu") == ("xla",)


def test_dispatch_falls_through_on_not_implemented(monkeypatch):
  calls = []

  def unsupported(*args, **kwargs):
    calls.append("unsupported")
    raise NotImplementedError("shape not supported")

  monkeypatch.setitem(api.IMPLEMENTATIONS, "unsupported", unsupported)
  inputs = make_inputs(0, *SHAPES["tiny"])
  out, _ = api.selection_attention(*map(jnp.asarray, inputs), implementation=("unsupported", "xla"))
  assert calls == ["unsupported"]
  np.testing.assert_allclose(np.asarray(out), oracle(*inputs)[0], rtol=1e-5, atol=1e-5)
  with pytest.raises(NotImplementedError, match="unsupported: shape not supported"):
    api.selection_attention(*map(jnp.asarray, inputs), implementation="unsupported")


def test_unknown_implementation_is_refused():
  inputs = map(jnp.asarray, make_inputs(0, *SHAPES["tiny"]))
  with pytest.raises(ValueError, match=r"unknown selection_attention implementation\(s\) \['cuda'\]; known: \['mosaic_gpu', 'mosaic_tpu', 'triton', 'xla'\]"):
    api.selection_attention(*inputs, implementation="cuda")


@pytest.mark.parametrize("change, match", [
    (lambda q, k, v, i: (q[0], k, v, i), "q must be"),
    (lambda q, k, v, i: (q, k, v[..., :8], i), "k_blocks and v_blocks must both be"),
    (lambda q, k, v, i: (q, k[:, :2], v[:, :2], i), "batch and head axes must agree"),
    (lambda q, k, v, i: (q[..., :8], k, v, i), "head_dim mismatch"),
    (lambda q, k, v, i: (q, k, v, i.astype(np.float32)), "ids must be an integer"),
    (lambda q, k, v, i: (q[:, :, :11], k, v, i), "must split evenly"),
])
def test_bad_shapes_raise_clear_errors(change, match):
  inputs = change(*make_inputs(0, *SHAPES["tiny"]))
  with pytest.raises(ValueError, match=match):
    api.selection_attention(*map(jnp.asarray, inputs))


def _fp8_scales_as(dtype, shape_slice=slice(None)):
  """A change of the tests below: the scales cast to `dtype`, their block axis sliced."""
  return lambda q, k, v, i, scales: (q, k, v, i, {name: x[..., shape_slice].astype(dtype)
                                                  for name, x in scales.items()})


@pytest.mark.parametrize("change, match", [
    (lambda q, k, v, i, scales: (q, k, v, i, {}), r"fp8 blocks need k_scale as float32\[2, 3, 12\].*got None"),
    (lambda q, k, v, i, scales: (q, k, v, i, dict(scales, v_scale=None)), "fp8 blocks need v_scale"),
    (_fp8_scales_as(jnp.float32, slice(0, 5)), r"need k_scale as float32\[2, 3, 12\].*got float32\[2, 3, 5\]"),
    (_fp8_scales_as(jnp.bfloat16), r"need k_scale as float32\[2, 3, 12\].*got bfloat16\[2, 3, 12\]"),
    (lambda q, k, v, i, scales: (q, k.astype(jnp.float32), v.astype(jnp.float32), i, scales),
     "plain float32 blocks take no k_scale"),
    (lambda q, k, v, i, scales: (q, k, v.astype(jnp.bfloat16), i, scales),
     "k_blocks and v_blocks must have one format"),
    (lambda q, k, v, i, scales: (q, k[..., :4], v[..., :4], i, scales),
     "no KV format stores uint8 rows of 4 for head_dim 16"),
    (lambda q, k, v, i, scales: (q[..., :15], k.astype(jnp.uint8)[..., :7], v.astype(jnp.uint8)[..., :7], i, scales),
     "int4 packs two values a byte along head_dim, which must be even; got 15"),
    (lambda q, k, v, i, scales: (q, k.astype(jnp.int8), v.astype(jnp.int8), i, scales), "no KV format stores int8"),
])
def test_bad_compact_inputs_raise_clear_errors(change, match):
  q, k_data, v_data, ids, scales = make_compact_inputs(0, "fp8", *SHAPES["tiny"])
  q, k_data, v_data, ids, scales = change(jnp.asarray(q), k_data, v_data, ids, scales)
  with pytest.raises(ValueError, match=match):
    api.selection_attention(q, k_data, v_data, jnp.asarray(ids), **scales)


def test_mosaic_gpu_refuses_compact_blocks_and_dispatch_falls_through():
  q, k_data, v_data, ids, scales = make_compact_inputs(1, "int4", *SHAPES["tiny"])
  with pytest.raises(NotImplementedError, match="compact blocks: use triton"):
    api.selection_attention(q, k_data, v_data, ids, implementation="mosaic_gpu", **scales)
  with dispatch.recording() as ran:
    out, _ = api.selection_attention(q, k_data, v_data, ids, implementation=("mosaic_gpu", "xla"), **scales)
  assert ran == {"selection_attention": {"xla"}}
  expected, _ = api.selection_attention(q, k_data, v_data, ids, implementation="xla", **scales)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
