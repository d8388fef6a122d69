"""Sampler schedule and rollout engine: exact schedule values, one compile per rollout, streaming
equals one scan, seeded determinism, the selection path end to end against dense attention, prompt
switches with KV recache, input errors; the rollout (default or supplied noise, prompt switch, a
ground-truth prefix) against a hand-written loop over the public model call; compilations and the
backends each op ran."""

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
from tests.configs import ALL_XLA, tiny


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
  one_scan = Rollout(model, store_dtype=jnp.float32, retrieval=mode == "omnimem", record_ids=mode == "omnimem")
  latents_once, retrieval_once = one_scan.run([(0, cross)], num_chunks=8, seed=3, segment_chunks=8)
  np.testing.assert_array_equal(latents_once, latents)  # recording the ids changes nothing
  if mode == "omnimem":
    histograms = retrieval.histograms
    assert histograms.shape == (8, config.num_layers, config.memory.capacity_chunks + 1) and retrieval.ids is None
    np.testing.assert_array_equal(retrieval_once.histograms, histograms)
    check_recorded_ids(retrieval_once, config, 8)
    # AWE: from chunk 3 on, nothing is selected from the last 3 chunks
    assert histograms[3:, :, :3].sum() == 0 and histograms[7, :, 3:].sum() > 0
  else:
    assert retrieval is None


def check_recorded_ids(picks, config, chunks):
  """`picks.ids` (a rollout with record_ids) against its histograms: every model call's ids are distinct per
  (head, group), obey Adaptive Window Exclusion, and give exactly the recorded histograms."""
  memory = config.memory
  calls = len(SamplerConfig().denoising_steps) + 1  # the denoising steps and the context pass
  ids = picks.ids
  assert ids.shape == (chunks, calls, config.num_layers, 1, config.num_heads, config.groups_per_chunk, memory.top_k)
  assert chunks <= memory.pooled_slots  # no pooled slot reused: block id // blocks_per_chunk is the chunk
  picked_chunks = np.where(ids >= 0, ids // config.blocks_per_chunk, -1)
  for c in range(chunks):
    last = c if c < memory.exclude_window_chunks else c - memory.exclude_window_chunks
    assert picked_chunks[c].max() <= last and (ids[c] >= 0).any()
  assert all(len(set(row[row >= 0])) == (row >= 0).sum() for row in ids.reshape(-1, memory.top_k))
  distances = np.arange(chunks)[:, None, None, None, None, None, None] - picked_chunks
  expected = np.zeros_like(picks.histograms)
  for c in range(chunks):
    for layer in range(config.num_layers):
      d = distances[c, :, layer][ids[c, :, layer] >= 0]
      expected[c, layer] = np.bincount(np.minimum(d, memory.capacity_chunks), minlength=memory.capacity_chunks + 1)
  np.testing.assert_array_equal(picks.histograms, expected)


@pytest.mark.parametrize("kv_format, bound", [("fp8", 0.05), ("int4", 0.25)])
def test_compact_store_rollout_compiles_once_and_tracks_the_plain_store(kv_format, bound):
  """A compact store through a whole rollout, with ring reuse (capacity 4 of 8 chunks) and the pooled tier
  keeping all 8: one compilation, finite latents within `bound` (relative) of the plain store's, and its
  layout is the compact one."""
  config = tiny(capacity_chunks=4, pooled_chunks=8)
  model = CausalWanModel(config, rngs=nnx.Rngs(0))
  cross = text_cross(model)
  plain, _ = Rollout(model, store_dtype=jnp.float32).run([(0, cross)], num_chunks=8, seed=3)
  rollout = Rollout(model, store_dtype=jnp.float32, kv_format=kv_format, retrieval=True)
  latents, retrieval = rollout.run([(0, cross)], num_chunks=8, seed=3)
  assert rollout.traces == 1 and np.isfinite(latents).all() and rollout.store.layers.kv_format == kv_format
  assert 0 < relative_error(latents, plain) < bound
  np.testing.assert_array_equal(rollout.store.tables.pooled, np.arange(8))
  np.testing.assert_array_equal(np.sort(np.asarray(rollout.store.tables.full)), np.arange(4, 8))
  assert retrieval.histograms[7, :, 4:].sum() == 0  # chunks 0..3 were evicted: never selected at chunk 7
  with pytest.raises(ValueError, match="compact KV store"):
    Rollout(CausalWanModel(tiny(mode="window"), rngs=nnx.Rngs(0)), kv_format=kv_format)


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


def hand_written_rollout(model, crosses, num_chunks, noise, key, *, recache_chunks=0, prefix=None):
  """The rollout written out over the public model call (every op on XLA) and the sampler's update rule:
  chunk by chunk, the denoising steps, the context pass, and at a prompt switch (`crosses[chunk]`) the
  KV recache of the last `recache_chunks` chunks; the first chunks may be given (`prefix` [B, C, n f, H, W])."""
  config, schedule = model.config, SamplerConfig()
  table = sampler.step_table(schedule)
  steps, frames = len(schedule.denoising_steps), config.memory.frames_per_chunk
  shape = (1, config.in_channels, frames, config.latent_height, config.latent_width)
  call = jax.jit(lambda x, t, cross, store, chunk: model(x, jnp.full((1,), t), cross, store, chunk, backends=ALL_XLA))
  store, chunks = init_store(config, 1, jnp.float32), []
  given = 0 if prefix is None else prefix.shape[2] // frames
  for chunk in range(given):
    chunks.append(jnp.asarray(prefix[:, :, chunk * frames:(chunk + 1) * frames]))
    store = call(chunks[-1], 0.0, crosses[0], store, chunk)[1]
  cross = crosses[0]
  for chunk in range(given, num_chunks):
    if chunk in crosses and chunk > 0:
      cross = crosses[chunk]
      for old in range(max(0, chunk - recache_chunks), chunk):
        store = call(chunks[old], 0.0, cross, store, old)[1]
    x = noise(key, chunk, 0, shape)
    for step in range(steps):
      velocity, store = call(x, table["timestep"][step], cross, store, chunk)
      x0 = sampler.clean_latents(x, velocity, table["sigma"][step])
      x = sampler.renoise(x0, noise(key, chunk, step + 1, shape), table["sigma_next"][step])
    store = call(x, table["timestep"][steps], cross, store, chunk)[1]  # the context pass (t = 0: x = x0)
    chunks.append(x0)
  return jnp.concatenate(chunks[given:], axis=2)


def table_noise(num_chunks, seed=0):
  """A supplied noise function: fresh random values per (chunk, step) from a table (the key unused);
  steps 0 .. S + 1 (the context pass draws S + 1 and discards it)."""
  steps = len(SamplerConfig().denoising_steps)
  shape = (num_chunks, steps + 2, 1, 4, 3, 8, 16)
  table = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)
  return lambda key, chunk, step, shape: table[chunk, step]


