"""The demo's pixel world (`data.landmarks`), its codec (`training.codec`), the revisit geometry
(`synthetic.earlier_visits`), the revisit figure (`evaluation.revisit_picks`) and the label font (`glyphs`)."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnimem_jax import evaluation, glyphs
from omnimem_jax.generation import panels
from omnimem_jax.convert import wan_vae
from omnimem_jax.convert.state_dict import load_state_dict
from omnimem_jax.data import landmarks, synthetic
from omnimem_jax.model.vae import VAEConfig, WanVAE
from omnimem_jax.training import codec

FIXTURES = Path(__file__).parent / "fixtures"
WORLD = synthetic.WorldConfig(channels=4, world_width=40, speed=2)  # period 20 latent frames


def test_pixel_world_follows_the_latent_camera_and_repeats_every_orbit():
  video = landmarks.video(WORLD, seed=3, latent_frames=2 * WORLD.period + 2)
  assert video.shape == (landmarks.video_frames(2 * WORLD.period + 2), 64, 128, 3) and video.dtype == np.float32
  assert video.min() >= -1.0 and video.max() <= 1.0
  scene = landmarks.panorama(WORLD, seed=3)
  columns = synthetic.camera_columns(WORLD, 5)
  for latent in range(5):  # video frame 4 j shows the view of latent frame j
    view = np.take(scene, (landmarks.PIXELS_PER_LATENT * columns[latent] + np.arange(128)) % scene.shape[1], axis=1)
    np.testing.assert_array_equal(video[landmarks.FRAMES_PER_LATENT * latent], view)
  period = landmarks.FRAMES_PER_LATENT * WORLD.period
  np.testing.assert_array_equal(video[period:], video[:-period])  # every orbit repeats exactly
  assert not np.array_equal(video[0], video[landmarks.FRAMES_PER_LATENT])  # the camera moves


def test_worlds_differ_and_hold_distinct_landmark_colours():
  first, second = landmarks.panorama(WORLD, 0), landmarks.panorama(WORLD, 1)
  assert np.abs(first - second).mean() > 0.05
  colours = np.unique(np.round((first + 1) * 4).reshape(-1, 3), axis=0)
  assert len(colours) >= 12  # sky, hills, ground and several saturated landmarks, not a blur


def test_earlier_visits_are_whole_orbits_back():
  world = synthetic.WorldConfig(world_width=96, speed=4)  # period 24 frames = 8 chunks
  visits = synthetic.earlier_visits(world, 20)
  expected = np.zeros((20, 20), bool)
  for chunk in range(20):
    for back in (8, 16):
      if chunk >= back:
        expected[chunk, chunk - back] = True
  np.testing.assert_array_equal(visits, expected)
  uneven = synthetic.earlier_visits(synthetic.WorldConfig(world_width=40, speed=4), 5)  # period 10 frames
  # chunk 3 = frames 9-11 repeats frames 0-1 (chunk 0); chunk 4 = frames 12-14 repeats frames 2-4 (chunks 0, 1)
  assert [np.flatnonzero(row).tolist() for row in uneven] == [[], [], [], [0], [0, 1]]


def test_revisit_picks_against_hand_counts():
  chunks, bins, period = 12, 12, 8
  visits = np.zeros((chunks, chunks), bool)
  for chunk in range(period, chunks):
    visits[chunk, chunk - period] = True
  rng = np.random.default_rng(0)
  hist = rng.integers(0, 5, (chunks, 2, bins))
  hist[:, :, :3] += 50  # picks inside the window are left out
  result = evaluation.revisit_picks(hist, visits, min_distance=3)
  hits = sum(hist[c, :, period].sum() for c in range(period, chunks))
  total = sum(hist[c, :, 3:c + 1].sum() for c in range(period, chunks))
  chance = sum(hist[c, :, 3:c + 1].sum() / (c + 1 - 3) for c in range(period, chunks))
  assert result["fraction_from_earlier_visit"] == pytest.approx(hits / total)
  assert result["chance"] == pytest.approx(chance / total)
  assert result["chunks_measured"] == chunks - period and result["picks"] == total
  perfect = np.zeros_like(hist)
  for c in range(period, chunks):
    perfect[c, :, period] = 4
  assert evaluation.revisit_picks(perfect, visits, 3)["fraction_from_earlier_visit"] == 1.0
  assert evaluation.revisit_picks(hist, np.zeros_like(visits), 3) is None  # nothing to measure
  with pytest.raises(ValueError, match="bins"):
    evaluation.revisit_picks(hist[:, :, :6], visits, 3)


def test_label_bar_draws_the_font():
  mask = glyphs.text_mask("Hi 1", scale=2)
  assert mask.shape == (14, 2 * (4 * 6 - 1))
  np.testing.assert_array_equal(glyphs.text_mask("I")[:, 2], np.ones(7, bool))  # the stem of the I
  bar = glyphs.label_bar("omnimem", 128)
  assert bar.shape == (20, 128, 3) and bar.dtype == np.uint8
  assert (bar == 255).all(axis=-1).sum() == glyphs.text_mask("OMNIMEM", 2).sum()
  with pytest.raises(ValueError, match="no glyph"):
    glyphs.text_mask("é")
  with pytest.raises(ValueError, match="needs"):
    glyphs.label_bar("a much too long label", 40)


@pytest.fixture(scope="module")
def tiny_codec() -> codec.CodecConfig:
  vae = dataclasses.replace(VAEConfig.from_preset("tiny"), latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
  return codec.CodecConfig(world=WORLD, vae=vae, latent_frames=2, batch_size=1, num_worlds=2)


def test_codec_trains_and_exports_normalising_statistics(tmp_path, tiny_codec):
  """One step of training (finite loss and KL), then the export: the restored codec carries the per-channel
  mean and standard deviation of the trained codec's latents of the statistics worlds, which normalise them."""
  start = wan_vae.vae_from_state_dict(load_state_dict(FIXTURES / "vae_tiny_diffusers.safetensors"), tiny_codec.vae)
  vae, history = codec.train_codec(tiny_codec, steps=1, start=start, log_every=1)  # (fresh weights: minutes of CPU)
  assert [entry["step"] for entry in history] == [1]
  assert np.isfinite(history[0]["loss"]) and history[0]["kl"] >= 0 and history[0]["l1"] > 0
  restored = wan_vae.restore_vae(codec.export_codec(vae, tiny_codec, tmp_path / "codec", steps=1,
                                                    statistics_worlds=2))
  raw = codec.encode_worlds(vae, WORLD, codec.statistics_worlds(tiny_codec, 2), 2 * tiny_codec.latent_frames)
  assert raw.shape == (2, 4, 4, 8, 16) and np.isfinite(raw).all()
  mean, std = raw.mean(axis=(0, 2, 3, 4)), raw.std(axis=(0, 2, 3, 4))
  np.testing.assert_allclose(restored.config.latents_mean, mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(restored.config.latents_std, std, rtol=1e-5)
  normalised = np.asarray(restored.normalise(np.moveaxis(raw, 1, -1)))
  np.testing.assert_allclose(normalised.mean(axis=(0, 1, 2, 3)), 0.0, atol=1e-4)
  resumed, steps = codec.resume_codec(tmp_path / "codec", tiny_codec)  # to train further: statistics (0, 1) again
  assert steps == 1 and resumed.config == tiny_codec.vae
  jax.tree.map(np.testing.assert_array_equal, nnx.state(resumed, nnx.Param), nnx.state(vae, nnx.Param))
  other = dataclasses.replace(tiny_codec, vae=dataclasses.replace(tiny_codec.vae, base_dim=2 * tiny_codec.vae.base_dim))
  with pytest.raises(ValueError, match="not of the architecture trained here"):
    codec.resume_codec(tmp_path / "codec", other)
  with pytest.raises(ValueError, match="z_dim"):
    dataclasses.replace(tiny_codec, world=dataclasses.replace(WORLD, channels=8))


def test_panels_side_by_side_with_labels_and_captions():
  rng = np.random.default_rng(0)
  videos = [rng.integers(0, 256, (3, 64, 128, 3), dtype=np.uint8) for _ in range(3)]
  frames = panels.compose(videos, ["omnimem", "window", "dense"], ["t=0.0s", "t=0.1s", "t=0.1s"], upscale=2)
  bar = glyphs.label_bar("omnimem", 256).shape[0]
  assert frames.shape == (3, 2 * bar + 128, 3 * 256 + 2 * panels.GAP, 3) and frames.dtype == np.uint8
  right = 2 * (256 + panels.GAP)
  np.testing.assert_array_equal(frames[:, bar:bar + 128:2, right:right + 256:2], videos[2])  # nearest 2x upscale
  np.testing.assert_array_equal(frames[1, -bar:], frames[2, -bar:])  # same caption, same strip
  assert not np.array_equal(frames[0, -bar:], frames[1, -bar:])
  with pytest.raises(ValueError, match="one label per panel"):
    panels.compose(videos, ["a"], ["", "", ""])
