"""Tiny converted checkpoints for the generation tests (tests/fixtures: the parity fixtures' weights)."""

import shutil
from pathlib import Path

import jax.numpy as jnp

from omnimem_jax.config import ModelConfig
from omnimem_jax.convert import umt5, wan_dit, wan_vae
from omnimem_jax.model.text import TextEncoderConfig
from omnimem_jax.model.vae import VAEConfig
from tests.configs import tiny

FIXTURES = Path(__file__).parent / "fixtures"
DIT_WEIGHTS = FIXTURES / "wan_dit_original.safetensors"


def save_dit(directory: Path, config: ModelConfig, weights: Path = DIT_WEIGHTS) -> Path:
  """A converted tiny DiT of `weights` (default: the parity fixture's; gates initialised in omnimem mode)."""
  return wan_dit.convert_checkpoint(weights, directory, config, dtype=jnp.float32,
                                    init_gates=config.memory.mode == "omnimem")


def save_text_model(root: Path) -> tuple[Path, Path]:
  """(text_encoder/, tokenizer/) under `root`: the tiny umT5 encoder (text_len of the tiny DiT) and a
  word-level tokenizer."""
  umt5.convert_checkpoint(FIXTURES / "umt5_tiny_hf.safetensors", root / "text_encoder",
                          TextEncoderConfig.from_preset("tiny", text_len=tiny().text_len))
  shutil.copytree(FIXTURES / "tokenizer_wordlevel", root / "tokenizer")
  return root / "text_encoder", root / "tokenizer"


def save_model_dir(root: Path) -> Path:
  """A --model_dir of tiny converted checkpoints: dit/ (omnimem), vae/, text_encoder/, tokenizer/."""
  save_dit(root / "dit", tiny())
  wan_vae.convert_checkpoint(FIXTURES / "vae_tiny_diffusers.safetensors", root / "vae", VAEConfig.from_preset("tiny"))
  save_text_model(root)
  return root
