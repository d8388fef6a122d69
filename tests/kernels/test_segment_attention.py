"""Segment attention (the dense branches' op) against the shared suite on CPU backends (XLA, splash
in interpret mode), the Mosaic GPU kernel's CPU-checkable parts, and the model's dense branches on
every backend that runs here against XLA through ring reuse, a rewound store and a stacked store.
GPU backends run the suite in test_segment_attention_gpu.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimem_kernels import dispatch
from omnimem_kernels.backends import Backends
from omnimem_kernels.segment_attention import api, pallas_mosaic_gpu
from omnimem_jax.memory import store
from omnimem_jax.model import attention
from tests.configs import plain_tables, tiny
from tests.kernels.segment_attention_suite import SegmentAttentionSuite, make_case, oracle, require_backend
from tests.kernels.selection_attention_suite import relative_error


class TestXlaSegmentAttention(SegmentAttentionSuite):
  IMPLEMENTATION = "xla"


@pytest.mark.skipif(jax.default_backend() not in ("cpu", "tpu"), reason="splash is a TPU kernel (interpret on CPU)")
class TestSplashSegmentAttention(SegmentAttentionSuite):
  IMPLEMENTATION = "splash"


def _partial_softmax(q, keys, values, rows):
  """[b, n, h, d] normalised output and [b, h, n] base-2 log-sum-exp over the listed rows (float64)."""
  if not rows:
    return np.zeros(q.shape), np.full((q.shape[0], q.shape[2], q.shape[1]), -np.inf)
  logits = np.einsum("bnhd,bhmd->bhnm", q, keys[:, :, rows]) / np.sqrt(q.shape[-1])
  top = logits.max(axis=-1, keepdims=True)
  weights = np.exp(logits - top)
  total = weights.sum(axis=-1)
  out = np.einsum("bhnm,bhmd->bnhd", weights / total[..., None], values[:, :, rows])
  return out, (top[..., 0] + np.log(total)) / np.log(2)


def test_merge_partials_matches_one_softmax():
  """Partial results over disjoint key sets (one of them empty) merge to the softmax over their union."""
  q, keys, values, *_ = make_case(3, "slots")
  parts = [list(range(0, 100)), [], list(range(100, 130)) + list(range(400, 576))]
  outs, lses = zip(*(_partial_softmax(q, keys, values, rows) for rows in parts), strict=True)
  merged = pallas_mosaic_gpu.merge_partials(jnp.asarray(np.stack(outs), jnp.float32),
                                            jnp.asarray(np.stack(lses), jnp.float32))
  expected = _partial_softmax(q, keys, values, sum(parts, []))[0]
  assert relative_error(merged, expected) < 1e-5
  empty = pallas_mosaic_gpu.merge_partials(jnp.zeros((2, *q.shape)), jnp.full((2, q.shape[0], q.shape[2], q.shape[1]),
                                                                                -jnp.inf))
  assert not np.asarray(empty).any() and np.isfinite(np.asarray(empty)).all()


def test_default_splits_fill_the_waves():
  assert pallas_mosaic_gpu.default_splits(12 * 37, 132) == 2  # the real chunk on an H100: 4 waves -> 6.7
  assert pallas_mosaic_gpu.default_splits(132, 132) == 1  # exactly one wave
  assert pallas_mosaic_gpu.default_splits(264, 132) == 1
  assert pallas_mosaic_gpu.default_splits(8, 132) == 4  # a tiny grid: as many as allowed


def test_mosaic_gpu_refuses_what_its_tma_cannot_view():
  q, keys, values, *_ = make_case(2, "slots")
  bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
  for rows in (300, 64):  # not a multiple of 8; fewer rows than one key tile
    source = bf16(keys[:, :, :rows])
    with pytest.raises(NotImplementedError, match="TMA tiles"):  # checked before lowering: runs on CPU too
      pallas_mosaic_gpu.segment_attention(bf16(q), source, source, jnp.asarray([0]), jnp.int32(1), jnp.int32(32),
                                          scale=0.125)
  out = api.segment_attention(bf16(q), bf16(keys[:, :, :300]), bf16(values[:, :, :300]), jnp.asarray([0]), 1, 32,
                              implementation=("mosaic_gpu", "xla"))
  expected = api.segment_attention(bf16(q), bf16(keys[:, :, :300]), bf16(values[:, :, :300]), jnp.asarray([0]), 1,
                                   32, implementation="xla")
  assert np.array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))


def test_bad_inputs_raise_clear_errors():
  q, keys, values, starts, count, length = make_case(3, "slots")
  with pytest.raises(ValueError, match="keys and values must both be"):
    api.segment_attention(q, keys, values[:, :, :10], starts, count, length)
  with pytest.raises(ValueError, match="head_dim as q"):
    api.segment_attention(q, keys[:, :1], values[:, :1], starts, count, length)
  with pytest.raises(ValueError, match=r"starts must be \[segments\]"):
    api.segment_attention(q, keys, values, starts[None], count, length)
  with pytest.raises(ValueError, match=r"count must lie in \[0, 4\]"):
    api.segment_attention(q, keys, values, starts, 5, length)
  with pytest.raises(ValueError, match="3 segments of 96 rows exceed max_rows = 200"):
    api.segment_attention(q, keys, values, starts, count, length, max_rows=200)


def test_default_preference_lists():
  assert api.default_implementations("gpu_hopper") == ("mosaic_gpu", "cudnn", "xla")
  assert api.default_implementations("gpu") == ("cudnn", "xla")
  assert api.default_implementations("tpu") == ("splash", "xla")
  assert api.default_implementations("cpu") == ("xla",)


def test_default_backend_by_platform_and_dtype():
  """16-bit inputs take the platform's first backend; float32 falls through cuDNN and Mosaic to XLA."""
  q, keys, values, starts, count, length = make_case(4, "slots")
  platform = dispatch.platform_name()
  for dtype, expected in ((jnp.bfloat16, {"gpu_hopper": "mosaic_gpu", "gpu": "cudnn", "tpu": "splash"}),
                          (jnp.float32, {"tpu": "splash"})):
    cast = lambda x, dtype=dtype: jnp.asarray(x, dtype)  # noqa: E731
    with dispatch.recording() as ran:
      api.segment_attention(cast(q), cast(keys), cast(values), jnp.asarray(starts), count, length)
    assert ran["segment_attention"] == {expected.get(platform, "xla")}, dtype




