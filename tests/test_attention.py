"""The attention core's compile-once property, its input errors and its debug checks.

Numerical agreement with the float64 oracle lives in test_attention_oracle.py.
"""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from omnimem_kernels.backends import Backends
from tests.configs import tiny
from omnimem_jax.memory import store
from omnimem_jax.model.attention import chunk_self_attention


def chunk_inputs(config, seed, batch=2):
  rng = np.random.default_rng(seed)
  shape = (batch, config.tokens_per_chunk, config.num_heads, config.head_dim)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
  gates = jnp.asarray(rng.standard_normal((*shape[:3], 3)), jnp.float32)
  return q, k, v, gates


def empty_layer(config, batch=2, dtype=jnp.float32):
  kv = store.init_store(config, batch, dtype, num_layers=1)
  return store.layer_kv(kv.layers, 0), kv.tables


@pytest.mark.parametrize("mode", ["omnimem", "window", "sink_window", "dense"])
def test_step_compiles_once_as_the_chunk_index_grows(mode):
  config = tiny(mode=mode, local_attn_frames=6, capacity_chunks=4)  # ring reuse from chunk 4 on

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(q, k, v, layer, tables, chunk_index, gates):
    out, layer, _ = chunk_self_attention(q, k, v, layer, tables, chunk_index, gates, config)
    return out, layer, store.assign(tables, chunk_index, config.memory)

  layer, tables = empty_layer(config)
  for chunk in range(7):
    q, k, v, gates = chunk_inputs(config, chunk)
    out, layer, tables = step(q, k, v, layer, tables, jnp.int32(chunk), gates if mode == "omnimem" else None)
    assert np.isfinite(np.asarray(out)).all()
  chex.clear_trace_counter()


@pytest.mark.parametrize("mode", ["omnimem", "sink_window", "dense"])
def test_bf16_store_and_activations(mode):
  """bf16 runs end to end; where no top-k decision can flip (dense branches only) it tracks f32."""
  config = tiny(mode=mode)
  results = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    layer, tables = empty_layer(config, dtype=dtype)
    for chunk in range(5):
      q, k, v, gates = (x.astype(dtype) for x in chunk_inputs(config, chunk))
      gates = gates if mode == "omnimem" else None
      out, layer, _ = chunk_self_attention(q, k, v, layer, tables, chunk, gates, config)
      tables = store.assign(tables, chunk, config.memory)
    assert out.dtype == dtype and layer.k.dtype == dtype and layer.k_pooled.dtype == dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()
    results[dtype] = np.asarray(out, np.float32)
  if mode != "omnimem":
    err = np.linalg.norm(results[jnp.bfloat16] - results[jnp.float32]) / np.linalg.norm(results[jnp.float32])
    assert err < 2e-2


@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "q": a["q"][0]}, r"q must be \[batch, 96 tokens, 4 heads, 16\]"),
    (lambda a: {**a, "k": a["k"][:, :95]}, r"k must be \[batch, 96 tokens"),
    (lambda a: {**a, "v": a["v"][:, :, :3]}, r"v must be .* got \(2, 96, 3, 16\)"),
    (lambda a: {**a, "q": a["q"][:1]}, "q, k, v batch sizes differ"),
    (lambda a: {**a, "layer": jax.tree.map(lambda x: x[:, :2], a["layer"])}, r"store field k must be \[batch, 4 heads"),
    (lambda a: {**a, "layer": jax.tree.map(lambda x: x[:1], a["layer"])}, "store batch 1 != query batch 2"),
    (lambda a: {**a, "tables": store.SlotTables(a["tables"].full[:3], a["tables"].recent, a["tables"].pooled)},
     r"slot table full must be \[8\]"),
    (lambda a: {**a, "chunk_index": jnp.array([1, 2])}, "chunk_index must be a scalar"),
    (lambda a: {**a, "chunk_index": -1}, "chunk_index must be >= 0"),
    (lambda a: {**a, "gate_logits": None}, "omnimem mode needs gate_logits of shape"),
    (lambda a: {**a, "gate_logits": a["gate_logits"][..., :2]}, r"got \(2, 96, 4, 2\)"),
    (lambda a: {**a, "config": tiny(mode="dense")}, "dense mode has no gates"),
    (lambda a: {**a, "backends": Backends(dense="flash")}, r"unknown dense backend\(s\) \['flash'\]"),
])
def test_bad_inputs_raise_clear_errors(change, match):
  config = tiny()
  q, k, v, gates = chunk_inputs(config, 0)
  layer, tables = empty_layer(config)
  args = dict(q=q, k=k, v=v, layer=layer, tables=tables, chunk_index=0, gate_logits=gates, config=config)
  with pytest.raises(ValueError, match=match):
    chunk_self_attention(**change(args))


