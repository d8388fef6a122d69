"""Orbax checkpoints: convert -> restore gives identical outputs, restore onto a 4-device mesh with
shardings, safe saving (no overwrite, atomic replace, nothing left behind), and the gate policies."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, PartitionSpec

from omnimem_jax import checkpoints
from omnimem_jax.convert import state_dict as sd
from omnimem_jax.convert import wan_dit
from omnimem_jax.memory.store import init_store
from omnimem_jax.model.wan import CausalWanModel
from tests.configs import require_devices, tiny

ORIGINAL = "tests/fixtures/wan_dit_original.safetensors"


def inputs(config, seed=0):
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((2, config.in_channels, 3, config.latent_height, config.latent_width)).astype(np.float32)
  text = rng.standard_normal((2, config.text_len, config.text_dim)).astype(np.float32)
  return jnp.asarray(latents), jnp.asarray([900.0, 100.0]), jnp.asarray(text)


def run_chunk(model, config, chunk_inputs):
  velocity, _ = model(*chunk_inputs, init_store(config, 2, jnp.float32), 0)
  return np.asarray(velocity)


def direct_model(config):
  params, _ = wan_dit.convert_state_dict(sd.load_state_dict(ORIGINAL), config, dtype=jnp.float32)
  return checkpoints.module_with_params(lambda: CausalWanModel(config, rngs=nnx.Rngs(0)), params)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt") / "dense"
  return wan_dit.convert_checkpoint(ORIGINAL, path, tiny(mode="dense"), dtype=jnp.float32)


def test_restore_gives_identical_outputs(converted):
  config = tiny(mode="dense")
  restored = wan_dit.restore_model(converted, dtype=jnp.float32)
  assert restored.config == config
  chunk = inputs(config)
  np.testing.assert_array_equal(run_chunk(restored, config, chunk), run_chunk(direct_model(config), config, chunk))


def test_restore_onto_a_four_device_mesh_with_shardings(converted):
  require_devices(4)
  config = tiny(mode="dense")
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(1, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  sharded = wan_dit.restore_model(converted, mesh=mesh, dtype=jnp.float32)
  q_kernel = sharded.blocks.self_attn.q.kernel[...]
  assert q_kernel.sharding.spec == PartitionSpec(None, None, "model")
  assert len(q_kernel.addressable_shards) == 4 and q_kernel.addressable_shards[0].data.shape == (2, 64, 16)
  assert sharded.blocks.ffn.linear_out.kernel[...].sharding.spec == PartitionSpec(None, "model", None)
  assert sharded.head.kernel[...].sharding.spec == PartitionSpec(None, None)
  chunk = inputs(config, seed=1)
  with jax.set_mesh(mesh):
    velocity = jax.jit(lambda model, x, t, text: run_chunk_traced(model, config, x, t, text))(sharded, *chunk)
  np.testing.assert_allclose(velocity, run_chunk(direct_model(config), config, chunk), rtol=1e-5, atol=1e-5)


def run_chunk_traced(model, config, latents, timestep, text):
  velocity, _ = model(latents, timestep, text, init_store(config, 2, jnp.float32), 0)
  return velocity


def test_restore_casts_to_the_requested_dtype(converted):
  model = wan_dit.restore_model(converted, param_dtype=jnp.bfloat16)
  assert model.blocks.self_attn.q.kernel[...].dtype == jnp.bfloat16


def test_saving_never_overwrites_or_leaves_partial_files(tmp_path):
  target = tmp_path / "ckpt"
  params = {"w": np.arange(4, dtype=np.float32)}
  record = checkpoints.CheckpointRecord(kind=checkpoints.Kind.VAE, config={})
  checkpoints.save_checkpoint(target, params, record)
  with pytest.raises(FileExistsError, match="already exists"):
    checkpoints.save_checkpoint(target, params, record)
  with pytest.raises(Exception):  # noqa: B017 (whatever Orbax raises for an unsavable leaf)
    checkpoints.save_checkpoint(target, {"w": object()}, record, overwrite=True)
  assert checkpoints.read_record(target, checkpoints.Kind.VAE).kind == checkpoints.Kind.VAE  # the old one survived
  checkpoints.save_checkpoint(target, {"w": np.ones(2, np.float32)}, dataclasses.replace(record, config={"v": 2}),
                              overwrite=True)
  assert checkpoints.read_record(target).config == {"v": 2}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging or retired directories
  files = [p for p in target.rglob("*") if p.is_file()]
  assert files and not any(str(tmp_path).encode() in p.read_bytes() for p in files)  # no machine path kept
  np.testing.assert_array_equal(checkpoints.restore_params(target, {"w": jax.ShapeDtypeStruct((2,), np.float32)})["w"], np.ones(2))
  with pytest.raises(ValueError, match="needs 'kind' and 'config'"):
    checkpoints.save_checkpoint(tmp_path / "x", params, checkpoints.CheckpointRecord.from_json({"config": {}}))


def test_metadata_errors(tmp_path, converted):
  with pytest.raises(FileNotFoundError, match="not an OmniMem-JAX checkpoint"):
    checkpoints.read_record(tmp_path)
  with pytest.raises(ValueError, match="holds a 'wan_dit' checkpoint, expected 'wan_vae'"):
    checkpoints.read_record(converted, checkpoints.Kind.VAE)


def test_gate_policies_at_restore(converted, caplog):
  with pytest.raises(ValueError, match="no OmniMem gates"):
    wan_dit.restore_model(converted, memory=tiny().memory)
  with caplog.at_level(logging.WARNING):
    gated = wan_dit.restore_model(converted, memory=tiny().memory, init_missing_gates=True, dtype=jnp.float32)
  assert "NOT meaningful" in caplog.text
  kernel = np.asarray(gated.blocks.self_attn.g_proj.kernel[...])
  assert kernel.shape == (2, 64, 12) and 0.5e-3 < kernel.std() < 2e-3
  np.testing.assert_array_equal(np.asarray(gated.blocks.self_attn.q.kernel[...]),
                                np.asarray(direct_model(tiny(mode="dense")).blocks.self_attn.q.kernel[...]))


def test_gated_checkpoint_in_a_baseline_mode(tmp_path, caplog):
  path = wan_dit.convert_checkpoint(ORIGINAL, tmp_path / "omnimem", tiny(), dtype=jnp.float32, init_gates=True)
  assert checkpoints.read_record(path).gates_initialised
  with caplog.at_level(logging.WARNING):
    model = wan_dit.restore_model(path, memory=tiny(mode="window").memory, dtype=jnp.float32)
  assert "ignoring the checkpoint's OmniMem gates" in caplog.text
  assert model.blocks.self_attn.g_proj is None
  chunk = inputs(tiny(mode="window"))
  np.testing.assert_array_equal(run_chunk(model, model.config, chunk),
                                run_chunk(direct_model(tiny(mode="window")), model.config, chunk))
