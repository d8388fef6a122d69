"""umT5 encoder: parity with transformers' UMT5EncoderModel (tiny random fixture), padding, converters,
tokenizer glue (tokenizer.json and spiece.model), bad input."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnimem_jax.convert import umt5, wan_vae
from omnimem_jax.convert.state_dict import load_state_dict
from omnimem_jax.model import text
from omnimem_jax.model.text import TextEncoderConfig

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def io():
  return dict(np.load(FIXTURES / "umt5_tiny_io.npz"))


@pytest.fixture(scope="module")
def config(io) -> TextEncoderConfig:
  record = json.loads(str(io["config"]))
  config = TextEncoderConfig.from_preset("tiny")
  assert (config.vocab_size, config.dim, config.num_heads, config.head_dim, config.ffn_dim, config.num_layers,
          config.num_buckets, config.max_distance, config.text_len) == (
      record["vocab_size"], record["d_model"], record["num_heads"], record["d_kv"], record["d_ff"],
      record["num_layers"], record["relative_attention_num_buckets"], record["relative_attention_max_distance"],
      record["text_len"])
  return config


@pytest.fixture(scope="module")
def encoder(config):
  return umt5.text_encoder_from_state_dict(load_state_dict(FIXTURES / "umt5_tiny_hf.safetensors"), config)


def test_matches_transformers_with_padding(encoder, io):
  """Rows: a full-length prompt, a padded one, an EOS-only one. Valid positions match transformers
  (f32 rel. err < 1e-5); padded positions are exactly zero, as Wan's trim-and-pad leaves them."""
  hidden = np.asarray(encoder(jnp.asarray(io["ids"]), jnp.asarray(io["mask"])))
  valid = io["mask"].astype(bool)
  got, want = hidden[valid], io["hidden"][valid]
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
  for row in range(len(valid)):
    assert np.linalg.norm(hidden[row][valid[row]] - io["hidden"][row][valid[row]]) / np.linalg.norm(
        io["hidden"][row][valid[row]]) < 1e-5
  assert np.all(hidden[~valid] == 0.0)


def test_padding_does_not_change_valid_tokens(encoder, io):
  """A prompt's embeddings do not depend on how much padding follows it."""
  ids, mask = io["ids"][1:2], io["mask"][1:2]
  length = int(mask.sum())
  short = np.asarray(encoder(jnp.asarray(ids[:, :length]), jnp.asarray(mask[:, :length])))
  long = np.asarray(encoder(jnp.asarray(ids), jnp.asarray(mask)))
  np.testing.assert_allclose(long[:, :length], short, rtol=1e-5, atol=1e-6)


def test_relative_position_buckets_match_transformers(io):
  relative = io["relative"]
  for name, (buckets, distance) in (("tiny", (8, 16)), ("real", (32, 128))):
    table = text.relative_position_buckets(512, buckets, distance)  # [query, key] -> bucket of key - query
    np.testing.assert_array_equal(table[511, :], io[f"buckets_{name}"][relative <= 0])
    np.testing.assert_array_equal(table[0, :], io[f"buckets_{name}"][relative >= 0])


def test_wan_layout_converts_to_the_same_params(config):
  hf = umt5.text_encoder_params(load_state_dict(FIXTURES / "umt5_tiny_hf.safetensors"), config)
  wan_state = load_state_dict(FIXTURES / "umt5_tiny_wan.safetensors")
  assert umt5.detect_layout(wan_state) == "wan"
  wan = umt5.text_encoder_params(wan_state, config)
  assert hf.keys() == wan.keys() and hf["layers"].keys() == wan["layers"].keys()
  for key in ("token_embedding", "final_norm"):
    np.testing.assert_array_equal(hf[key], wan[key])
  for key in hf["layers"]:
    np.testing.assert_array_equal(hf["layers"][key], wan["layers"][key])


def test_full_t5_checkpoint_ignores_the_decoder(config):
  state = load_state_dict(FIXTURES / "umt5_tiny_hf.safetensors")
  state = {**state, "encoder.embed_tokens.weight": state["shared.weight"], "lm_head.weight": np.zeros((2, 2)),
           "decoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((2, 2))}
  umt5.text_encoder_params(state, config)


def test_wrong_checkpoint_kind_is_refused(config):
  vae = load_state_dict(FIXTURES / "vae_tiny_diffusers.safetensors")
  with pytest.raises(ValueError, match="not a umT5 encoder checkpoint"):
    umt5.text_encoder_params(vae, config)
  state = load_state_dict(FIXTURES / "umt5_tiny_hf.safetensors")
  with pytest.raises(ValueError, match="shape mismatch"):
    umt5.text_encoder_params(state, TextEncoderConfig.from_preset("tiny", num_layers=3))


def test_encoder_input_errors(encoder):
  with pytest.raises(ValueError, match=r"\[B, L\]"):
    encoder(jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 5), jnp.int32))


