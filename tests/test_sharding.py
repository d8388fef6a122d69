"""Sharded rollouts on 4 fake CPU devices equal one device; store and mesh bookkeeping; placement of
trees by their logical axes and like a module's parameters."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, make_single_device_sharding

from omnimem_jax import sharding
from omnimem_jax.memory import store
from omnimem_jax.model.wan import CausalWanModel
from omnimem_jax.rollout import Rollout
from tests.configs import require_devices, tiny

BATCH = 4  # divisible by every data-axis size tested
CHUNKS = 4  # past the sliding window and the AWE warm-up


def _run(config, mesh, retrieval):
  model = CausalWanModel(config, rngs=nnx.Rngs(0))
  text = np.random.default_rng(1).standard_normal((BATCH, config.text_len, config.text_dim), np.float32)
  rollout = Rollout(model, batch_size=BATCH, store_dtype=jnp.float32, retrieval=retrieval, record_ids=retrieval,
                    mesh=mesh)
  with jax.transfer_guard("disallow"):  # no implicit transfer: inputs go up explicitly, nothing comes back
    cross = rollout.cross_kv(text)
    latents, picks = rollout.run([(0, cross)], num_chunks=CHUNKS, seed=2, segment_chunks=2)
  return rollout, np.asarray(latents), picks


@pytest.mark.parametrize("mode", ["omnimem", "window", "sink_window", "dense"])
def test_meshes_give_the_same_latents_as_one_device(mode):
  config = tiny(mode=mode, local_attn_frames=6)
  retrieval = mode == "omnimem"
  _, expected, expected_picks = _run(config, None, retrieval)  # under the transfer guard on any machine
  require_devices(4)
  for data, model_axis in ((1, 4), (2, 2), (4, 1)):
    mesh = sharding.make_mesh(data, model_axis)
    rollout, latents, picks = _run(config, mesh, retrieval)
    error = np.linalg.norm(latents - expected) / np.linalg.norm(expected)
    assert error < 1e-5, (data, model_axis, error)
    assert rollout.traces == 1
    if retrieval:  # the heads' picks gathered from their devices: the same ids, the same histograms
      np.testing.assert_array_equal(picks.histograms, expected_picks.histograms)
      np.testing.assert_array_equal(picks.ids, expected_picks.ids)
    # The store stays sharded: each device holds 1 / (data x model) of it, heads over "model".
    k = rollout.store.layers.k
    assert k.sharding.spec == PartitionSpec("data", "model", None, None, None, None)
    assert {shard.data.nbytes for shard in k.addressable_shards} == {k.nbytes // (data * model_axis)}
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(rollout.store.layers))
    per_device = sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                     for leaf in jax.tree.leaves(rollout.store.layers))
    assert per_device * data * model_axis == total


def test_sharded_model_keeps_its_mesh():
  require_devices(4)
  config = tiny()
  mesh = sharding.make_mesh(2, 2)
  model = sharding.shard_module(CausalWanModel(config, rngs=nnx.Rngs(0)), mesh)
  assert model.blocks.self_attn.q.kernel[...].sharding.spec == PartitionSpec(None, None, "model")
  assert model.blocks.ffn.linear_out.kernel[...].sharding.spec == PartitionSpec(None, "model", None)
  assert sharding.module_mesh(model) is mesh
  assert Rollout(model, batch_size=2).mesh is mesh  # a model placed on a mesh rolls out on it
  with pytest.raises(ValueError, match="batch \\(1 prompts\\)"):
    Rollout(model, batch_size=1, mesh=mesh)  # the data axis (2) does not divide it


def test_trees_are_placed_by_their_logical_axes_and_like_params():
  require_devices(4)
  mesh = sharding.make_mesh(2, 2)
  store_shardings = sharding.tree_shardings(mesh, store.LOGICAL_AXES)  # the store's own declaration
  assert store_shardings.layers.k.spec == PartitionSpec("data", "model", None, None, None, None)
  assert store_shardings.layers.v_pooled.spec == PartitionSpec("data", "model", None, None, None)
  assert store_shardings.slot_chunk.spec == PartitionSpec()
  assert sharding.tree_shardings(mesh, sharding.CROSS_AXES).spec == PartitionSpec(None, "data", None, "model", None)
  config = tiny()
  tree = {"cache": np.arange(6, dtype=np.float32), "scalar": np.int32(3)}
  on_mesh = sharding.shard_module(CausalWanModel(config, rngs=nnx.Rngs(0)), mesh)
  assert {leaf.sharding for leaf in jax.tree.leaves(sharding.place_like_params(on_mesh, tree))} == {
      NamedSharding(mesh, PartitionSpec())}
  one_device_mesh = Mesh(jax.devices()[1:2], ("data",))  # how a restore without a mesh places a module
  restored = sharding.shard_module(CausalWanModel(config, rngs=nnx.Rngs(0)), one_device_mesh)
  assert sharding.module_mesh(restored) is None
  placed = sharding.place_like_params(restored, tree)
  assert {leaf.sharding for leaf in jax.tree.leaves(placed)} == {NamedSharding(one_device_mesh, PartitionSpec())}
  np.testing.assert_array_equal(placed["cache"], tree["cache"])
  plain = CausalWanModel(config, rngs=nnx.Rngs(0))
  assert sharding.place_like_params(plain, tree)["cache"].sharding == make_single_device_sharding(jax.devices()[0])


def test_mesh_errors():
  """Heads and batch are checked before the device count: those errors are the same on every machine."""
  config = tiny()  # 4 heads
  with pytest.raises(ValueError, match="must divide the 4 heads: one of \\[1, 2, 4\\]"):
    sharding.make_mesh(1, 3, config=config)
  with pytest.raises(ValueError, match="data axis \\(2\\) must divide the batch \\(3 prompts\\)"):
    sharding.make_mesh(2, 1, batch_size=3)
  visible = jax.device_count()  # CI: 4 fake CPU devices, so 4 x 4 needs 16
  with pytest.raises(ValueError, match=f"needs {4 * visible} devices, only {visible} visible"):
    sharding.make_mesh(4, visible)
  assert sharding.parse_mesh("data=2,model=2") == {"data": 2, "model": 2}
  assert sharding.parse_mesh("model=4") == {"data": 1, "model": 4}
  for bad in ("data=0", "pipe=2", "data=two", "data"):
    with pytest.raises(ValueError, match="mesh must look like 'data=2,model=2'"):
      sharding.parse_mesh(bad)


def test_readme_sharding_example_runs():
  require_devices(4)
  from tests.test_readme import readme_python_blocks, run_block

  block = next(block for block in readme_python_blocks() if "sharding.make_mesh" in block)
  namespace = run_block(block)
  latents = namespace["latents"]
  assert latents.shape[:3] == (2, namespace["config"].in_channels, 12) and np.isfinite(latents).all()
  assert latents.sharding.spec[0] == "data"
