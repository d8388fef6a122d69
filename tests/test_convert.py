"""DiT converter: every accepted layout, weight-set choice, prefix stripping, LoRA merge, gates, file
reading, and each error path. State dicts are synthesised from the fixture's real Wan key names."""

import json
import logging
import os
import re
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from omnimem_jax import checkpoints
from omnimem_jax.config import ModelConfig
from omnimem_jax.convert import state_dict as sd
from omnimem_jax.convert import wan_dit
from omnimem_jax.memory.store import init_store
from omnimem_jax.model.vae import VAEConfig
from omnimem_jax.model.wan import CausalWanModel
from tests.configs import tiny

ORIGINAL = "tests/fixtures/wan_dit_original.safetensors"
DIFFUSERS = "tests/fixtures/wan_dit_diffusers.safetensors"
VAE = "tests/fixtures/vae_tiny_diffusers.safetensors"
CLI_ENV = {"PYTHONPATH": os.pathsep.join([".", "kernels"]), "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def original():
  return {key: np.array(value) for key, value in sd.load_state_dict(ORIGINAL).items()}


def convert(tree, config=None, **kwargs):
  """The steps `convert_checkpoint` runs after reading a file."""
  state = sd.merge_lora(sd.strip_prefixes(sd.pick_weight_set(tree)))
  return wan_dit.convert_state_dict(state, config or tiny(mode="dense"), dtype=jnp.float32, **kwargs)[0]


def assert_same_params(actual, expected):
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


def test_diffusers_and_original_layouts_give_the_same_parameters(original):
  assert wan_dit.detect_layout(sd.load_state_dict(DIFFUSERS)) == "diffusers"
  assert wan_dit.detect_layout(original) == "original"
  assert_same_params(convert(sd.load_state_dict(DIFFUSERS)), convert(original))


def test_transposes(original):
  params = convert(original)
  np.testing.assert_array_equal(params["blocks"]["self_attn"]["q"]["kernel"][1], original["blocks.1.self_attn.q.weight"].T)
  np.testing.assert_array_equal(params["patch_embedding"]["kernel"],
                                original["patch_embedding.weight"].transpose(2, 3, 4, 1, 0))
  np.testing.assert_array_equal(params["blocks"]["modulation"][0], original["blocks.0.modulation"][0])
  np.testing.assert_array_equal(params["blocks"]["norm_cross_scale"][1], original["blocks.1.norm3.weight"])
  np.testing.assert_array_equal(params["head_modulation"], original["head.modulation"][0])


def test_training_checkpoints_prefer_ema_and_strip_wrappers(original):
  reference = convert(original)
  other = {key: value + 1.0 for key, value in original.items()}
  self_forcing = {"generator": {f"model.{k}": v for k, v in other.items()},
                  "critic": {f"model.{k}": v for k, v in other.items()},
                  "generator_ema": {f"model._fsdp_wrapped_module.{k}": v for k, v in original.items()}}
  assert_same_params(convert(self_forcing), reference)
  causvid = {"generator": {f"model.{k}": v for k, v in original.items()}, "step": 100}
  assert_same_params(convert(causvid), reference)
  compiled_ddp = {"model": {f"module._orig_mod.{k}": v for k, v in original.items()}}
  assert_same_params(convert(compiled_ddp), reference)
  blocks_wrapped = {k.replace("blocks.1.", "blocks.1._checkpoint_wrapped_module."): v for k, v in original.items()}
  assert_same_params(convert(blocks_wrapped), reference)


def test_strip_prefix_collision_is_an_error():
  with pytest.raises(ValueError, match="both become"):
    sd.strip_prefixes({"model.a.weight": np.ones(1), "module.a.weight": np.ones(1)})


def lora_pair(rng, weight, rank=3):
  return (rng.standard_normal((rank, weight.shape[1])).astype(np.float32),
          rng.standard_normal((weight.shape[0], rank)).astype(np.float32))


@pytest.mark.parametrize("style", ["separate_file", "peft_in_model"])
def test_longlive_lora_is_merged(original, style):
  rng = np.random.default_rng(0)
  targets = ["blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.1.ffn.0"]
  pairs = {name: lora_pair(rng, original[f"{name}.weight"]) for name in targets}
  merged = dict(original)
  for name, (a, b) in pairs.items():
    merged[f"{name}.weight"] = original[f"{name}.weight"] + b @ a
  if style == "separate_file":  # LongLive: base checkpoint + {"generator_lora": peft state dict}
    base = sd.strip_prefixes(sd.pick_weight_set({"generator": {f"model.{k}": v for k, v in original.items()}}))
    lora = sd.strip_prefixes(sd.pick_weight_set({"generator_lora": {
        f"base_model.model.{name}.lora_{part}.weight": matrix
        for name, (a, b) in pairs.items() for part, matrix in (("A", a), ("B", b))}}))
    state = sd.merge_lora({**base, **lora})
    params = wan_dit.convert_state_dict(state, tiny(mode="dense"), dtype=jnp.float32)[0]
  else:  # a peft-wrapped model's own state dict: base_layer + lora_A.default / lora_B.default
    tree = {(f"base_model.model.{k[:-len('.weight')]}.base_layer.weight" if k[:-len(".weight")] in pairs
             else f"base_model.model.{k}"): v for k, v in original.items()}
    for name, (a, b) in pairs.items():
      tree[f"base_model.model.{name}.lora_A.default.weight"] = a
      tree[f"base_model.model.{name}.lora_B.default.weight"] = b
    params = convert(tree)
  np.testing.assert_allclose(params["blocks"]["self_attn"]["q"]["kernel"][0],
                             merged["blocks.0.self_attn.q.weight"].T, rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), params, convert(merged))


