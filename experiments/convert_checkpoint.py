r"""Converts a PyTorch-world Wan2.1 DiT checkpoint into an OmniMem-JAX Orbax checkpoint.

Accepts original Wan `.safetensors`, diffusers `transformer/` safetensors (file, shard index or
directory), Self-Forcing / CausVid / LongLive `.pt` training checkpoints (`generator_ema` >
`generator` > `model` > root; needs torch: `pip install 'omnimem-jax[convert]'`), a LongLive LoRA
file to merge, and official OmniMem checkpoints (with gates).

  python experiments/convert_checkpoint.py --checkpoint=self_forcing_dmd.pt --mode=window \
      --output=checkpoints/self_forcing
  python experiments/convert_checkpoint.py --checkpoint=longlive_base.pt --lora=lora.pt \
      --mode=sink_window --output=checkpoints/longlive
  python experiments/convert_checkpoint.py --checkpoint=omnimem.pt --output=checkpoints/omnimem

The DiT's architecture is read from the weight shapes (dim, ffn_dim, layers, channels, patch, text and
time widths); the number of heads cannot be, so it comes from --num_heads, the OmniMem gates, or the
preset of the same dim. --preset (default wan2.1-t2v-1.3b) gives what the weights do not hold: the
latent size, text length, RoPE table and memory settings. --config=model.json (a `ModelConfig.to_dict()`)
gives the whole config instead:

  python experiments/convert_checkpoint.py --checkpoint=wan_14b.safetensors --num_heads=40 \
      --mode=window --output=checkpoints/wan_14b
  python experiments/convert_checkpoint.py --checkpoint=custom.pt --config=custom.json --output=checkpoints/custom

The Wan 2.1 VAE and the umT5 text encoder convert the same way, with --kind:

  python experiments/convert_checkpoint.py --kind=vae --dtype=float32 \
      --checkpoint=Wan2.1-T2V-1.3B/Wan2.1_VAE.pth --output=checkpoints/vae
  python experiments/convert_checkpoint.py --kind=text_encoder \
      --checkpoint=Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth --output=checkpoints/umt5

(the released Wan 2.1 configurations; --config=vae.json / text_encoder.json for others). Both layouts of
each convert: diffusers `vae/` safetensors and Wan2.1_VAE.pth; HF `text_encoder/` safetensors and Wan's
umT5 .pth. The output directory is created like `mkdir` creates one (the umask applies); the only
output line names it.

Bad input gives one line `error: ...` on stderr and exit code 2, and writes nothing: a missing, empty,
truncated or garbage checkpoint file, a state dict of another kind or architecture, a LoRA file with no
LoRA weights (or with base weights that would replace the checkpoint's), a bad --config, an existing
--output (without --overwrite).
"""

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from absl import app, flags

from omnimem_jax import checkpoints, cli
from omnimem_jax.config import ATTENTION_MODES, PRESETS, ModelConfig
from omnimem_jax.convert import umt5, wan_dit, wan_vae
from omnimem_jax.model.text import TextEncoderConfig
from omnimem_jax.model.vae import VAEConfig

DEFAULT_PRESET = "wan2.1-t2v-1.3b"
DEFAULT_DTYPE = "bfloat16"
DIT_ONLY = ("preset", "num_heads", "mode", "lora", "init_gates")
SUMMARY_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "base_dim", "z_dim")  # those the record has are printed

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "PyTorch checkpoint: .safetensors (file, index, dir) or .pt/.pth.",
                                  required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the Orbax checkpoint to.", required=True)
_KIND = flags.DEFINE_enum("kind", "dit", ["dit", "vae", "text_encoder"],
                          "What the checkpoint holds: the DiT; the Wan 2.1 VAE (diffusers vae/ safetensors or "
                          "Wan2.1_VAE.pth); the umT5-XXL encoder (HF text_encoder/ safetensors or Wan's "
                          f"models_t5_umt5-xxl-enc-bf16.pth). --{', --'.join(DIT_ONLY)} are DiT-only.")
_CONFIG = flags.DEFINE_string("config", None, "JSON config of the checkpoint's architecture (the to_dict() of "
                              "ModelConfig, VAEConfig or TextEncoderConfig, by --kind); default: the DiT's read "
                              "from the weight shapes, the released Wan 2.1 VAE / umT5-XXL.")
