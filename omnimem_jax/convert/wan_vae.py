"""Wan 2.1 VAE weights -> `omnimem_jax.model.vae.WanVAE` parameters.

Two source layouts (docs/architecture.md, 'The Wan2.1 models'), both detected from the key names:

  diffusers  `vae/diffusion_pytorch_model.safetensors` of `AutoencoderKLWan` (what the official
             OmniMem code loads): `decoder.up_blocks.{i}.resnets.{j}.conv1.weight`, ...
  original   `Wan2.1_VAE.pth`: `decoder.upsamples.{n}.residual.2.weight`, `conv2.weight` (the
             post-quant conv), ...

Original names are first renamed to diffusers names (`original_to_diffusers_names`, derived from the
config, so it holds for any stage count), then every diffusers tensor is renamed to its NNX path
and transposed to channel-last: Conv3d `[o, i, t, h, w] -> [t, h, w, i, o]`, Conv2d
`[o, i, h, w] -> [h, w, i, o]`, the attention 1x1 convs `[o, i, 1, 1] -> [i, o]`, norm gains
`[C, 1, 1(, 1)] -> [C]`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnimem_jax import checkpoints
from omnimem_jax.convert.files import convert_file
from omnimem_jax.convert.state_dict import (StateDict, check_names_and_shapes, conv_kernel, flatten,
                                            nest)
from omnimem_jax.model.vae import VAEConfig, WanVAE

CHECKPOINT_KIND = checkpoints.Kind.VAE

_ORIGINAL_RESIDUAL = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight",
                      "residual.2.bias": "conv1.bias", "residual.3.gamma": "norm2.gamma",
                      "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
                      "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
_ORIGINAL_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv", "encoder.conv1": "encoder.conv_in",
                 "decoder.conv1": "decoder.conv_in", "encoder.head.2": "encoder.conv_out",
                 "decoder.head.2": "decoder.conv_out", "encoder.head.0": "encoder.norm_out",
                 "decoder.head.0": "decoder.norm_out"}


def detect_layout(state: Mapping[str, Any]) -> str:
  """"diffusers" or "original"; a ValueError naming what was found for anything else (a DiT, a text
  encoder, a decoder-only or otherwise partial VAE)."""
  keys = set(state)
  if any(k.startswith(("decoder.up_blocks.", "decoder.mid_block.")) for k in keys):
    return "diffusers"
  if any(k.startswith(("decoder.upsamples.", "decoder.middle.")) for k in keys):
    return "original"
  sample = ", ".join(sorted(keys)[:5]) or "no tensors"
  raise ValueError(f"this is not a Wan 2.1 VAE checkpoint (no decoder.up_blocks.* / decoder.upsamples.* keys); "
                   f"it holds {len(keys)} tensors such as {sample}. Pass the VAE file: diffusers "
                   "vae/diffusion_pytorch_model.safetensors or Wan2.1_VAE.pth.")


def _decoder_layout(config: VAEConfig) -> list[tuple[int, str]]:
  """For each flat index of the original `decoder.upsamples` list: (stage, "resnets.{j}" | "upsamplers.0")."""
  layout = []
  stages = len(config.dim_mult)
  for stage in range(stages):
    layout.extend((stage, f"resnets.{j}") for j in range(config.num_res_blocks + 1))
    if stage != stages - 1:
      layout.append((stage, "upsamplers.0"))
  return layout


def original_to_diffusers_names(config: VAEConfig) -> dict[str, str]:
  """Original Wan module prefix -> diffusers module prefix, for every module of the config."""
  names = dict(_ORIGINAL_TOP)
  for side in ("encoder", "decoder"):
    names[f"{side}.middle.0"] = f"{side}.mid_block.resnets.0"
    names[f"{side}.middle.1"] = f"{side}.mid_block.attentions.0"
    names[f"{side}.middle.2"] = f"{side}.mid_block.resnets.1"
  blocks_per_stage = config.num_res_blocks + 1  # encoder: res blocks + downsampler (but the last stage)
  encoder_blocks = len(config.dim_mult) * blocks_per_stage - 1
  for n in range(encoder_blocks):
    names[f"encoder.downsamples.{n}"] = f"encoder.down_blocks.{n}"
  for n, (stage, part) in enumerate(_decoder_layout(config)):
    names[f"decoder.upsamples.{n}"] = f"decoder.up_blocks.{stage}.{part}"
  return names


def original_to_diffusers(state: Mapping[str, np.ndarray], config: VAEConfig) -> StateDict:
  """Renames original `Wan2.1_VAE.pth` keys to diffusers `AutoencoderKLWan` keys (values untouched)."""
  modules = original_to_diffusers_names(config)
  renamed: StateDict = {}
  for key, value in state.items():
    module = key.rpartition(".")[0]
    new = None
    for prefix in sorted(modules, key=len, reverse=True):  # longest prefix first: encoder.conv1 before conv1
      if module == prefix or module.startswith(prefix + "."):
        rest = key[len(prefix) + 1:]
        if module.startswith(("encoder.downsamples.", "decoder.upsamples.", "encoder.middle.", "decoder.middle.")):
          rest = _ORIGINAL_RESIDUAL.get(rest, rest)
        new = f"{modules[prefix]}.{rest}"
        break
    if new is None:
      raise ValueError(f"unexpected key {key!r} in an original-layout Wan VAE checkpoint")
    renamed[new] = value
  return renamed


def _diffusers_to_nnx(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """One diffusers tensor -> (dotted NNX path, channel-last array)."""
  name = key.replace(".upsamplers.0.", ".upsampler.").replace(".resample.1.", ".resample.")
  attention = re.search(r"\.attentions\.\d+\.(to_qkv|proj)\.(weight|bias)$", name)
  if attention:
    layer, kind = attention.groups()
    base = name.rsplit(".", 2)[0]  # ...attentions.{i}
    if kind == "weight":
      return f"{base}.{layer}_kernel", np.ascontiguousarray(value.reshape(value.shape[:2]).T)
    return f"{base}.{layer}_bias", value
  if name.endswith(".gamma"):
    return name[:-len("gamma")] + "scale", value.reshape(-1)
  if name.endswith(".weight"):
    return name[:-len("weight")] + "kernel", conv_kernel(value)
  return name, value


def vae_params(state: Mapping[str, np.ndarray], config: VAEConfig) -> dict[Any, Any]:
  """A VAE state dict (either layout) -> nested dict of arrays matching `nnx.state(WanVAE(config))`.

  Raises ValueError for another kind of checkpoint, and for missing, unexpected or misshapen tensors
  (e.g. a config that does not match the file). Arrays are cast to `config.param_dtype`.
  """
  if detect_layout(state) == "original":
    state = original_to_diffusers(state, config)
  converted = dict(_diffusers_to_nnx(key, value) for key, value in state.items())
  abstract = nnx.eval_shape(lambda: WanVAE(config, rngs=nnx.Rngs(0)))
  params = flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  expected = {path: tuple(leaf.shape) for path, leaf in params.items()}
  check_names_and_shapes(expected, {k: v.shape for k, v in converted.items()}, "the Wan VAE checkpoint")
  dtype = np.dtype(jnp.dtype(config.param_dtype))
  return nest({key: np.asarray(value).astype(dtype) for key, value in converted.items()})


def vae_from_state_dict(state: Mapping[str, np.ndarray], config: VAEConfig) -> WanVAE:
  """A `WanVAE` holding the converted weights of `state` (built abstractly, then filled)."""
  return checkpoints.module_with_params(lambda: WanVAE(config, rngs=nnx.Rngs(0)), vae_params(state, config))


def convert_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, config: VAEConfig, *,
                       overwrite: bool = False) -> Path:
  """Reads a VAE checkpoint (diffusers safetensors or original .pth), converts it for `config` (its
  param_dtype is the stored dtype) and writes an Orbax checkpoint to `output`. Returns the output path."""
  return convert_file(checkpoint, output, config, kind=CHECKPOINT_KIND, to_params=vae_params, detect_layout=detect_layout,
                      overwrite=overwrite)


def restore_vae(directory: str | os.PathLike, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None
                ) -> WanVAE:
  """A `WanVAE` restored from `convert_checkpoint` output; `dtype` overrides the activation dtype
  (e.g. "bfloat16" for a faster decode), `mesh` places the (replicated) parameters."""
  return checkpoints.restore_configured(directory, CHECKPOINT_KIND, VAEConfig, WanVAE, dtype=dtype, mesh=mesh)