def test_lora_errors(original):
  a, b = lora_pair(np.random.default_rng(1), original["blocks.0.self_attn.q.weight"])
  with pytest.raises(ValueError, match="only \\['lora_A'\\] present"):
    sd.merge_lora({**original, "blocks.0.self_attn.q.lora_A.weight": a})
  with pytest.raises(ValueError, match="no base weight"):
    sd.merge_lora({"blocks.0.self_attn.q.lora_A.weight": a, "blocks.0.self_attn.q.lora_B.weight": b})
  with pytest.raises(ValueError, match="B @ A has shape"):
    sd.merge_lora({**original, "blocks.0.self_attn.q.lora_A.weight": a, "blocks.0.self_attn.q.lora_B.weight": b[:5]})


def with_gates(original, config, seed=0):
  rng = np.random.default_rng(seed)
  gates = {}
  for layer in range(config.num_layers):
    gates[f"blocks.{layer}.self_attn.g_proj.weight"] = rng.standard_normal((3 * config.num_heads, config.dim)).astype(np.float32)
    gates[f"blocks.{layer}.self_attn.g_proj.bias"] = rng.standard_normal(3 * config.num_heads).astype(np.float32)
  return {**original, **gates}


def test_official_omnimem_checkpoint_loads_its_gates(original, caplog):
  config = tiny()
  omnimem = with_gates(original, config)
  params = convert({"generator_ema": {f"model.{k}": v for k, v in omnimem.items()}}, config)
  np.testing.assert_array_equal(params["blocks"]["self_attn"]["g_proj"]["kernel"][1],
                                omnimem["blocks.1.self_attn.g_proj.weight"].T)
  with caplog.at_level(logging.WARNING):  # a baseline mode drops the gates, loudly
    baseline = convert(omnimem, tiny(mode="window"))
  assert "g_proj" not in baseline["blocks"]["self_attn"]
  assert "dropped" in caplog.text


