"""The XLA reference backend of the block top-k against the shared suite, plus the op's dispatcher."""

import jax.numpy as jnp
import numpy as np
import pytest

from omnimem_kernels.block_topk import api
from tests.kernels.block_topk_suite import SHAPES, BlockTopKSuite, make_inputs


class TestXlaBlockTopK(BlockTopKSuite):
  IMPLEMENTATION = "xla"


def test_default_preference_lists():
  assert api.default_implementations("cpu") == ("xla",)
  assert api.default_implementations("gpu") == api.default_implementations("gpu_hopper") == ("triton", "xla")
  assert api.default_implementations("tpu") == ("xla",)


def test_unknown_implementation_is_refused():
  qbar, k_pooled, candidates = (jnp.asarray(x) for x in make_inputs(0, *SHAPES["tiny"][:-1]))
  unknown = r"unknown block_topk implementation\(s\) \['cuda'\]; known: \['triton', 'xla'\]"
  with pytest.raises(ValueError, match=unknown):
    api.block_top_k(qbar, k_pooled, candidates, top_k=4, divisor=4.0, implementation="cuda")


def test_triton_refuses_shapes_and_dispatch_falls_through():
  """head_dim 24 is not a power of two: the Triton kernel refuses and XLA answers."""
  qbar, k_pooled, candidates = (jnp.asarray(x) for x in make_inputs(1, 1, 2, 3, 24, 20, 0.8))
  with pytest.raises(NotImplementedError, match="power-of-two head_dim"):
    api.block_top_k(qbar, k_pooled, candidates, top_k=4, divisor=4.0, implementation="triton", interpret=True)
  ids = api.block_top_k(qbar, k_pooled, candidates, top_k=4, divisor=4.0, implementation=("triton", "xla"),
                        interpret=True)
  np.testing.assert_array_equal(ids, api.block_top_k(qbar, k_pooled, candidates, top_k=4, divisor=4.0,
                                                     implementation="xla"))


@pytest.mark.parametrize("change, match", [
    (lambda q, k, c: (q[0], k, c), "qbar must be"),
    (lambda q, k, c: (q, k[:, :1], c), "same batch, heads and d"),
    (lambda q, k, c: (q, k, c[:-1]), "candidates must be a bool"),
    (lambda q, k, c: (q, k, c.astype(np.int32)), "candidates must be a bool"),
])
def test_bad_inputs_raise_clear_errors(change, match):
  qbar, k_pooled, candidates = change(*make_inputs(0, *SHAPES["tiny"][:-1]))
  with pytest.raises(ValueError, match=match):
    api.block_top_k(jnp.asarray(qbar), jnp.asarray(k_pooled), jnp.asarray(candidates), top_k=4, divisor=4.0)
  with pytest.raises(ValueError, match="top_k must be >= 1"):
    api.block_top_k(*(jnp.asarray(x) for x in make_inputs(0, *SHAPES["tiny"][:-1])), top_k=0, divisor=4.0)
