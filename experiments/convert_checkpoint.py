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
"""

import dataclasses
import sys
from collections.abc import Sequence

import jax.numpy as jnp
from absl import app, flags, logging

from omnimem_jax.config import ATTENTION_MODES, PRESETS, ModelConfig
from omnimem_jax.convert import wan_dit

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


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
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