# ----------------------------------------------------------------------------------------------------
# tokenizer glue


@pytest.fixture(scope="module")
def tokens():
  return dict(np.load(FIXTURES / "tokenizer_io.npz"))


@pytest.mark.parametrize(("directory", "package"), [("tokenizer_wordlevel", "tokenizers"),
                                                     ("tokenizer_spiece", "sentencepiece")])
def test_tokenizer_matches_reference(tokens, directory, package):
  """Cleaning, EOS, padding and truncation as transformers' tokenizer (max_length, truncation) gives;
  the third prompt is longer than text_len and warns."""
  pytest.importorskip(package)
  tokenizer = text.load_tokenizer(FIXTURES / directory, text_len=int(tokens["text_len"]))
  prompts = [str(p) for p in tokens["prompts"]]
  with pytest.warns(UserWarning, match="longer than text_len") as record:
    ids, mask = tokenizer(prompts)
  assert any("prompt 2 is longer" in str(w.message) for w in record)
  name = directory.removeprefix("tokenizer_")
  np.testing.assert_array_equal(ids, tokens[f"{name}_ids"])
  np.testing.assert_array_equal(mask, tokens[f"{name}_mask"])


def test_short_prompts_do_not_warn(tokens, recwarn):
  pytest.importorskip("tokenizers")
  tokenizer = text.load_tokenizer(FIXTURES / "tokenizer_wordlevel", text_len=16)
  _, mask = tokenizer(["a cat", ""])
  assert not [w for w in recwarn if "longer than text_len" in str(w.message)]
  np.testing.assert_array_equal(mask.sum(axis=1), [3, 1])  # words + EOS; an empty prompt is EOS alone


def test_encode_prompts_end_to_end(encoder, config):
  pytest.importorskip("tokenizers")
  tokenizer = text.load_tokenizer(FIXTURES / "tokenizer_wordlevel", text_len=config.text_len)
  context = text.encode_prompts(encoder, tokenizer, ["a red dog runs", "a cat"])
  assert context.shape == (2, config.text_len, config.dim)
  _, mask = tokenizer(["a red dog runs", "a cat"])
  assert np.all(np.asarray(context)[mask == 0] == 0) and np.all(np.abs(np.asarray(context)[mask == 1]).sum(-1) > 0)
  with pytest.raises(ValueError, match="text_len"):
    text.encode_prompts(encoder, text.load_tokenizer(FIXTURES / "tokenizer_wordlevel", text_len=8), ["a cat"])


def test_missing_tokenizer_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"tokenizer\.json .* spiece\.model"):
    text.load_tokenizer(tmp_path)
  with pytest.raises(FileNotFoundError, match="no tokenizer"):
    text.load_tokenizer(tmp_path / "does-not-exist")


def test_clean_prompt():
  assert text.clean_prompt("  a  big\n\tred dog &amp;amp; cat ") == "a big red dog & cat"


def test_orbax_round_trip(tmp_path, config, encoder):
  output = umt5.convert_checkpoint(FIXTURES / "umt5_tiny_wan.safetensors", tmp_path / "t5", config)
  restored = umt5.restore_text_encoder(output)
  for name in ("token_embedding", "final_norm"):
    np.testing.assert_array_equal(getattr(restored, name)[...], getattr(encoder, name)[...])
  for name, value in nnx.to_pure_dict(nnx.state(restored.layers, nnx.Param)).items():
    np.testing.assert_array_equal(value, getattr(encoder.layers, name)[...])
  with pytest.raises(ValueError, match="expected 'wan_vae'"):
    wan_vae.restore_vae(output)


@pytest.mark.parametrize(("directory", "package"), [("tokenizer_wordlevel", "tokenizers"),
                                                     ("tokenizer_spiece", "sentencepiece")])
def test_prompt_over_512_tokens_is_truncated_with_a_warning(directory, package):
  pytest.importorskip(package)
  tokenizer = text.load_tokenizer(FIXTURES / directory)  # Wan's text_len = 512
  with pytest.warns(UserWarning, match="prompt 0 is longer than text_len = 512 tokens"):
    ids, mask = tokenizer(["a cat walks on the grass " * 120])  # 600 words
  assert ids.shape == mask.shape == (1, 512) and mask.all() and ids[0, -1] == 1  # EOS kept last
