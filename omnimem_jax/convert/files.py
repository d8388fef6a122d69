"""The conversion driver shared by the VAE and text-encoder converters: a PyTorch-world checkpoint
file in, an Orbax checkpoint with its record out (the DiT's converter adds LoRA and gates on top)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from omnimem_jax import checkpoints
from omnimem_jax.convert.state_dict import load_state_dict


def convert_file(checkpoint: str | os.PathLike, output: str | os.PathLike, config: Any, *, kind: checkpoints.Kind,
                 to_params: Callable[[Mapping[str, np.ndarray], Any], dict[str, Any]],
                 detect_layout: Callable[[Mapping[str, Any]], str], overwrite: bool = False) -> Path:
  """Reads `checkpoint`, recognises its key layout (refusing an unknown one before any conversion),
  converts it with `to_params(state, config)` and writes an Orbax checkpoint of `kind` to `output`."""
  checkpoints.check_conversion_paths([checkpoint], output, overwrite=overwrite)
  state = load_state_dict(checkpoint)
  layout = detect_layout(state)
  record = checkpoints.CheckpointRecord(kind=kind, config=config.to_dict(), layout=layout,
                                        source=Path(checkpoint).name)
  return checkpoints.save_checkpoint(output, to_params(state, config), record, overwrite=overwrite)
