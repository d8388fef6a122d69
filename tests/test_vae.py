"""Wan VAE: parity with diffusers' AutoencoderKLWan (tiny random fixture), streaming decode, converters."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnimem_jax.convert import wan_vae
from omnimem_jax.convert.state_dict import load_state_dict
from omnimem_jax.model.vae import Conv2d, VAEConfig, WanVAE, to_uint8, video_frames

FIXTURES = Path(__file__).parent / "fixtures"


def _rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def io():
  return dict(np.load(FIXTURES / "vae_tiny_io.npz"))


@pytest.fixture(scope="module")
def config(io) -> VAEConfig:
  record = json.loads(str(io["config"]))
  config = VAEConfig.from_preset("tiny")
  assert (config.base_dim, config.z_dim, list(config.dim_mult), config.num_res_blocks) == (
      record["base_dim"], record["z_dim"], record["dim_mult"], record["num_res_blocks"])
  assert list(config.latents_mean) == record["latents_mean"] and list(config.latents_std) == record["latents_std"]
  return config


@pytest.fixture(scope="module")
def vae(config) -> WanVAE:
  return wan_vae.vae_from_state_dict(load_state_dict(FIXTURES / "vae_tiny_diffusers.safetensors"), config)


@pytest.fixture(scope="module")
def decode_chunk():
  return nnx.jit(lambda m, z, c, first: m.decode_chunk(z, c, first=first), static_argnames="first")


@pytest.fixture(scope="module")
def whole_decode(vae, io):
  """Decoded at full float32 precision: a module-scoped fixture is set up before the function-scoped
  precision fixture of tests/conftest.py applies (at the default precision, TF32 convolutions on an
  H100, it was 1.1e-4 from diffusers' decode and 2.3e-4 from the streamed decode)."""
  with jax.default_matmul_precision("highest"):
    return np.asarray(nnx.jit(lambda m, z: m.decode(z))(vae, io["latents"]))


def test_decoder_matches_diffusers(whole_decode, io):
  assert whole_decode.shape == io["decoded"].shape == (1, 21, 32, 32, 3)
  assert _rel_err(whole_decode, io["decoded"]) < 1e-4


def test_encoder_matches_diffusers(vae, io):
  latents = nnx.jit(lambda m, v: m.encode(v))(vae, io["video"])
  assert latents.shape == io["encoded"].shape == (1, 3, 4, 4, 4)
  assert _rel_err(latents, io["encoded"]) < 1e-4


def test_streaming_chunks_equal_whole_decode(vae, io, decode_chunk, whole_decode):
  """Chunk 0 (latent frames 0..2) -> 9 frames, then 3 latent frames -> 12 frames each; the cache is a
  pytree carried through a jitted call, and the concatenation equals diffusers' whole decode."""
  latents = io["latents"]
  cache = vae.init_decode_cache(1, 4, 4)
  first, cache = decode_chunk(vae, latents[:, 0:3], cache, True)
  second, cache = decode_chunk(vae, latents[:, 3:6], cache, False)
  assert first.shape[1] == video_frames(3, first=True) == 9
  assert second.shape[1] == video_frames(3, first=False) == 12
  streamed = np.concatenate([first, second], axis=1)
  assert _rel_err(streamed, io["decoded"]) < 1e-4
  np.testing.assert_allclose(streamed, whole_decode, atol=1e-5)
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(cache))


