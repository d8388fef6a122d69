"""Segment attention (the dense branches' kernel) against a float64 oracle, and the model's
"mosaic_gpu" (and "splash") dense paths against its XLA path through ring reuse and a rewound store.

On CPU the "mosaic_gpu" dense path runs the XLA segment reference, which checks the segment
bookkeeping (slots, resident-first order, the compressed prefix or one segment per slot); on a
Hopper GPU the same tests run the kernel.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimem_kernels.segment_attention import api, pallas_mosaic_gpu
from omnimem_jax.memory import store
from omnimem_jax.model import attention
from tests.configs import tiny
from tests.kernels.selection_attention_suite import relative_error


def oracle(q, keys, values, starts, count, length):
  """[b, n, h, d] float64: softmax over the segments' rows, listed explicitly."""
  rows = [r for i in range(count) for r in range(starts[i], starts[i] + length)]
  if not rows:
    return np.zeros(q.shape)
  logits = np.einsum("bnhd,bhmd->bhnm", q.astype(np.float64), keys[:, :, rows].astype(np.float64))
  logits /= np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
  weights /= weights.sum(axis=-1, keepdims=True)
  return np.einsum("bhnm,bhmd->bnhd", weights, values[:, :, rows].astype(np.float64))


# starts, count, length over a 576-row source (6 slots of 96 rows); 200 queries.
CASES = {
    "slots": ([480, 0, 192, 7], 3, 96),  # the last slot first: its last key tile runs past the source
    "prefix_partial_tile": ([0, 0], 1, 250),  # 250 rows: a partial tile after the full one
    "unaligned_starts": ([100, 3, 421, 299, 0], 4, 77),  # offsets 4, 3, 5, 3 inside 8-row tiles
    "empty": ([0], 0, 96),
    "long_segments": ([5, 300], 2, 270),  # unaligned, several tiles, last tile partial
}


def make_case(seed, name, batch=2, tokens=200, heads=2, head_dim=64, rows=576):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, tokens, heads, head_dim)).astype(np.float32)
  keys = rng.standard_normal((batch, heads, rows, head_dim)).astype(np.float32)
  values = rng.standard_normal((batch, heads, rows, head_dim)).astype(np.float32)
  starts, count, length = CASES[name]
  return q, keys, values, np.asarray(starts, np.int32), count, length


def _run(case, dtype, implementation):
  q, keys, values, starts, count, length = case
  cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
  return api.segment_attention(cast(q), cast(keys), cast(values), jnp.asarray(starts), count, length,
                               implementation=implementation)


@pytest.mark.parametrize("name", sorted(CASES))
def test_xla_reference_matches_oracle(name):
  case = make_case(0, name)
  with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
    out = _run(case, jnp.float32, "xla")
  assert out.shape == case[0].shape
  assert relative_error(out, oracle(*case)) < 1e-5 if case[4] else not np.asarray(out).any()


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("splits", [None, 1, 2, 5])  # None: the default; 5 leaves some CTAs no key step
def test_mosaic_gpu_matches_oracle(name, seed, splits):
  if jax.devices()[0].compute_capability != "9.0":
    pytest.skip("not a Hopper GPU")
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


def _config(mode, capacity_chunks=6):
  """head_dim 64; 6 slots: 144 pooled rows, enough for the kernel's 128-row key tiles."""
  return dataclasses.replace(tiny(mode=mode, local_attn_frames=6, capacity_chunks=capacity_chunks), dim=256)


@pytest.mark.parametrize("dense", ["mosaic_gpu", "splash"])
@pytest.mark.parametrize("mode", ["omnimem", "window", "sink_window", "dense"])
def test_dense_path_matches_xla_through_ring_reuse(mode, dense):
  """The segment kernel ("mosaic_gpu": bf16 on a GPU; on CPU f32 through the XLA segment reference,
  exact bookkeeping) and splash ("splash": the TPU kernel, interpret mode on CPU) against the f32 XLA
  path on the same (bf16-rounded) inputs. The selection branch's gate is clipped shut (weight
  4.5e-5): bf16 and f32 scores may pick different blocks, and the selection kernels are tested
  elsewhere."""
  if dense == "splash" and jax.default_backend() not in ("cpu", "tpu"):
    pytest.skip("splash is a TPU kernel (interpret mode on CPU)")
  config = _config(mode)
  dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  tolerance = 1e-2 if dtype == jnp.bfloat16 else 1e-5
  stores = {name: store.init_store(config, 2, d, num_layers=1) for name, d in (("tested", dtype), ("f32", jnp.float32))}
  layers = {name: store.layer_kv(kv.layers, 0) for name, kv in stores.items()}
  slot_chunk = stores["f32"].slot_chunk
  step = jax.jit(lambda *args, dense: attention.chunk_self_attention(*args, config, implementation="xla",
                                                                     dense_implementation=dense),
                 static_argnames="dense")
  rng = np.random.default_rng(0)
  shape = (2, config.tokens_per_chunk, config.num_heads, config.head_dim)
  for chunk in range(9):  # the ring wraps from chunk 6 on
    qkv = [jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3)]
    gates = None
    if mode == "omnimem":
      gates = jnp.asarray(rng.standard_normal((*shape[:3], 3)), jnp.float32).at[..., 1].set(-10.0)
    with jax.default_matmul_precision("highest"):  # the f32 expectation without TF32 on GPUs
      expected, layers["f32"] = step(*(x.astype(jnp.float32) for x in qkv), layers["f32"], slot_chunk,
                                     jnp.int32(chunk), gates, dense="xla")
    out, layers["tested"] = step(*qkv, layers["tested"], slot_chunk, jnp.int32(chunk), gates, dense=dense)
    slot_chunk = store.assign_slot(slot_chunk, chunk, config.memory)
    assert out.dtype == dtype
    assert relative_error(out, expected) < tolerance, chunk