def test_checkpoint_without_gates_in_omnimem_mode(original, caplog):
  with pytest.raises(ValueError, match="no OmniMem gates.*--init_gates"):
    convert(original, tiny())
  with caplog.at_level(logging.WARNING):
    state = sd.strip_prefixes(original)
    params, notes = wan_dit.convert_state_dict(state, tiny(), dtype=jnp.float32, init_gates=True)
  assert notes["gates_initialised"] and "NOT meaningful" in caplog.text
  kernel, bias = params["blocks"]["self_attn"]["g_proj"]["kernel"], params["blocks"]["self_attn"]["g_proj"]["bias"]
  assert kernel.shape == (2, 64, 12) and 0.5e-3 < kernel.std() < 2e-3 and not bias.any()


def test_mismatches_are_listed_in_one_error(original):
  broken = dict(original)
  del broken["blocks.1.ffn.2.bias"]
  broken["blocks.0.self_attn.extra.weight"] = np.ones(3, np.float32)
  broken["head.head.weight"] = np.ones((5, 64), np.float32)
  with pytest.raises(ValueError) as error:
    convert(broken)
  message = str(error.value)
  for expected in ("missing (1)", "blocks.1.ffn.2.bias", "unexpected (1)", "blocks.0.self_attn.extra.weight",
                   "shape mismatch (1)", "head.head.weight: checkpoint (5, 64), model (16, 64)"):
    assert expected in message


def test_wrong_architecture_and_wrong_kind(original):
  with pytest.raises(ValueError, match="shape mismatch"):
    convert(original, ModelConfig.from_preset("tiny", dim=32, num_heads=2, memory=tiny(mode="dense").memory))
  with pytest.raises(ValueError, match="not a Wan DiT state dict"):
    wan_dit.convert_state_dict({"decoder.conv1.weight": np.ones(3)}, tiny(mode="dense"))


