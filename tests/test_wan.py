"""CausalWanModel: parity with diffusers, causal consistency with full-sequence masked forwards,
parameter count and axis names, the cross-attention cache, compile-once, and input errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnimem_jax import checkpoints
from omnimem_jax.config import MemoryConfig, ModelConfig
from omnimem_jax.convert import state_dict, wan_dit
from omnimem_jax.memory.store import init_store, slot_of_chunk
from omnimem_jax.model.wan import CausalWanModel, count_parameters, masked_dense_attention
from tests.configs import tiny

FIXTURES = "tests/fixtures"
WAN_1_3B_PARAMETERS = 1_418_996_800  # docs/architecture.md, 'The Wan2.1 models'


def relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def model_from_fixture(layout, config):
  params, _ = wan_dit.convert_state_dict(state_dict.load_state_dict(f"{FIXTURES}/wan_dit_{layout}.safetensors"),
                                         config, dtype=jnp.float32)
  return checkpoints.module_with_params(lambda: CausalWanModel(config, rngs=nnx.Rngs(0)), params)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_one_chunk_matches_diffusers(layout):
  fixture = np.load(f"{FIXTURES}/wan_dit_parity.npz")
  config = tiny(mode="dense")
  model = model_from_fixture(layout, config)
  velocity, _ = model(jnp.asarray(fixture["latents"]), jnp.asarray(fixture["timestep"]), jnp.asarray(fixture["text"]),
                      init_store(config, 2, jnp.float32), 0)
  assert velocity.shape == fixture["velocity"].shape
  assert relative_error(velocity, fixture["velocity"]) < 1e-5


@pytest.mark.parametrize("mode, extra", [("dense", 0), ("omnimem", 1_659_960)])
def test_real_preset_parameter_count(mode, extra):
  config = ModelConfig.from_preset("wan2.1-t2v-1.3b", memory=MemoryConfig(mode=mode))
  model = nnx.eval_shape(lambda: CausalWanModel(config, rngs=nnx.Rngs(0)))
  assert count_parameters(model) == WAN_1_3B_PARAMETERS + extra  # gates: 30 x (1536 x 36 + 36)


def test_every_parameter_has_logical_axis_names():
  model = nnx.eval_shape(lambda: CausalWanModel(tiny(), rngs=nnx.Rngs(0)))
  specs = jax.tree_util.tree_leaves_with_path(nnx.get_partition_spec(nnx.state(model, nnx.Param)),
                                              is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  shapes = dict(jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)))
  assert len(specs) == len(shapes) > 0
  for path, spec in specs:
    assert isinstance(spec, jax.sharding.PartitionSpec), path
    assert len(spec) == len(shapes[path].shape), path
    if "blocks" in jax.tree_util.keystr(path):
      assert spec[0] == "layers", path
  attn = nnx.get_partition_spec(nnx.state(model, nnx.Param))["blocks"]["self_attn"]
  assert tuple(attn["q"]["kernel"].get_value()) == ("layers", "embed", "heads")
  assert tuple(attn["g_proj"]["kernel"].get_value()) == ("layers", "embed", "heads")


def random_inputs(config, chunks, seed=0, batch=2):
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((batch, config.in_channels, chunks * config.memory.frames_per_chunk,
                                 config.latent_height, config.latent_width)).astype(np.float32)
  text = rng.standard_normal((batch, config.text_len, config.text_dim)).astype(np.float32)
  timestep = rng.uniform(0, 1000, batch).astype(np.float32)
  return jnp.asarray(latents), jnp.asarray(timestep), jnp.asarray(text)


def rollout(model, latents, timestep, text, chunks):
  config = model.config
  frames = config.memory.frames_per_chunk
  store = init_store(config, latents.shape[0], jnp.float32)
  cross = model.cross_kv(text)
  step = jax.jit(lambda model, x, store, c: model(x, timestep, cross, store, c))
  outputs = []
  for chunk in range(chunks):
    velocity, store = step(model, latents[:, :, chunk * frames:(chunk + 1) * frames], store, chunk)
    outputs.append(velocity)
  return jnp.concatenate(outputs, axis=2)


def chunk_mask(config, chunks, visible):
  """Token mask from a chunk-level rule visible(query_chunk, key_chunk)."""
  per_chunk = config.tokens_per_chunk
  rule = np.array([[visible(i, j) for j in range(chunks)] for i in range(chunks)])
  return jnp.asarray(np.kron(rule, np.ones((per_chunk, per_chunk), bool)))


@pytest.mark.parametrize("mode, visible", [
    ("dense", lambda i, j: j <= i),
    ("window", lambda i, j: i - 2 < j <= i),  # local_attn_frames = 6: the current chunk and one before
    ("sink_window", lambda i, j: j <= i and (j < 1 or i - 1 < j)),  # sink chunk 0 + one recent chunk
])
def test_causal_rollout_equals_masked_full_sequence(mode, visible):
  config = tiny(mode=mode, local_attn_frames=6, sink_frames=3 if mode == "sink_window" else 0)
  chunks = 4
  model = CausalWanModel(config, rngs=nnx.Rngs(7))
  latents, timestep, text = random_inputs(config, chunks)
  causal = rollout(model, latents, timestep, text, chunks)
  attention = masked_dense_attention(chunk_mask(config, chunks, visible))
  reference, _ = model.forward_sequence(latents, timestep, text, attention)
  assert relative_error(causal, reference) < 1e-5
  # The rule matters: attending to everything gives a different answer after chunk 0.
  unmasked, _ = model.forward_sequence(latents, timestep, text,
                                       masked_dense_attention(chunk_mask(config, chunks, lambda i, j: True)))
  assert relative_error(causal, unmasked) > 1e-3


def test_ring_reuse_keeps_window_rollout_exact():
  """With 2 slots and a 2-chunk window, slots are reused from chunk 2 on; nothing visible is lost."""
  config = tiny(mode="window", local_attn_frames=6, capacity_chunks=2)
  chunks = 5
  model = CausalWanModel(config, rngs=nnx.Rngs(3))
  latents, timestep, text = random_inputs(config, chunks, seed=4, batch=1)
  causal = rollout(model, latents, timestep, text, chunks)
  mask = chunk_mask(config, chunks, lambda i, j: i - 2 < j <= i)
  reference, _ = model.forward_sequence(latents, timestep, text, masked_dense_attention(mask))
  assert int(slot_of_chunk(4, config.memory)) == 0
  assert relative_error(causal, reference) < 1e-5


def test_cached_cross_kv_equals_text_embeddings_and_call_compiles_once():
  config = tiny()  # omnimem mode, gates initialised
  model = CausalWanModel(config, rngs=nnx.Rngs(0))
  latents, timestep, text = random_inputs(config, 3, seed=1)
  frames = config.memory.frames_per_chunk

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(model, x, text, store, chunk):
    return model(x, timestep, text, store, chunk)

  cross = model.cross_kv(text)
  store = init_store(config, 2, jnp.float32)
  for chunk in range(3):
    x = latents[:, :, chunk * frames:(chunk + 1) * frames]
    velocity, new_store = step(model, x, cross, store, chunk)
    from_text, _ = model(x, timestep, text, store, chunk)
    np.testing.assert_allclose(velocity, from_text, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(velocity))
    store = new_store
  np.testing.assert_array_equal(store.slot_chunk[:3], [0, 1, 2])
  assert float(jnp.abs(store.layers.k[:, :, :, 2]).sum()) > 0  # chunk 2's keys were written


def test_bfloat16_chunk_runs_close_to_float32():
  config = tiny()
  model32 = CausalWanModel(config, rngs=nnx.Rngs(0))
  model16 = CausalWanModel(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  latents, timestep, text = random_inputs(config, 1, seed=2)
  v32, _ = model32(latents, timestep, text, init_store(config, 2, jnp.float32), 0)
  v16, store = model16(latents, timestep, text, init_store(config, 2), 0)
  assert store.layers.k.dtype == jnp.bfloat16
  assert relative_error(v16, v32) < 3e-2


def test_input_errors():
  config = tiny(mode="dense")
  model = CausalWanModel(config, rngs=nnx.Rngs(0))
  latents, timestep, text = random_inputs(config, 1)
  store = init_store(config, 2, jnp.float32)
  with pytest.raises(ValueError, match="latents must be"):
    model(latents[:, :, :2], timestep, text, store, 0)
  with pytest.raises(ValueError, match="timestep must be"):
    model(latents, timestep[:1], text, store, 0)
  with pytest.raises(ValueError, match="text_embeddings must be"):
    model(latents, timestep, text[..., :5], store, 0)
  with pytest.raises(ValueError, match="store must hold"):
    model(latents, timestep, text, init_store(config, 1, jnp.float32), 0)
  with pytest.raises(ValueError, match="beyond the RoPE table"):
    model(latents, timestep, text, store, config.max_chunks)
  with pytest.raises(ValueError, match="attention_mask must be"):
    model.forward_sequence(latents, timestep, text, masked_dense_attention(jnp.ones((3, 3), bool)))