def test_rewound_store_uses_one_segment_per_slot():
  """Chunks 0..4 written into 4 slots (chunk 4 replaced chunk 0 in slot 0), then chunk 2 attends
  again: the slots holding chunks 0..2 are 1 and 2, not a prefix, so each is its own segment."""
  config = _config("omnimem", capacity_chunks=4)
  kv = store.init_store(config, 1, jnp.float32, num_layers=1)
  layer, slot_chunk = store.layer_kv(kv.layers, 0), kv.slot_chunk
  rng = np.random.default_rng(1)
  shape = (1, config.tokens_per_chunk, config.num_heads, config.head_dim)
  for chunk in range(5):
    layer = store.write_chunk(layer, *(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2)),
                              jnp.int32(chunk), config)
    slot_chunk = store.assign_slot(slot_chunk, chunk, config.memory)
  q = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  starts, count, length = attention._compressed_segments(layer, slot_chunk, jnp.int32(2))
  assert (int(count), int(length)) == (2, config.blocks_per_chunk)  # one segment per slot, not a prefix
  assert sorted(np.asarray(starts)[:2].tolist()) == [config.blocks_per_chunk, 2 * config.blocks_per_chunk]
  recent = attention.attended_chunks(jnp.int32(2), config.memory)
  with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
    for branch in (lambda impl: attention.compressed_attention(q, layer, slot_chunk, jnp.int32(2), impl),
                   lambda impl: attention.chunk_attention(q, layer, slot_chunk, jnp.int32(2), recent,
                                                          config.memory, impl)):
      assert relative_error(jax.jit(branch, static_argnums=0)("mosaic_gpu"), branch("xla")) < 1e-5


def test_default_dense_implementation_by_platform():
  device = jax.devices()[0]
  if device.platform == "gpu":
    expected = "mosaic_gpu" if device.compute_capability == "9.0" else "cudnn"
  else:
    expected = "xla"
  assert attention.default_dense_implementation(jnp.bfloat16) == expected
  assert attention.default_dense_implementation(jnp.float32) == "xla"


@pytest.mark.parametrize("mode", ["omnimem", "window"])
def test_stacked_store_read_in_place_matches_xla(mode):
  """Layer 1 of a 3-layer store of random K/V, as the DiT runs it: the segment path reads the stacked
  store at layer 1's row offset (a wrong offset reads another layer's keys)."""
  config = _config(mode, capacity_chunks=5)
  dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  kv = store.init_store(config, 1, dtype, num_layers=3)
  rng = np.random.default_rng(3)
  layers = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), kv.layers)
  shape = (1, config.tokens_per_chunk, config.num_heads, config.head_dim)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))
  gates = jnp.asarray(rng.standard_normal((*shape[:3], 3)), jnp.float32).at[..., 1].set(-10.0) if mode == "omnimem" \
      else None
  slot_chunk = jnp.asarray([0, 1, 2, 3, -1], jnp.int32)
  step = jax.jit(lambda layers, dense: attention.chunk_self_attention(
      q, k, v, layers, slot_chunk, jnp.int32(4), gates, config, implementation="xla", dense_implementation=dense,
      layer_index=jnp.int32(1)), static_argnums=1)
  with jax.default_matmul_precision("highest"):
    expected, _ = step(jax.tree.map(lambda x: x.astype(jnp.float32), layers), "xla")
  out, _ = step(layers, "mosaic_gpu")
  assert relative_error(out, expected) < (1e-2 if dtype == jnp.bfloat16 else 1e-5)
