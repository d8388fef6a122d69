"""The store's tiers through the attention layer: a compact full-resolution tier changes the selection
branch only (by its quantisation), and the pooled tier keeps what the full-resolution ring evicted."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimem_jax.memory import select, store
from omnimem_jax.model import attention
from omnimem_kernels import kv_quant
from omnimem_kernels.backends import Backends
from tests.configs import tiny


def chunk_inputs(config, rng, batch=2):
  shape = (batch, config.tokens_per_chunk, config.num_heads, config.head_dim)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
  return q, k, v, jnp.asarray(rng.standard_normal((*shape[:3], 3)), jnp.float32)


def dequantised(layer: store.LayerKV, config) -> store.LayerKV:
  """A plain f32 layer whose full-resolution tier holds the compact layer's K/V dequantised (pooled as is)."""
  empty = store.layer_kv(store.init_store(config, layer.k.shape[0], jnp.float32, num_layers=1).layers, 0)
  blocks = (*layer.k.shape[:2], -1, config.memory.block_tokens, layer.k.shape[-1])

  def plain(data, scale):
    return kv_quant.dequantize(data.reshape(blocks), scale, layer.kv_format).reshape(empty.k.shape)

  return dataclasses.replace(empty, k=plain(layer.k, layer.k_scale), v=plain(layer.v, layer.v_scale),
                             k_pooled=layer.k_pooled, v_pooled=layer.v_pooled)


def branches(q, layer, tables, chunk, config, backends):
  """(cmp, slc, swa outputs, selected ids) of chunk c over a layer that already holds it."""
  chunk = jnp.int32(chunk)
  cmp = attention.compressed_attention(q, layer, tables, chunk, backends=backends)
  slc, ids = attention.selection_branch(q, layer, tables, chunk, config, backends=backends)
  recent = attention.attended_chunks(chunk, config.memory)
  swa = attention.chunk_attention(q, layer, tables, chunk, recent, config.memory, backends=backends)
  return cmp, slc, swa, ids


@pytest.mark.parametrize("selection", ["xla", "triton"])
@pytest.mark.parametrize("kv_format", ["fp8", "int4"])
def test_compact_store_changes_only_what_the_selection_reads(kv_format, selection):
  """A compact and a plain store written with the same chunks through ring reuse (capacity 4, 7 chunks):
  the compressed and sliding branches and the selected ids are the plain store's; the selection branch
  is the plain one over the dequantised blocks; the layer output is the gated sum of those."""
  config = tiny(capacity_chunks=4, pooled_chunks=6)
  backends = Backends(selection=selection)
  step = jax.jit(lambda *args: attention.chunk_self_attention(*args, config, backends=backends))
  stores = {fmt: store.init_store(config, 2, jnp.float32, num_layers=1, kv_format=fmt) for fmt in ("bf16", kv_format)}
  layers = {fmt: store.layer_kv(kv.layers, 0) for fmt, kv in stores.items()}
  tables = {fmt: kv.tables for fmt, kv in stores.items()}
  rng = np.random.default_rng(0)
  errors = []
  for chunk in range(7):
    q, k, v, gates = chunk_inputs(config, rng)
    outs = {}
    for fmt in layers:
      outs[fmt], layers[fmt], _ = step(q, k, v, layers[fmt], tables[fmt], jnp.int32(chunk), gates)
      tables[fmt] = store.assign(tables[fmt], chunk, config.memory)
    compact, plain = (branches(q, layers[fmt], tables[fmt], chunk, config, backends) for fmt in (kv_format, "bf16"))
    for name, got, want in zip(("cmp", "swa"), (compact[0], compact[2]), (plain[0], plain[2]), strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"{name} at chunk {chunk}")
    np.testing.assert_array_equal(compact[3], plain[3])
    reference = dataclasses.replace(tables[kv_format], recent=jnp.zeros((0,), jnp.int32))
    slc, _ = attention.selection_branch(q, dequantised(layers[kv_format], config), reference, jnp.int32(chunk), config,
                                        backends=Backends(selection="xla"))
    np.testing.assert_allclose(compact[1], slc, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs[kv_format], attention.gate_branches(gates, *compact[:3]), rtol=1e-5, atol=1e-5)
    errors.append(np.linalg.norm(compact[1] - plain[1]) / np.linalg.norm(plain[1]))
  assert (np.asarray(compact[3]) >= 0).any() and 0 < max(errors) < (0.05 if kv_format == "fp8" else 0.2), errors


def test_pooled_tier_keeps_evicted_chunks_for_the_compressed_branch_and_the_top_k():
  """Capacity 4 with the pooled tier over all 10 chunks against a store holding everything: the
  compressed branch is the same; the top-k is the same wherever the unbounded store picked resident
  blocks only, and never picks an evicted chunk."""
  short, full = tiny(capacity_chunks=4, pooled_chunks=10), tiny(capacity_chunks=10)
  configs = {"short": short, "full": full}
  kv = {name: store.init_store(config, 2, jnp.float32, num_layers=1) for name, config in configs.items()}
  layers = {name: store.layer_kv(x.layers, 0) for name, x in kv.items()}
  tables = {name: x.tables for name, x in kv.items()}
  backends = Backends()
  rng = np.random.default_rng(1)
  compared = 0
  for chunk in range(10):
    q, k, v, _ = chunk_inputs(short, rng)
    results = {}
    for name, config in configs.items():
      layers[name] = store.write_chunk(layers[name], k, v, chunk, config)
      tables[name] = store.assign(tables[name], chunk, config.memory)
      results[name] = branches(q, layers[name], tables[name], chunk, config, backends)
    np.testing.assert_allclose(results["short"][0], results["full"][0], rtol=1e-6, atol=1e-6)
    owners = {name: np.asarray(select.chunks_of_ids(results[name][3], tables[name], configs[name]))
              for name in configs}  # both pooled tiers hold chunk c in slot c % 10: the ids compare directly
    resident_chunks = set(np.asarray(tables["short"].full).tolist())
    assert set(owners["short"][owners["short"] >= 0].tolist()) <= resident_chunks
    all_resident = np.isin(np.where(owners["full"] >= 0, owners["full"], chunk), list(resident_chunks)).all(axis=-1)
    np.testing.assert_array_equal(np.asarray(results["short"][3])[all_resident],
                                  np.asarray(results["full"][3])[all_resident])
    compared += int(all_resident.sum())
  assert compared > 0 and not all_resident.all()  # both cases occur by the last chunk