def test_debug_checks_reach_the_selection_kernel_under_jit(monkeypatch):
  """With debug_checks the ids handed to the kernel are range-checked (checkify under jit)."""
  from omnimem_jax.model import attention

  config = tiny(debug_checks=True, capacity_chunks=4)
  q, k, v, gates = chunk_inputs(config, 1)
  layer, tables = empty_layer(config)
  step = checkify.checkify(jax.jit(lambda *a: chunk_self_attention(*a, config)[0]))
  error, _ = step(q, k, v, layer, tables, jnp.int32(1), gates)
  error.throw()  # the ids handed to the kernel are in range
  num_blocks = config.memory.capacity_chunks * config.blocks_per_chunk
  original = attention.full_resolution_ids
  monkeypatch.setattr(attention, "full_resolution_ids", lambda *args: original(*args) + num_blocks)
  step = checkify.checkify(jax.jit(lambda *a: chunk_self_attention(*a, config)[0]))
  error, _ = step(q, k, v, layer, tables, jnp.int32(1), gates)
  with pytest.raises(checkify.JaxRuntimeError, match=r"block ids must lie in \[-1, 96\)"):
    error.throw()


@pytest.mark.parametrize("mode", ["omnimem", "window", "dense"])
def test_stacked_store_in_place_equals_one_layer_store(mode):
  """With `layer_index` the core writes into and reads from the stacked [B, H, L, ...] store (the
  selection kernel at a block offset); it must match the same history held as one layer's store."""
  config = tiny(mode=mode, local_attn_frames=6, capacity_chunks=4)
  rng = np.random.default_rng(3)
  stacked = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32),
                         store.init_store(config, 2, jnp.float32, num_layers=3).layers)
  held = jnp.array([4, 1, 2, 3], jnp.int32)  # chunk 5 reuses slot 1; chunk 0 was evicted
  tables = store.SlotTables(full=held, recent=jnp.zeros((0,), jnp.int32), pooled=held)
  q, k, v, gates = chunk_inputs(config, seed=9)
  gates = gates if mode == "omnimem" else None
  with jax.default_matmul_precision("highest"):  # no TF32 on GPUs: eager and jitted orders must agree
    expected_out, expected_layer, expected_ids = chunk_self_attention(q, k, v, store.layer_kv(stacked, 2), tables,
                                                                      5, gates, config)
    out, layers, ids = jax.jit(lambda s: chunk_self_attention(q, k, v, s, tables, 5, gates, config,
                                                              layer_index=jnp.int32(2)))(stacked)
  np.testing.assert_allclose(out, expected_out, rtol=1e-6, atol=1e-6)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # noqa: E731 (jit vs eager pooling)
  jax.tree.map(close, store.layer_kv(layers, 2), expected_layer)
  jax.tree.map(np.testing.assert_array_equal, store.layer_kv(layers, 0), store.layer_kv(stacked, 0))
  if mode == "omnimem":  # layer-local ids, whichever store they came from
    np.testing.assert_array_equal(ids, expected_ids)
    assert int(np.max(ids)) < config.memory.capacity_chunks * config.blocks_per_chunk
  else:
    assert ids is None and expected_ids is None