@pytest.mark.parametrize("supplied", [False, True])
def test_supplied_noise_rollout_matches_a_hand_written_loop(supplied):
  """Stream with a prompt switch and its KV recache: the same noise gives the hand-written loop's latents
  to float32 rounding (default noise: `sampler.gaussian_noise` of the seed's key)."""
  model = CausalWanModel(tiny(local_attn_frames=6), rngs=nnx.Rngs(5))
  first, second = text_cross(model, 0), text_cross(model, 1)
  noise = table_noise(4) if supplied else sampler.gaussian_noise
  rollout = Rollout(model, store_dtype=jnp.float32, backends=ALL_XLA, noise=noise)
  latents, _ = rollout.run([(0, first), (2, second)], num_chunks=4, seed=9, recache_chunks=2, segment_chunks=2)
  expected = hand_written_rollout(model, {0: first, 2: second}, 4, noise, jax.random.key(9), recache_chunks=2)
  assert relative_error(latents, expected) < 1e-5
  np.testing.assert_allclose(latents, expected, rtol=1e-4, atol=1e-5)
  assert rollout.compilations == {"segment": 1, "recache": 1}
  if supplied:  # the noise really came from the table
    default, _ = Rollout(model, store_dtype=jnp.float32).run([(0, first)], num_chunks=2, seed=9)
    assert relative_error(latents[:, :, :6], default) > 0.1


@jax.default_matmul_precision("highest")  # no TF32 on GPUs: the scan and the per-call loop round alike
def test_ground_truth_prefix_then_generation_matches_a_hand_written_loop():
  """`write_context` of given clean chunks, then `generate`: the state-level API eval_memory.py uses."""
  model = CausalWanModel(tiny(local_attn_frames=6), rngs=nnx.Rngs(6))
  prefix = np.random.default_rng(3).standard_normal((1, 4, 6, 8, 16)).astype(np.float32)
  noise = table_noise(5, seed=1)
  rollout = Rollout(model, store_dtype=jnp.float32, backends=ALL_XLA, noise=noise)
  config = model.config
  rollout_cross = rollout.cross_kv(jax.random.normal(jax.random.key(0), (1, config.text_len, config.text_dim)))
  state = rollout.write_context(rollout.init_state(4, recache_chunks=0), rollout_cross, prefix)
  assert int(state.next_chunk) == 2
  state, latents, _ = rollout.generate(state, rollout_cross, 3)
  assert int(state.next_chunk) == 5 and latents.shape == (1, 4, 9, 8, 16)
  # The same backends (XLA) and the same cross K/V on both sides: the comparison is exact on every platform.
  expected = hand_written_rollout(model, {0: rollout_cross}, 5, noise, jax.random.key(4), prefix=prefix)
  assert relative_error(latents, expected) < 1e-5
  np.testing.assert_allclose(latents, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(state.store.slot_chunk[:5], np.arange(5))
  with pytest.raises(ValueError, match="context latents must be \\[1, 4, a multiple of 3 frames, 8, 16\\]"):
    rollout.write_context(state, rollout_cross, prefix[:, :, :4])
  with pytest.raises(ValueError, match="noise function must return arrays of shape"):
    Rollout(model, store_dtype=jnp.float32, noise=lambda key, chunk, step, shape: jnp.zeros(3)).run(
        [(0, rollout_cross)], num_chunks=1)


def test_cross_kv_compiles_once_and_backends_used_names_each_op():
  model = CausalWanModel(tiny(local_attn_frames=6), rngs=nnx.Rngs(7))
  config = model.config
  rollout = Rollout(model, store_dtype=jnp.float32, backends=ALL_XLA)
  texts = [jax.random.normal(jax.random.key(seed), (1, config.text_len, config.text_dim)) for seed in range(3)]
  crosses = [rollout.cross_kv(text) for text in texts]
  assert rollout.compilations == {"cross_kv": 1} and rollout.backends_used == {}
  for cross, text in zip(crosses, texts, strict=True):
    expected = model.cross_kv(text)
    np.testing.assert_allclose(cross.k, expected.k, rtol=1e-5, atol=1e-6)
  rollout.run([(0, crosses[0])], num_chunks=4, seed=0)
  used = rollout.backends_used  # the dense op reaches a dispatcher only on some platforms
  assert {"block_topk", "selection_attention"} <= set(used) and all(names == ["xla"] for names in used.values())