def write_safetensors(path, tensors):
  """Minimal writer (the format: u64 header length, JSON header, raw little-endian bytes)."""
  names = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64"}
  header, offset, blobs = {}, 0, []
  for name, array in tensors.items():
    blob = np.ascontiguousarray(array).tobytes()
    header[name] = {"dtype": names[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  encoded = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def test_safetensors_reader_bf16_shards_and_index(tmp_path):
  rng = np.random.default_rng(0)
  first = {"a.weight": rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16), "step": np.arange(2)}
  second = {"b.weight": rng.standard_normal((2,)).astype(np.float32)}
  (tmp_path / "shards").mkdir()
  write_safetensors(tmp_path / "shards" / "model-00001.safetensors", first)
  write_safetensors(tmp_path / "shards" / "model-00002.safetensors", second)
  index = tmp_path / "shards" / "model.safetensors.index.json"
  index.write_text(json.dumps({"weight_map": {"a.weight": "model-00001.safetensors", "step": "model-00001.safetensors",
                                              "b.weight": "model-00002.safetensors"}}))
  for source in (tmp_path / "shards", index):
    tensors = sd.read_checkpoint_file(source)
    assert tensors["a.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(tensors["a.weight"], first["a.weight"])
    np.testing.assert_array_equal(tensors["b.weight"], second["b.weight"])


def test_file_errors(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sd.read_checkpoint_file(tmp_path / "nope.safetensors")
  (tmp_path / "weights.npz").write_bytes(b"x")
  with pytest.raises(ValueError, match="unsupported checkpoint file"):
    sd.read_checkpoint_file(tmp_path / "weights.npz")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no .safetensors files"):
    sd.read_checkpoint_file(tmp_path / "empty")
  (tmp_path / "model.pt").write_bytes(b"x")
  monkeypatch.setitem(sys.modules, "torch", None)  # as on a machine without the convert extra
  with pytest.raises(ImportError, match=r"omnimem-jax\[convert\]"):
    sd.read_checkpoint_file(tmp_path / "model.pt")


def test_torch_pickle_end_to_end(original, tmp_path):
  torch = pytest.importorskip("torch")
  tree = {"generator_ema": {f"model.{k}": torch.from_numpy(v).to(torch.bfloat16) for k, v in original.items()},
          "generator": {f"model.{k}": torch.zeros(1) for k in original}}
  torch.save(tree, tmp_path / "self_forcing.pt")
  state = sd.load_state_dict(tmp_path / "self_forcing.pt")
  assert state["blocks.0.self_attn.q.weight"].dtype == ml_dtypes.bfloat16
  expected = original["blocks.0.self_attn.q.weight"].astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(state["blocks.0.self_attn.q.weight"], expected)


def test_convert_checkpoint_refuses_before_reading(tmp_path):
  (tmp_path / "taken").mkdir()
  with pytest.raises(FileExistsError, match="already exists"):
    wan_dit.convert_checkpoint(ORIGINAL, tmp_path / "taken", tiny(mode="dense"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    wan_dit.convert_checkpoint(tmp_path / "missing.pt", tmp_path / "out", tiny(mode="dense"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    wan_dit.convert_checkpoint(ORIGINAL, tmp_path / "out", tiny(mode="dense"), lora=tmp_path / "missing_lora.pt")
  assert not (tmp_path / "out").exists()


def test_command_line(tmp_path):
  command = [sys.executable, "experiments/convert_checkpoint.py", f"--checkpoint={DIFFUSERS}", "--preset=tiny",
             "--mode=sink_window", f"--output={tmp_path / 'converted'}"]
  done = subprocess.run(command, capture_output=True, text=True, env=CLI_ENV)
  assert done.returncode == 0, done.stderr[-2000:]
  record = json.loads((tmp_path / "converted" / "omnimem.json").read_text())
  assert record["kind"] == checkpoints.Kind.DIT and record["config"]["memory"]["mode"] == "sink_window"
  assert record["layout"] == "diffusers" and record["param_dtype"] == "bfloat16"
  again = subprocess.run([*command[:-1], f"--output={tmp_path / 'other'}", "--mode=omnimem"], capture_output=True,
                         text=True, env=CLI_ENV)
  assert again.returncode != 0 and "error: this checkpoint has no OmniMem gates" in again.stderr


def non_preset_state_dict(original, seed=0):
  """A valid Wan DiT state dict of no preset: dim 48, ffn_dim 96, 3 layers (the fixture's original names,
  resized, with fresh random values)."""
  sizes = {64: 48, 128: 96, 384: 288}  # dim, ffn_dim, 6 * dim (time projection)
  rng = np.random.default_rng(seed)
  state = {}
  for key, value in original.items():
    if key.startswith("blocks.1."):
      continue
    names = [key.replace("blocks.0.", f"blocks.{i}.", 1) for i in range(3)] if key.startswith("blocks.0.") else [key]
    for name in names:
      state[name] = (0.1 * rng.standard_normal([sizes.get(n, n) for n in value.shape])).astype(np.float32)
  return state


def test_a_non_preset_architecture_is_read_from_the_shapes(original):
  state, base = non_preset_state_dict(original), tiny(mode="dense")
  with pytest.raises(ValueError, match="shape mismatch"):  # a preset's config does not fit it
    convert(state, base)
  with pytest.raises(ValueError, match="dim 48 matches no preset .*--num_heads.*--config"):
    wan_dit.infer_config(state, base)
  config = wan_dit.infer_config(state, base, num_heads=2)
  assert (config.dim, config.ffn_dim, config.num_layers, config.num_heads) == (48, 96, 3, 2)
  assert (config.in_channels, config.out_channels, config.patch_size, config.text_dim, config.freq_dim) == (
      4, 4, (1, 2, 2), 32, 32)
  assert (config.latent_height, config.latent_width, config.text_len, config.memory) == (
      base.latent_height, base.latent_width, base.text_len, base.memory)  # what the weights do not hold
  params = convert(state, config)
  np.testing.assert_array_equal(params["blocks"]["self_attn"]["q"]["kernel"][2], state["blocks.2.self_attn.q.weight"].T)
  np.testing.assert_array_equal(params["blocks"]["ffn"]["linear_in"]["kernel"][1], state["blocks.1.ffn.0.weight"].T)
  model = checkpoints.module_with_params(lambda: CausalWanModel(config, rngs=nnx.Rngs(0)), params)
  rng = np.random.default_rng(1)
  latents = jnp.asarray(rng.standard_normal((1, 4, 3, 8, 16)), jnp.float32)
  text = jnp.asarray(rng.standard_normal((1, config.text_len, 32)), jnp.float32)
  velocity, _ = model(latents, jnp.asarray([500.0]), text, init_store(config, 1, jnp.float32), 0)
  assert velocity.shape == latents.shape and np.isfinite(np.asarray(velocity)).all()
  assert wan_dit.infer_config(with_gates(state, config), tiny()).num_heads == 2  # gates are [3 * heads, dim]
  assert wan_dit.infer_config(sd.load_state_dict(DIFFUSERS), base) == base  # the tiny fixture, diffusers names
  wan = ModelConfig.from_preset("wan2.1-t2v-1.3b")
  assert wan_dit.infer_config(original, wan).num_heads == 4  # dim 64: the tiny preset's heads


def run_cli(*flags):
  return subprocess.run([sys.executable, "experiments/convert_checkpoint.py", *flags], capture_output=True, text=True,
                        env=CLI_ENV)


def test_command_line_converts_a_non_preset_architecture(original, tmp_path):
  state = non_preset_state_dict(original)
  write_safetensors(tmp_path / "custom.safetensors", state)
  source = f"--checkpoint={tmp_path / 'custom.safetensors'}"
  refused = run_cli(source, "--preset=tiny", "--mode=dense", f"--output={tmp_path / 'refused'}")
  assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
  assert refused.stderr.startswith("error: the checkpoint's dim 48 matches no preset") and "--num_heads" in refused.stderr
  assert not (tmp_path / "refused").exists()
  done = run_cli(source, "--preset=tiny", "--mode=dense", "--num_heads=2", f"--output={tmp_path / 'inferred'}")
  assert done.returncode == 0, done.stderr[-2000:]
  expected = wan_dit.infer_config(state, tiny(mode="dense"), num_heads=2)
  assert checkpoints.read_record(tmp_path / "inferred", checkpoints.Kind.DIT).config == expected.to_dict()
  (tmp_path / "model.json").write_text(json.dumps(expected.to_dict()))
  done = run_cli(source, f"--config={tmp_path / 'model.json'}", f"--output={tmp_path / 'from_json'}")
  assert done.returncode == 0, done.stderr[-2000:]
  assert checkpoints.read_record(tmp_path / "from_json").config == expected.to_dict()


def test_command_line_vae_from_a_config_json_and_bad_input(tmp_path):
  config = VAEConfig.from_preset("tiny")
  (tmp_path / "vae.json").write_text(json.dumps(config.to_dict()))
  done = run_cli("--kind=vae", f"--checkpoint={VAE}", f"--config={tmp_path / 'vae.json'}", f"--output={tmp_path / 'vae'}")
  assert done.returncode == 0, done.stderr[-2000:]
  assert VAEConfig.from_dict(checkpoints.read_record(tmp_path / "vae", checkpoints.Kind.VAE).config) == config
  (tmp_path / "bad.json").write_text(json.dumps({**config.to_dict(), "channels": 3}))
  for flags, message in [
      (["--kind=vae", f"--config={tmp_path / 'bad.json'}"], r"unknown VAEConfig field\(s\) \['channels'\]"),
      (["--kind=vae", "--mode=dense"], "--mode: DiT-only"),
      ([f"--config={tmp_path / 'vae.json'}", "--preset=tiny"], "drop --preset"),
      (["--dtype=float64"], "flag --dtype=float64"),
  ]:
    refused = run_cli(f"--checkpoint={VAE}", f"--output={tmp_path / 'out'}", *flags)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert re.search(message, refused.stderr), (flags, refused.stderr)
  assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.json", "vae", "vae.json"]
