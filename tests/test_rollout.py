"""Sampler schedule and rollout engine: exact schedule values, one compile per rollout, streaming
equals one scan, seeded determinism, the selection path end to end against dense attention, prompt
switches with KV recache, and input errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnimem_jax import sampler
from omnimem_jax.config import SamplerConfig
from omnimem_jax.memory.store import init_store
from omnimem_jax.model.wan import CausalWanModel
from omnimem_jax.rollout import Rollout
from tests.configs import tiny


def test_self_forcing_schedule_values():
  table = sampler.step_table(SamplerConfig())
  np.testing.assert_array_equal(table["timestep"], np.float32([1000.0, 937.5, 2500.0 / 3.0, 625.0, 0.0]))
  np.testing.assert_array_equal(table["sigma"], np.float32([1.0, 0.9375, 2.5 / 3.0, 0.625, 0.0]))
  np.testing.assert_array_equal(table["sigma_next"], np.float32([0.9375, 2.5 / 3.0, 0.625, 0.0, 0.0]))
  np.testing.assert_array_equal(table["is_context"], [0, 0, 0, 0, 1])
  # CausVid: shift 8, warped [1000, 960, 888.89, 727.27]; unwarped [1000, 757, 522] keeps t, sigma nearest
  np.testing.assert_allclose(sampler.denoising_timesteps(SamplerConfig(shift=8.0)),
                             [1000.0, 960.0, 8000.0 / 9.0, 8000.0 / 11.0], rtol=1e-6)
  unwarped = SamplerConfig(denoising_steps=(1000, 757, 522), shift=8.0, warp=False)
  np.testing.assert_array_equal(sampler.denoising_timesteps(unwarped), [1000.0, 757.0, 522.0])
  assert abs(sampler.sigma_at(unwarped, 757.0) - 0.7568) < 1e-4


@pytest.mark.parametrize("bad, match", [
    (dict(denoising_steps=(750, 1000)), "must decrease"),
    (dict(denoising_steps=(1000, 0)), "must be integers in"),
    (dict(shift=0.0), "shift"),
    (dict(context_timestep=1000.0), "context_timestep"),
])
def test_sampler_config_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    SamplerConfig(**bad)


def text_cross(model, seed=0):
  config = model.config
  return model.cross_kv(jax.random.normal(jax.random.key(seed), (1, config.text_len, config.text_dim)))


@pytest.mark.parametrize("mode", ["omnimem", "window", "sink_window", "dense"])
def test_eight_chunk_stream_compiles_once_and_equals_one_scan(mode):
  config = tiny(mode=mode, local_attn_frames=6)
  model = CausalWanModel(config, rngs=nnx.Rngs(0))
  cross = text_cross(model)
  streaming = Rollout(model, store_dtype=jnp.float32, retrieval=mode == "omnimem")
  latents, retrieval = streaming.run([(0, cross)], num_chunks=8, seed=3)
  assert streaming.traces == 1 and len(streaming.timings) == 8
  assert latents.shape == (1, 4, 24, 8, 16) and np.isfinite(latents).all()
  one_scan = Rollout(model, store_dtype=jnp.float32, retrieval=mode == "omnimem")
  latents_once, retrieval_once = one_scan.run([(0, cross)], num_chunks=8, seed=3, segment_chunks=8)
  np.testing.assert_array_equal(latents_once, latents)
  if mode == "omnimem":
    assert retrieval.shape == (8, config.num_layers, config.memory.capacity_chunks + 1)
    np.testing.assert_array_equal(retrieval_once, retrieval)
    # AWE: from chunk 3 on, nothing is selected from the last 3 chunks
    assert retrieval[3:, :, :3].sum() == 0 and retrieval[7, :, 3:].sum() > 0
  else:
    assert retrieval is None


def test_same_seed_same_video_other_seed_other_video():
  model = CausalWanModel(tiny(mode="window"), rngs=nnx.Rngs(1))
  cross = text_cross(model)
  first, _ = Rollout(model, store_dtype=jnp.float32).run([(0, cross)], num_chunks=2, seed=5)
  again, _ = Rollout(model, store_dtype=jnp.float32).run([(0, cross)], num_chunks=2, seed=5)
  other, _ = Rollout(model, store_dtype=jnp.float32).run([(0, cross)], num_chunks=2, seed=6)
  np.testing.assert_array_equal(first, again)
  assert float(jnp.abs(first - other).mean()) > 0.1


def relative_error(actual, expected):
  return float(jnp.linalg.norm(actual - expected) / jnp.linalg.norm(expected))


def test_selection_path_covering_all_history_equals_dense_attention():
  """top_k covers every stored block, AWE off, gates pinned to the selection branch: OmniMem must
  reproduce dense attention over the same history, through the whole rollout."""
  chunks = 3
  omnimem_config = tiny(top_k=8 * 24, exclude_window_chunks=0)  # 8 slots x 24 blocks
  omnimem = CausalWanModel(omnimem_config, rngs=nnx.Rngs(2))
  gates = omnimem.blocks.self_attn.g_proj
  gates.kernel[...] = jnp.zeros_like(gates.kernel[...])
  gates.bias[...] = jnp.tile(jnp.array([-10.0, 10.0, -10.0]), omnimem_config.num_heads)[None].repeat(2, 0)
  dense = CausalWanModel(tiny(mode="dense"), rngs=nnx.Rngs(2))
  shared = nnx.state(omnimem, nnx.Param)
  del shared["blocks"]["self_attn"]["g_proj"]
  nnx.update(dense, shared)
  cross = text_cross(dense)
  expected, _ = Rollout(dense, store_dtype=jnp.float32).run([(0, cross)], chunks, seed=0)
  actual, _ = Rollout(omnimem, store_dtype=jnp.float32).run([(0, cross)], chunks, seed=0)
  # The gates clip at +-10, so the other branches keep a sigmoid(-10) = 4.5e-5 share each.
  assert relative_error(actual, expected) < 5e-4
  too_few = dataclasses.replace(omnimem_config, memory=dataclasses.replace(omnimem_config.memory, top_k=2))
  sparse = CausalWanModel(too_few, rngs=nnx.Rngs(0))
  nnx.update(sparse, nnx.state(omnimem, nnx.Param))
  sparse_latents, _ = Rollout(sparse, store_dtype=jnp.float32).run([(0, cross)], chunks, seed=0)
  assert relative_error(sparse_latents, expected) > 10 * relative_error(actual, expected)


def test_prompt_switch_recaches_recent_chunks():
  model = CausalWanModel(tiny(mode="window", local_attn_frames=6), rngs=nnx.Rngs(4))
  first, second = text_cross(model, 0), text_cross(model, 1)
  single = Rollout(model, store_dtype=jnp.float32)
  single_latents, _ = single.run([(0, first)], num_chunks=4, seed=0)
  switched = Rollout(model, store_dtype=jnp.float32)
  switched_latents, _ = switched.run([(0, first), (2, second)], num_chunks=4, seed=0, recache_chunks=1)
  no_recache = Rollout(model, store_dtype=jnp.float32)
  no_recache_latents, _ = no_recache.run([(0, first), (2, second)], num_chunks=4, seed=0, recache_chunks=0)
  np.testing.assert_array_equal(switched_latents[:, :, :6], single_latents[:, :, :6])  # before the switch
  assert relative_error(switched_latents[:, :, 6:], single_latents[:, :, 6:]) > 1e-2
  assert relative_error(switched_latents[:, :, 6:], no_recache_latents[:, :, 6:]) > 1e-4
  k_switched, k_plain = switched.store.layers.k, no_recache.store.layers.k
  np.testing.assert_array_equal(k_switched[:, :, :, 0], k_plain[:, :, :, 0])  # chunk 0: not recached
  assert not np.array_equal(k_switched[:, :, :, 1], k_plain[:, :, :, 1])  # chunk 1: recached


def test_rollout_input_errors():
  config = tiny(mode="window")
  model = CausalWanModel(config, rngs=nnx.Rngs(0))
  cross = text_cross(model)
  rollout = Rollout(model, store_dtype=jnp.float32)
  with pytest.raises(ValueError, match="omnimem mode only"):
    Rollout(model, retrieval=True)
  with pytest.raises(ValueError, match="beyond the RoPE table"):
    next(rollout.stream([(0, cross)], num_chunks=config.max_chunks + 1))
  with pytest.raises(ValueError, match="must start at chunk 0"):
    next(rollout.stream([(1, cross)], num_chunks=4))
  with pytest.raises(ValueError, match="must start at chunk 0"):
    next(rollout.stream([(0, cross), (4, cross)], num_chunks=4))
  with pytest.raises(ValueError, match="multiple of segment_chunks"):
    next(rollout.stream([(0, cross)], num_chunks=3, segment_chunks=2))
  with pytest.raises(ValueError, match="segment boundaries"):
    next(rollout.stream([(0, cross), (1, cross)], num_chunks=4, segment_chunks=2))
  with pytest.raises(ValueError, match="store must hold"):
    next(rollout.stream([(0, cross)], num_chunks=2, store=init_store(config, 2, jnp.float32)))