def test_upsample_2x_equals_a_conv_over_the_nearest_upsampled_frames():
  x = jax.random.normal(jax.random.key(1), (2, 3, 5, 6, 4))
  with nnx.use_eager_sharding(False):
    conv = Conv2d(4, 3, nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
  conv.bias[...] = jax.random.normal(jax.random.key(2), (3,))
  want = conv(jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3))
  got = conv.upsample_2x(x)
  assert got.shape == want.shape == (2, 3, 10, 12, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_streaming_encode_matches_whole(vae, io):
  video = io["video"]
  cache = vae.init_encode_cache(1, 32, 32)
  encode_chunk = nnx.jit(lambda m, v, c, first: m.encode_chunk(v, c, first=first), static_argnames="first")
  head, cache = encode_chunk(vae, video[:, :5], cache, True)  # 1 + 4 frames -> 2 latents
  tail, _ = encode_chunk(vae, video[:, 5:], cache, False)
  np.testing.assert_allclose(np.concatenate([head, tail], axis=1), io["encoded"], rtol=1e-4, atol=1e-5)


def test_original_layout_converts_to_the_same_params(config):
  diffusers = wan_vae.vae_params(load_state_dict(FIXTURES / "vae_tiny_diffusers.safetensors"), config)
  original_state = load_state_dict(FIXTURES / "vae_tiny_original.safetensors")
  assert wan_vae.detect_layout(original_state) == "original"
  original = wan_vae.vae_params(original_state, config)
  jax.tree.map(np.testing.assert_array_equal, diffusers, original)


def test_wrong_checkpoint_kind_is_refused(config):
  dit = {"blocks.0.self_attn.q.weight": np.zeros((8, 8), np.float32), "patch_embedding.weight": np.zeros(3)}
  with pytest.raises(ValueError, match=r"not a Wan 2\.1 VAE checkpoint"):
    wan_vae.vae_params(dit, config)
  decoder_only = {k: v for k, v in load_state_dict(FIXTURES / "vae_tiny_diffusers.safetensors").items()
                  if k.startswith("decoder.")}
  with pytest.raises(ValueError, match="missing"):
    wan_vae.vae_params(decoder_only, config)


def test_config_mismatch_is_reported():
  state = load_state_dict(FIXTURES / "vae_tiny_diffusers.safetensors")
  with pytest.raises(ValueError, match="shape mismatch"):
    wan_vae.vae_params(state, VAEConfig.from_preset("tiny", base_dim=8))


def test_bad_inputs(vae):
  cache = vae.init_decode_cache(1, 4, 4)
  with pytest.raises(ValueError, match="latents must be"):
    vae.decode_chunk(jnp.zeros((1, 3, 4, 4, 16)), cache, first=True)
  with pytest.raises(ValueError, match="do not match the cache"):
    vae.decode_chunk(jnp.zeros((1, 3, 4, 6, 4)), cache, first=True)
  with pytest.raises(ValueError, match="1 \\+ 4k frames"):
    vae.encode(jnp.zeros((1, 4, 32, 32, 3)))
  with pytest.raises(ValueError, match="multiples of 8"):
    vae.encode(jnp.zeros((1, 5, 30, 32, 3)))
  with pytest.raises(ValueError, match="temporal_downsample"):
    VAEConfig(temporal_downsample=(True,))


def test_to_uint8():
  frames = jnp.array([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0])
  np.testing.assert_array_equal(to_uint8(frames), [0, 0, 128, 191, 255, 255])


def test_real_config_parameter_count():
  """The wan2.1 preset has the released VAE's 126.89M parameters (73.30M in the decoder side)."""
  abstract = nnx.eval_shape(lambda: WanVAE(VAEConfig.from_preset("wan2.1"), rngs=nnx.Rngs(0)))

  def count(module):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))

  assert count(abstract) == 126_892_531
  assert count(abstract.decoder) + count(abstract.post_quant_conv) == 73_295_603


def test_orbax_round_trip(tmp_path, config, vae):
  output = wan_vae.convert_checkpoint(FIXTURES / "vae_tiny_original.safetensors", tmp_path / "vae", config)
  restored = wan_vae.restore_vae(output)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(restored, nnx.Param)),
               nnx.to_pure_dict(nnx.state(vae, nnx.Param)))
  with pytest.raises(FileExistsError):
    wan_vae.convert_checkpoint(FIXTURES / "vae_tiny_original.safetensors", output, config)
  with pytest.raises(ValueError, match=r"not a Wan 2\.1 VAE"):
    wan_vae.convert_checkpoint(FIXTURES / "umt5_tiny_hf.safetensors", tmp_path / "other", config)

