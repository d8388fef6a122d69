"""cuDNN dense branches (gathered rows, valid rows first, length-masked) against the XLA path, on a GPU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimem_kernels.backends import Backends
from omnimem_jax.memory import store
from omnimem_jax.model.attention import chunk_self_attention
from tests.configs import tiny
from tests.kernels.selection_attention_suite import relative_error

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mode", ["omnimem", "window", "sink_window", "dense"])
def test_cudnn_dense_branches_match_xla_through_ring_reuse(mode):
  config = dataclasses.replace(tiny(mode=mode, local_attn_frames=6, capacity_chunks=4), dim=256)  # head_dim 64
  kv = store.init_store(config, 2, jnp.bfloat16, num_layers=1)
  layer, tables = store.layer_kv(kv.layers, 0), kv.tables
  step = jax.jit(lambda *args, dense: chunk_self_attention(*args, config, backends=Backends(selection="xla",
                                                                                             dense=dense))[:2],
                 static_argnames="dense")
  rng = np.random.default_rng(0)
  shape = (2, config.tokens_per_chunk, config.num_heads, config.head_dim)
  for chunk in range(7):  # the ring wraps from chunk 4 on
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(3))
    gates = jnp.asarray(rng.standard_normal((*shape[:3], 3)), jnp.float32) if mode == "omnimem" else None
    expected, _ = step(q, k, v, layer, tables, jnp.int32(chunk), gates, dense="xla")
    out, layer = step(q, k, v, layer, tables, jnp.int32(chunk), gates, dense="cudnn")
    tables = store.assign(tables, chunk, config.memory)
    assert relative_error(out, expected) < 1e-2, chunk
