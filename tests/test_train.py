"""Teacher-forcing training: the one-pass [clean | noisy] forward through the model's own forward
reproduces the golden outputs of the forward it replaced and equals the rollout's chunk-by-chunk calls
(outputs and gradients), every OmniMem branch gets gradient, the loss falls on a fixed batch, resuming
from a checkpoint continues bit-for-bit, and the synthetic world is deterministic with the revisit
schedule it promises."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnimem_jax import training
from omnimem_jax.data import synthetic
from omnimem_jax.memory.store import init_store
from omnimem_jax.model.wan import CausalWanModel, masked_dense_attention
from tests.configs import ALL_XLA, tiny
from tests.fixtures import make_teacher_forcing_golden as golden

CHUNKS = 4  # chunk 3 is the first whose selection excludes the window (AWE)


def tiny_train_config(mode: str = "omnimem", **fields) -> training.TrainConfig:
  model = tiny(mode=mode, local_attn_frames=6, capacity_chunks=CHUNKS)
  world = synthetic.WorldConfig(channels=4, height=8, width=16, world_width=32, speed=4)
  defaults = dict(model=model, world=world, num_chunks=CHUNKS, batch_size=2, warmup_steps=1, learning_rate=3e-3)
  defaults.update(fields)
  return training.TrainConfig(**defaults)


def relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def rollout_velocity(model, clean, noisy, timesteps, text):
  """The inference path: chunk i's velocity from `model(...)` on a store holding the clean chunks < i,
  each written by a context pass at t = 0 (as the rollout does); a scan over chunks (traced once)."""
  config = model.config
  frames = config.memory.frames_per_chunk
  batch, chunks = timesteps.shape
  cross = model.cross_kv(text)
  per_chunk = lambda x: jnp.moveaxis(x.reshape(*x.shape[:2], chunks, frames, *x.shape[3:]), 2, 0)  # noqa: E731

  def one_chunk(store, inputs):
    chunk, noisy_chunk, clean_chunk, timestep = inputs
    velocity, _ = model(noisy_chunk, timestep, cross, store, chunk, backends=ALL_XLA)
    _, store = model(clean_chunk, jnp.zeros((batch,)), cross, store, chunk, backends=ALL_XLA)
    return store, velocity

  _, velocity = jax.lax.scan(one_chunk, init_store(config, batch, jnp.float32),
                             (jnp.arange(chunks), per_chunk(noisy), per_chunk(clean), timesteps.T))
  velocity = jnp.moveaxis(velocity, 0, 2)  # [B, C, chunks, frames, H, W]
  return velocity.reshape(*velocity.shape[:2], chunks * frames, *velocity.shape[4:])


def fresh_batch(config, seed):
  data = training.make_batch(dataclasses.replace(config, seed=seed), step=0)
  return {name: jnp.asarray(value) for name, value in data.items()}


@pytest.mark.parametrize("mode", golden.MODES)
def test_teacher_forcing_matches_golden_outputs(mode):
  """The stored outputs of the teacher-forcing forward of commit 5c1c859 (which copied the model's blocks,
  embedding and head), on the same inputs and model, under the precision they were made with: equal to
  float32 rounding, relative error (norm of the difference / norm of the expected) below 1e-5."""
  fixture = np.load(golden.OUTPUT)
  model = golden.golden_model(mode)
  inputs = {name: jnp.asarray(fixture[f"input_{name}_{mode}"]) for name in ("clean", "noisy", "timestep", "text")}
  for own in (True, False):
    with jax.default_matmul_precision("highest"):
      velocity, stats = training.teacher_forcing_forward(model, inputs["clean"], inputs["noisy"], inputs["timestep"],
                                                         inputs["text"], select_own_noisy_chunk=own)
    expected = fixture[f"velocity_{mode}_own{int(own)}"]
    assert velocity.shape == expected.shape
    assert relative_error(velocity, expected) < 1e-5, (mode, own, relative_error(velocity, expected))
    assert stats["recall"].shape == (model.config.num_layers,)


def test_forward_sequence_timesteps_per_chunk_positions_and_output_frames():
  """The model forward training uses: a timestep per chunk equal across chunks equals one per video; the
  output from a frame on is the tail of the full output; RoPE positions given explicitly are used (a
  common shift leaves all-visible attention unchanged, a permutation does not); bad arguments fail."""
  config = tiny(mode="dense")
  model = CausalWanModel(config, rngs=nnx.Rngs(4))
  rng = np.random.default_rng(12)
  frames = 3 * config.memory.frames_per_chunk
  latents = jnp.asarray(rng.standard_normal((2, config.in_channels, frames, config.latent_height,
                                             config.latent_width), dtype=np.float32))
  text = jnp.asarray(rng.standard_normal((2, config.text_len, config.text_dim), dtype=np.float32))
  timestep = jnp.asarray(rng.uniform(0, 1000, 2).astype(np.float32))
  attention = masked_dense_attention(jnp.ones((frames * config.tokens_per_frame,) * 2, bool))
  forward = functools.partial(model.forward_sequence, latents, text=text, attention=attention)
  full, _ = forward(timestep)
  per_chunk, _ = forward(jnp.repeat(timestep[:, None], 3, axis=1))
  np.testing.assert_allclose(per_chunk, full, rtol=1e-5, atol=1e-5)
  tail, _ = forward(jnp.repeat(timestep[:, None], 3, axis=1), first_output_frame=3)
  np.testing.assert_allclose(tail, full[:, :, 3:], rtol=1e-5, atol=1e-5)
  shifted, _ = forward(timestep, frame_positions=np.arange(frames) + 7)
  assert relative_error(shifted, full) < 1e-4
  permuted, _ = forward(timestep, frame_positions=rng.permutation(frames))
  assert relative_error(permuted, full) > 1e-3
  with pytest.raises(ValueError, match="first_output_frame must"):
    forward(jnp.repeat(timestep[:, None], 3, axis=1), first_output_frame=4)
  with pytest.raises(ValueError, match="frame_positions must be"):
    forward(timestep, frame_positions=np.arange(frames - 1))
  with pytest.raises(ValueError, match="beyond the RoPE table"):
    forward(timestep, frame_positions=np.arange(frames) + config.rope_max_frames)
  with pytest.raises(ValueError, match="timestep must be"):
    forward(jnp.zeros((2, 2)))


def test_teacher_forcing_equals_rollout_with_gradients_into_every_branch():
  config = tiny_train_config()
  model = CausalWanModel(config.model, rngs=nnx.Rngs(11))
  batch = fresh_batch(config, seed=5)
  noisy, timesteps, target = training.noised(batch, 3)
  graphdef, params = nnx.split(model)

  def tf_loss(params):
    velocity, _ = training.teacher_forcing_forward(nnx.merge(graphdef, params), batch["latents"], noisy, timesteps,
                                                   batch["text"], select_own_noisy_chunk=False)
    return jnp.mean(jnp.square(velocity - target)), velocity

  def rollout_loss(params):
    velocity = rollout_velocity(nnx.merge(graphdef, params), batch["latents"], noisy, timesteps, batch["text"])
    return jnp.mean(jnp.square(velocity - target)), velocity

  (loss, velocity), grads = jax.jit(jax.value_and_grad(tf_loss, has_aux=True))(params)
  (loss_ref, velocity_ref), grads_ref = jax.jit(jax.value_and_grad(rollout_loss, has_aux=True))(params)
  assert relative_error(velocity, velocity_ref) < 1e-4
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-4)
  flat, flat_ref = jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
  assert all(np.all(np.isfinite(g)) for g in flat)
  for g, g_ref in zip(flat, flat_ref, strict=True):
    assert relative_error(g, g_ref) < 1e-3
  # Every branch's gate (order cmp, slc, swa) and every projection of every layer gets gradient.
  attn = grads["blocks"]["self_attn"]
  gate = np.asarray(attn["g_proj"]["kernel"])  # [L, dim, heads * 3]
  assert np.all(np.abs(gate.reshape(*gate.shape[:2], -1, 3)).sum(axis=(1, 2)) > 0)
  bias = np.asarray(attn["g_proj"]["bias"]).reshape(config.model.num_layers, -1, 3)
  assert np.all(np.abs(bias).sum(axis=1) > 0)
  for name in ("q", "k", "v", "o"):
    assert np.all(np.abs(np.asarray(attn[name]["kernel"])).sum(axis=(1, 2)) > 0), name


@pytest.mark.parametrize("mode", ["window", "dense"])
def test_baseline_teacher_forcing_equals_rollout(mode):
  config = tiny_train_config(mode)
  model = CausalWanModel(config.model, rngs=nnx.Rngs(3))
  batch = fresh_batch(config, seed=6)
  noisy, timesteps, _ = training.noised(batch, 3)
  velocity, _ = jax.jit(training.teacher_forcing_forward)(model, batch["latents"], noisy, timesteps, batch["text"])
  velocity_ref = jax.jit(rollout_velocity)(model, batch["latents"], noisy, timesteps, batch["text"])
  assert relative_error(velocity, velocity_ref) < 1e-4


def test_official_own_chunk_selection_differs_from_rollout():
  """The official teacher-forcing AWE keeps the noisy chunk's own blocks selectable (a known
  train/inference difference); it changes outputs only from chunk 3 on."""
  config = tiny_train_config()
  model = CausalWanModel(config.model, rngs=nnx.Rngs(2))
  batch = fresh_batch(config, seed=9)
  noisy, timesteps, _ = training.noised(batch, 3)
  forward = jax.jit(training.teacher_forcing_forward, static_argnames="select_own_noisy_chunk")
  official, _ = forward(model, batch["latents"], noisy, timesteps, batch["text"])
  exact, _ = forward(model, batch["latents"], noisy, timesteps, batch["text"], select_own_noisy_chunk=False)
  np.testing.assert_allclose(official[:, :, :9], exact[:, :, :9], rtol=1e-5, atol=1e-5)
  assert relative_error(official[:, :, 9:], exact[:, :, 9:]) > 1e-4


def test_masks_follow_the_teacher_forcing_rules():
  memory = tiny(local_attn_frames=6).memory
  masks = training.chunk_masks(memory, 5, select_own_noisy_chunk=True)
  n = 5
  for q in range(2 * n):
    for k in range(2 * n):
      qi, ki, q_noisy, k_noisy = q % n, k % n, q >= n, k >= n
      visible = (ki == qi) if (q_noisy and k_noisy) else (ki < qi) if q_noisy else (not k_noisy and ki <= qi)
      assert masks.visible[q, k] == visible
      assert masks.recent[q, k] == (visible and qi - ki < 3)
      last = qi if qi < 3 else qi - 3
      candidate = visible and (ki <= last or (q_noisy and k_noisy))
      assert masks.candidates[q, k] == candidate, (q, k)


def fast_config():
  """Dense mode, 2-chunk clips, batch 2 (over 2 fake devices): the optimizer / checkpoint machinery
  is mode-independent, and the omnimem gradients are checked against the rollout above."""
  return tiny_train_config("dense", num_chunks=2, batch_size=2)


def test_loss_falls_on_a_fixed_batch():
  trainer = training.Trainer(fast_config())  # the resume test's config: one compilation
  batch = trainer.batch(0)
  losses = [trainer.step(batch)["loss"] for _ in range(20)]
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.7 * losses[0], losses


def test_resume_gives_the_identical_next_step(tmp_path):
  config = fast_config()
  first = training.Trainer(config, tmp_path / "run")
  assert first.mesh.devices.size == min(2, jax.device_count())  # CI: the batch split over 2 fake devices
  first.step()
  first.step()
  first.save()
  expected = first.step()
  first.close()
  resumed = training.Trainer(config, tmp_path / "run")
  assert resumed.step_count == 2
  got = resumed.step()
  resumed.close()
  assert got["loss"] == expected["loss"] and got["grad_norm"] == expected["grad_norm"]
  for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(first.state.params), strict=True):
    np.testing.assert_array_equal(a, b)


def test_export_is_a_generate_checkpoint(tmp_path):
  from omnimem_jax.convert import wan_dit

  trainer = training.Trainer(tiny_train_config())  # omnimem: the gates are saved and restored too
  path = trainer.export(tmp_path / "demo")
  restored = wan_dit.restore_model(path, dtype=jnp.float32)
  expected = nnx.to_pure_dict(nnx.state(trainer.model(), nnx.Param))
  got = nnx.to_pure_dict(nnx.state(restored, nnx.Param))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(a, b)


def test_train_config_round_trips_and_rejects_unknown_fields():
  config = tiny_train_config(sigma_shift=3.0, select_own_noisy_chunk=False)
  assert training.TrainConfig.from_dict(config.to_dict()) == config
  assert training.TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['learning_rte'\]"):
    training.TrainConfig.from_dict({**config.to_dict(), "learning_rte": 1e-3})
  with pytest.raises(ValueError, match=r"unknown WorldConfig field\(s\) \['sped'\]"):
    training.TrainConfig.from_dict({**config.to_dict(), "world": {"sped": 4}})
  with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['depth'\]"):
    training.TrainConfig.from_dict({**config.to_dict(), "model": {**config.model.to_dict(), "depth": 2}})


def test_train_config_errors():
  with pytest.raises(ValueError, match="must match the model"):
    tiny_train_config(world=synthetic.WorldConfig(height=4))
  with pytest.raises(ValueError, match="num_chunks"):
    tiny_train_config(num_chunks=0)


# ---- the synthetic world ---------------------------------------------------------------------------


def test_world_is_deterministic_by_seed_and_any_length():
  config = synthetic.WorldConfig()
  a, b, c = synthetic.video(config, 3, 40), synthetic.video(config, 3, 40), synthetic.video(config, 4, 40)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).mean() > 0.5
  assert a.shape == (4, 40, 8, 16) and a.dtype == np.float32
  np.testing.assert_array_equal(synthetic.video(config, 3, 10, first_frame=30), a[:, 30:])
  assert abs(float(a.std()) - 1.0) < 0.2


def test_revisit_schedule_points_at_identical_frames():
  config = synthetic.WorldConfig(world_width=48, speed=4)  # period 12 frames = 4 chunks
  frames = 40
  video = synthetic.video(config, 7, frames)
  source = synthetic.revisit_schedule(config, frames)
  assert config.period == 12
  np.testing.assert_array_equal(source[:12], -1)
  np.testing.assert_array_equal(source[12:], np.arange(12, frames) % 12)
  for frame in range(12, frames):
    np.testing.assert_array_equal(video[:, frame], video[:, source[frame]])
  for frame in range(1, 12):  # first laps never repeat a view
    assert all(np.abs(video[:, frame] - video[:, earlier]).max() > 0.1 for earlier in range(frame))
  distances = synthetic.revisit_distances(config, frames)
  assert distances[12] == 12 and distances[39] == 36 and distances[0] == -1
  # The camera pans: frame t+1 shows frame t shifted by `speed` columns.
  np.testing.assert_array_equal(video[:, 1, :, :-4], video[:, 0, :, 4:])


def test_world_config_errors():
  with pytest.raises(ValueError, match="speed"):
    synthetic.WorldConfig(world_width=50, speed=4)
  with pytest.raises(ValueError, match="world_width"):
    synthetic.WorldConfig(world_width=8, speed=4)


def test_revisit_metrics_score_copies_and_group_by_distance():
  from omnimem_jax import evaluation

  config = synthetic.WorldConfig(world_width=48, speed=4)
  truth = synthetic.video(config, 1, 30)
  source = synthetic.revisit_schedule(config, 30)
  data_range = float(truth.max() - truth.min())
  rng = np.random.default_rng(0)
  noisy = truth + 0.1 * rng.standard_normal(truth.shape).astype(np.float32)
  scores = evaluation.revisit_scores(noisy, truth, source, np.arange(30), data_range)
  assert sorted(scores) == [12, 24] and len(scores[12]["psnr"]) == 12 and len(scores[24]["psnr"]) == 6
  expected = 10 * np.log10(data_range ** 2 / 0.01)
  assert abs(np.mean(scores[12]["psnr"]) - expected) < 0.5
  assert evaluation.ssim(truth[:, 0], truth[:, 0], data_range) == pytest.approx(1.0)
  assert evaluation.ssim(noisy[:, 0], truth[:, 0], data_range) < 0.99
  assert evaluation.ssim(rng.standard_normal(truth[:, 0].shape), truth[:, 0], data_range) < 0.2
  summary = evaluation.summarise([scores], min_distance=13)
  assert summary["frames"] == 6 and set(summary["by_distance"]) == {"12", "24"}


def test_picks_unchanged_compares_sets_per_group_against_a_loop():
  """Random ids with padding and reordering: the share equals a plain per-group set count; a rollout
  against itself keeps every pick; mismatched shapes or nothing picked are refused."""
  from omnimem_jax import evaluation

  rng = np.random.default_rng(7)
  shape = (3, 2, 4, 1, 2, 5, 6)  # chunks, calls, layers, batch, heads, groups, top_k
  reference = np.stack([rng.permutation(40)[:6] for _ in range(int(np.prod(shape[:-1])))]).reshape(shape)
  reference[0, ..., 3:] = -1  # chunk 0: fewer candidates than top_k
  other = reference.copy()
  changed = rng.random(shape) < 0.3
  other[changed] = rng.integers(40, 80, changed.sum())  # ids the reference never picked
  other = np.take_along_axis(other, np.argsort(rng.random(shape), axis=-1), axis=-1)  # any order
  result = evaluation.picks_unchanged(reference, other)
  ref_rows, other_rows = reference.reshape(-1, 6), other.reshape(-1, 6)
  kept = sum(len(set(r[r >= 0]) & set(o)) for r, o in zip(ref_rows, other_rows, strict=True))
  picked = (reference >= 0).sum()
  assert result["picks"] == picked and result["fraction_unchanged"] == pytest.approx(kept / picked)
  assert 0.5 < result["fraction_unchanged"] < 0.9 and len(result["per_layer"]) == 4 and len(result["per_chunk"]) == 3
  layer1 = sum(len(set(r[r >= 0]) & set(o)) for r, o in
               zip(reference[:, :, 1].reshape(-1, 6), other[:, :, 1].reshape(-1, 6), strict=True))
  assert result["per_layer"][1] == pytest.approx(layer1 / (reference[:, :, 1] >= 0).sum())
  assert evaluation.picks_unchanged(reference, reference)["fraction_unchanged"] == 1.0
  with pytest.raises(ValueError, match="ids must both be"):
    evaluation.picks_unchanged(reference, other[:2])
  with pytest.raises(ValueError, match="picked nothing"):
    evaluation.picks_unchanged(np.full(shape, -1), other)
