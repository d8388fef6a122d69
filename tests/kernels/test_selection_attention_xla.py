"""The XLA reference backend against the shared suite, plus the dispatcher's behaviour."""

import jax.numpy as jnp
import numpy as np
import pytest

from omnimem_kernels.selection_attention import api
from tests.kernels.selection_attention_suite import SHAPES, SelectionAttentionSuite, make_inputs, oracle


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