def _config(mode, capacity_chunks=6):
  """head_dim 64; 6 slots: 144 pooled rows, enough for the Mosaic kernel's 128-row key tiles."""
  return dataclasses.replace(tiny(mode=mode, local_attn_frames=6, capacity_chunks=capacity_chunks), dim=256)


def _step(config):
  """chunk_self_attention (output and store) with XLA selection and the dense backend as a static argument."""
  return jax.jit(lambda *args, dense, **kwargs: attention.chunk_self_attention(
      *args, config, backends=Backends(selection="xla", dense=dense), **kwargs)[:2], static_argnames="dense")


@pytest.mark.parametrize("dense", ["mosaic_gpu", "cudnn", "splash"])
@pytest.mark.parametrize("mode", ["omnimem", "window", "sink_window", "dense"])
def test_dense_path_matches_xla_through_ring_reuse(mode, dense):
  """Each dense backend that runs here (bf16 on a GPU; f32 in splash's interpret mode on CPU) against
  the f32 XLA path on the same (bf16-rounded) inputs. The selection branch's gate is clipped shut
  (weight 4.5e-5): bf16 and f32 scores may pick different blocks, and the selection kernels are
  tested elsewhere."""
  require_backend(dense)
  config = _config(mode)
  dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  tolerance = 1e-2 if dtype == jnp.bfloat16 else 1e-5
  stores = {name: store.init_store(config, 2, d, num_layers=1) for name, d in (("tested", dtype), ("f32", jnp.float32))}
  layers = {name: store.layer_kv(kv.layers, 0) for name, kv in stores.items()}
  tables = stores["f32"].tables
  step = _step(config)
  rng = np.random.default_rng(0)
  shape = (2, config.tokens_per_chunk, config.num_heads, config.head_dim)
  for chunk in range(9):  # the ring wraps from chunk 6 on
    qkv = [jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3)]
    gates = None
    if mode == "omnimem":
      gates = jnp.asarray(rng.standard_normal((*shape[:3], 3)), jnp.float32).at[..., 1].set(-10.0)
    with jax.default_matmul_precision("highest"):  # the f32 expectation without TF32 on GPUs
      expected, layers["f32"] = step(*(x.astype(jnp.float32) for x in qkv), layers["f32"], tables,
                                     jnp.int32(chunk), gates, dense="xla")
    out, layers["tested"] = step(*qkv, layers["tested"], tables, jnp.int32(chunk), gates, dense=dense)
    tables = store.assign(tables, chunk, config.memory)
    assert out.dtype == dtype
    assert relative_error(out, expected) < tolerance, chunk


