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

The Wan 2.1 VAE and the umT5 text encoder convert the same way, with --kind:

  python experiments/convert_checkpoint.py --kind=vae --dtype=float32 \
      --checkpoint=Wan2.1-T2V-1.3B/Wan2.1_VAE.pth --output=checkpoints/vae
  python experiments/convert_checkpoint.py --kind=text_encoder \
      --checkpoint=Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth --output=checkpoints/umt5
"""

import dataclasses
import sys
from collections.abc import Sequence

import jax.numpy as jnp
from absl import app, flags, logging

from omnimem_jax.config import ATTENTION_MODES, PRESETS, ModelConfig
from omnimem_jax.convert import umt5, wan_dit, wan_vae
from omnimem_jax.model.text import TextEncoderConfig
from omnimem_jax.model.vae import VAEConfig

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "PyTorch checkpoint: .safetensors (file, index, dir) or .pt/.pth.",
                                  required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the Orbax checkpoint to.", required=True)
_PRESET = flags.DEFINE_enum("preset", "wan2.1-t2v-1.3b", sorted(PRESETS), "Model architecture.")
_MODE = flags.DEFINE_enum("mode", "omnimem", ATTENTION_MODES,
                          "Attention mode the checkpoint is for; omnimem needs gate weights (see --init_gates).")
_LORA = flags.DEFINE_string("lora", None, "Optional LoRA file (LongLive) merged as W += scale * B @ A.")
_LORA_SCALE = flags.DEFINE_float("lora_scale", 1.0, "LoRA alpha / rank (LongLive: 256 / 256 = 1).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter dtype to store.")
_INIT_GATES = flags.DEFINE_bool("init_gates", False,
                                "omnimem mode from a checkpoint without gates: initialise them (output not "
                                "meaningful until they are trained).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")
_KIND = flags.DEFINE_enum("kind", "dit", ["dit", "vae", "text_encoder"],
                          "What the checkpoint holds: the DiT; the Wan 2.1 VAE (diffusers vae/ safetensors or "
                          "Wan2.1_VAE.pth); the umT5-XXL encoder (HF text_encoder/ safetensors or Wan's "
                          "models_t5_umt5-xxl-enc-bf16.pth). --preset, --mode, --lora and --init_gates are DiT-only.")


def convert_vae_or_text_encoder() -> str:
  """The --kind=vae / --kind=text_encoder conversions (the released Wan 2.1 configurations)."""
  if _LORA.value or _INIT_GATES.value:
    raise app.UsageError("--lora and --init_gates apply to --kind=dit only")
  if _KIND.value == "vae":
    config = VAEConfig.from_preset("wan2.1", param_dtype=_DTYPE.value)
    return wan_vae.convert_checkpoint(_CHECKPOINT.value, _OUTPUT.value, config, overwrite=_OVERWRITE.value)
  config = TextEncoderConfig.from_preset("umt5-xxl", param_dtype=_DTYPE.value)
  return umt5.convert_checkpoint(_CHECKPOINT.value, _OUTPUT.value, config, overwrite=_OVERWRITE.value)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _KIND.value != "dit":
    try:
      print(f"wrote {convert_vae_or_text_encoder()}")
    except (ValueError, OSError, ImportError) as err:  # bad input: the message says what to do
      sys.exit(f"error: {err}")
    return
  preset = PRESETS[_PRESET.value]
  config = ModelConfig.from_preset(_PRESET.value, memory=dataclasses.replace(preset.memory, mode=_MODE.value))
  logging.info("converting %s for %s (%s mode, %s)", _CHECKPOINT.value, _PRESET.value, _MODE.value, _DTYPE.value)
  try:
    output = wan_dit.convert_checkpoint(_CHECKPOINT.value, _OUTPUT.value, config, lora=_LORA.value,
                                        lora_scale=_LORA_SCALE.value, dtype=jnp.dtype(_DTYPE.value),
                                        init_gates=_INIT_GATES.value, overwrite=_OVERWRITE.value)
  except (ValueError, OSError, ImportError) as err:  # bad input: the message says what to do
    sys.exit(f"error: {err}")
  print(f"wrote {output}")


if __name__ == "__main__":
  app.run(main)