_PRESET = flags.DEFINE_enum("preset", None, sorted(PRESETS), f"DiT: the fields weight shapes do not give (latent "
                            f"size, text length, RoPE, memory; default {DEFAULT_PRESET}); its heads if the dims match.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", None, "DiT attention heads (weight shapes cannot tell them; default: "
                                  "from the OmniMem gates, or the preset of the same dim).")
_MODE = flags.DEFINE_enum("mode", None, ATTENTION_MODES, "Attention mode the DiT is for (default: --config's, or "
                          "omnimem); omnimem needs gate weights (see --init_gates).")
_LORA = flags.DEFINE_string("lora", None, "Optional LoRA file (LongLive) merged as W += scale * B @ A.")
_LORA_SCALE = flags.DEFINE_float("lora_scale", 1.0, "LoRA alpha / rank (LongLive: 256 / 256 = 1).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], f"Parameter dtype to store (default: --config's "
                           f"param_dtype for a VAE / text encoder, else {DEFAULT_DTYPE}).")
_INIT_GATES = flags.DEFINE_bool("init_gates", False,
                                "omnimem mode from a checkpoint without gates: initialise them (output not "
                                "meaningful until they are trained).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")


def read_config_json(path: str) -> dict[str, Any]:
  """The --config file's JSON object."""
  try:
    fields = json.loads(Path(path).read_text())
  except (OSError, ValueError) as err:
    raise ValueError(f"--config={path} is not a readable JSON file: {err}") from err
  if not isinstance(fields, dict):
    raise ValueError(f"--config={path} must hold a JSON object (a config's to_dict())")
  return fields


def with_mode(config: ModelConfig, mode: str) -> ModelConfig:
  return dataclasses.replace(config, memory=dataclasses.replace(config.memory, mode=mode))


def dit_config() -> ModelConfig | Callable[[dict[str, Any]], ModelConfig]:
  """--config's ModelConfig, or the function that reads it from the state dict's shapes."""
  if _CONFIG.value is not None:
    if _PRESET.value is not None or _NUM_HEADS.value is not None:
      raise ValueError("--config gives the whole DiT config: drop --preset and --num_heads")
    config = ModelConfig.from_dict(read_config_json(_CONFIG.value))
    return config if _MODE.value is None else with_mode(config, _MODE.value)
  base = with_mode(ModelConfig.from_preset(_PRESET.value or DEFAULT_PRESET), _MODE.value or "omnimem")
  return lambda state: wan_dit.infer_config(state, base, num_heads=_NUM_HEADS.value)


def convert_dit() -> Path:
  return wan_dit.convert_checkpoint(_CHECKPOINT.value, _OUTPUT.value, dit_config(), lora=_LORA.value,
                                    lora_scale=_LORA_SCALE.value, dtype=jnp.dtype(_DTYPE.value or DEFAULT_DTYPE),
                                    init_gates=_INIT_GATES.value, overwrite=_OVERWRITE.value)


def convert_vae_or_text_encoder() -> Path:
  """--kind=vae / --kind=text_encoder: --config's architecture, or the released Wan 2.1 one."""
  given = [name for name in DIT_ONLY if flags.FLAGS[name].present]
  if given:
    raise ValueError(f"{', '.join('--' + name for name in given)}: DiT-only flag(s), not for --kind={_KIND.value}")
  cls, preset, module = ((VAEConfig, "wan2.1", wan_vae) if _KIND.value == "vae"
                         else (TextEncoderConfig, "umt5-xxl", umt5))
  if _CONFIG.value is None:
    config = cls.from_preset(preset, param_dtype=_DTYPE.value or DEFAULT_DTYPE)
  else:
    config = cls.from_dict(read_config_json(_CONFIG.value))
    config = config if _DTYPE.value is None else dataclasses.replace(config, param_dtype=_DTYPE.value)
  return module.convert_checkpoint(_CHECKPOINT.value, _OUTPUT.value, config, overwrite=_OVERWRITE.value)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  try:
    output = convert_dit() if _KIND.value == "dit" else convert_vae_or_text_encoder()
  except (ValueError, OSError, ImportError) as err:  # bad input: the message says what to do
    cli.fail(err)
  record = checkpoints.read_record(output)
  sizes = "".join(f", {name}={record.config[name]}" for name in SUMMARY_FIELDS if name in record.config)
  print(f"wrote {output} ({record.kind.value} from the {record.layout} layout{sizes})")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