@pytest.mark.parametrize("dense", ["xla", "splash"])  # the f32 backends
def test_rewound_store_uses_one_segment_per_slot(dense):
  """Chunks 0..4 written into 4 slots (chunk 4 replaced chunk 0 in slot 0), then chunk 2 attends
  again: the slots holding chunks 0..2 are 1 and 2, not a prefix, so each is its own segment. Both
  dense branches read exactly slots 1 and 2 (float64 oracle over those rows)."""
  require_backend(dense)
  config = _config("omnimem", capacity_chunks=4)
  kv = store.init_store(config, 1, jnp.float32, num_layers=1)
  layer, tables = store.layer_kv(kv.layers, 0), kv.tables
  rng = np.random.default_rng(1)
  shape = (1, config.tokens_per_chunk, config.num_heads, config.head_dim)
  for chunk in range(5):
    layer = store.write_chunk(layer, *(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2)),
                              jnp.int32(chunk), config)
    tables = store.assign(tables, chunk, config.memory)
  q = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  blocks, tokens = config.blocks_per_chunk, config.tokens_per_chunk
  starts, count, length = attention.compressed_segments(tables.pooled, jnp.int32(2), blocks)
  assert (int(count), int(length)) == (2, blocks)  # one segment per slot, not a prefix
  assert sorted(np.asarray(starts)[:2].tolist()) == [blocks, 2 * blocks]
  recent = attention.attended_chunks(jnp.int32(2), config.memory)
  backends = Backends(dense=dense)
  rows = lambda x: np.asarray(x).reshape(1, config.num_heads, -1, config.head_dim)  # noqa: E731
  with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
    compressed = jax.jit(lambda q: attention.compressed_attention(q, layer, tables, jnp.int32(2),
                                                                  backends=backends))(q)
    sliding = jax.jit(lambda q: attention.chunk_attention(q, layer, tables, jnp.int32(2), recent, config.memory,
                                                          backends=backends))(q)
  q64 = np.asarray(q, np.float64)
  expected = oracle(q64, rows(layer.k_pooled), rows(layer.v_pooled), [blocks, 2 * blocks], 2, blocks)
  assert relative_error(compressed, expected) < 1e-5
  expected = oracle(q64, rows(layer.k), rows(layer.v), [tokens, 2 * tokens], 2, tokens)  # chunk 0 was evicted
  assert relative_error(sliding, expected) < 1e-5


@pytest.mark.parametrize("dense", ["xla", "splash", "cudnn", "mosaic_gpu"])
@pytest.mark.parametrize("mode", ["omnimem", "window"])
def test_stacked_store_read_in_place_matches_one_layer(mode, dense):
  """Layer 1 of a 3-layer store of random K/V, as the DiT runs it: the dense op reads the stacked
  store at layer 1's row offset (a wrong offset reads another layer's keys); expected: the same
  layer held as one layer's store, through f32 XLA."""
  require_backend(dense)
  config = _config(mode, capacity_chunks=5)
  dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  kv = store.init_store(config, 1, dtype, num_layers=3)
  rng = np.random.default_rng(3)
  layers = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), kv.layers)
  shape = (1, config.tokens_per_chunk, config.num_heads, config.head_dim)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))
  gates = jnp.asarray(rng.standard_normal((*shape[:3], 3)), jnp.float32).at[..., 1].set(-10.0) if mode == "omnimem" \
      else None
  tables = plain_tables([0, 1, 2, 3, -1])
  step = _step(config)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  with jax.default_matmul_precision("highest"):
    expected, _ = step(f32(q), f32(k), f32(v), jax.tree.map(f32, store.layer_kv(layers, 1)), tables, jnp.int32(4),
                       gates, dense="xla")
  out, _ = step(q, k, v, layers, tables, jnp.int32(4), gates, dense=dense, layer_index=jnp.int32(1))
  assert relative_error(out, expected) < (1e-2 if dtype == jnp.bfloat16 else 1e-5)
