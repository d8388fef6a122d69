"""umT5 encoder weights -> `omnimem_jax.model.text.UMT5Encoder` parameters.

Two source layouts, detected from the key names:

  hf   `UMT5EncoderModel` safetensors (Wan2.1 diffusers `text_encoder/`, or the encoder half of
       `google/umt5-xxl`): `shared.weight`, `encoder.block.{i}.layer.0.SelfAttention.q.weight`,
       `...layer.1.DenseReluDense.wi_0.weight`, `encoder.final_layer_norm.weight`; decoder and
       `lm_head` tensors of a full encoder-decoder checkpoint are ignored.
  wan  Wan's `models_t5_umt5-xxl-enc-bf16.pth`: `token_embedding.weight`, `blocks.{i}.attn.q.weight`,
       `blocks.{i}.ffn.gate.0.weight` (the GELU branch), `blocks.{i}.ffn.fc1.weight` (the linear
       branch), `blocks.{i}.pos_embedding.embedding.weight`, `norm.weight`.

Linear weights `[out, in]` become `[in, out]` kernels; per-layer tensors are stacked on a leading
layer axis, as `UMT5Layers` holds them.
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
from omnimem_jax.convert.state_dict import check_names_and_shapes, linear_kernel
from omnimem_jax.model.text import TextEncoderConfig, UMT5Encoder

CHECKPOINT_KIND = checkpoints.Kind.TEXT_ENCODER

# per-layer name (HF suffix after `encoder.block.{i}.`, Wan suffix after `blocks.{i}.`) -> UMT5Layers field
_HF_LAYER = {"layer.0.layer_norm.weight": "attn_norm", "layer.0.SelfAttention.q.weight": "q",
             "layer.0.SelfAttention.k.weight": "k", "layer.0.SelfAttention.v.weight": "v",
             "layer.0.SelfAttention.o.weight": "o",
             "layer.0.SelfAttention.relative_attention_bias.weight": "relative_bias",
             "layer.1.layer_norm.weight": "ffn_norm", "layer.1.DenseReluDense.wi_0.weight": "ffn_gate",
             "layer.1.DenseReluDense.wi_1.weight": "ffn_up", "layer.1.DenseReluDense.wo.weight": "ffn_down"}
_WAN_LAYER = {"norm1.weight": "attn_norm", "attn.q.weight": "q", "attn.k.weight": "k", "attn.v.weight": "v",
              "attn.o.weight": "o", "pos_embedding.embedding.weight": "relative_bias", "norm2.weight": "ffn_norm",
              "ffn.gate.0.weight": "ffn_gate", "ffn.fc1.weight": "ffn_up", "ffn.fc2.weight": "ffn_down"}
_LINEAR = {"q", "k", "v", "o", "ffn_gate", "ffn_up", "ffn_down"}


def detect_layout(state: Mapping[str, Any]) -> str:
  """"hf" or "wan"; a ValueError naming what was found for anything else."""
  if any(k.startswith("encoder.block.") for k in state):
    return "hf"
  if any(k.startswith("blocks.") and ".attn.q." in k for k in state):
    return "wan"
  sample = ", ".join(sorted(state)[:5]) or "no tensors"
  raise ValueError(f"this is not a umT5 encoder checkpoint (no encoder.block.* / blocks.*.attn.* keys); it holds "
                   f"{len(state)} tensors such as {sample}. Pass Wan's models_t5_umt5-xxl-enc-bf16.pth or the "
                   "UMT5EncoderModel safetensors (Wan2.1 diffusers text_encoder/).")


def _rename(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Source names -> flat names `token_embedding`, `final_norm`, `layers.{field}.{i}`."""
  layout = detect_layout(state)
  if layout == "hf":
    top = {"shared.weight": "token_embedding", "encoder.embed_tokens.weight": "token_embedding",
           "encoder.final_layer_norm.weight": "final_norm"}
    block, table = re.compile(r"encoder\.block\.(\d+)\.(.*)"), _HF_LAYER
    skip = ("decoder.", "lm_head.")
  else:
    top = {"token_embedding.weight": "token_embedding", "norm.weight": "final_norm"}
    block, table = re.compile(r"blocks\.(\d+)\.(.*)"), _WAN_LAYER
    skip = ()
  renamed: dict[str, np.ndarray] = {}
  unexpected = []
  for key, value in state.items():
    match = block.fullmatch(key)
    if key in top:
      renamed[top[key]] = value  # HF's tied shared / embed_tokens copies are the same tensor
    elif match and match.group(2) in table:
      renamed[f"layers.{table[match.group(2)]}.{int(match.group(1))}"] = value
    elif not (skip and key.startswith(skip)):
      unexpected.append(key)
  if unexpected:
    raise ValueError(f"unexpected tensors in a {layout}-layout umT5 checkpoint: {sorted(unexpected)[:20]}")
  return renamed


def text_encoder_params(state: Mapping[str, np.ndarray], config: TextEncoderConfig) -> dict[str, Any]:
  """A umT5 state dict (either layout) -> nested dict of arrays matching `nnx.state(UMT5Encoder(config))`.

  Raises ValueError for another kind of checkpoint, a layer count or size that does not match the
  config, and missing or misshapen tensors. Arrays are cast to `config.param_dtype`.
  """
  renamed = _rename(state)
  dtype = np.dtype(jnp.dtype(config.param_dtype))
  layers: dict[str, list[tuple[int, np.ndarray]]] = {}
  flat: dict[str, np.ndarray] = {}
  for key, value in renamed.items():
    if key.startswith("layers."):
      _, field, index = key.split(".")
      layers.setdefault(field, []).append((int(index), linear_kernel(value) if field in _LINEAR else value))
    else:
      flat[key] = value
  for field, entries in layers.items():
    indices = sorted(i for i, _ in entries)
    if indices != list(range(len(indices))):
      raise ValueError(f"umT5 checkpoint: layers of {field!r} are not numbered 0..n-1: {indices}")
    shapes = {v.shape for _, v in entries}
    if len(shapes) != 1:
      raise ValueError(f"umT5 checkpoint: {field!r} has differing shapes across layers: {sorted(shapes)}")
    flat[f"layers.{field}"] = np.stack([v for _, v in sorted(entries, key=lambda e: e[0])])
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: UMT5Encoder(config, rngs=nnx.Rngs(0))), nnx.Param))
  expected = {"token_embedding": abstract["token_embedding"].shape, "final_norm": abstract["final_norm"].shape,
              **{f"layers.{field}": value.shape for field, value in abstract["layers"].items()}}
  check_names_and_shapes(expected, {k: v.shape for k, v in flat.items()}, "the umT5 checkpoint")
  params: dict[str, Any] = {"layers": {}}
  for key, value in flat.items():
    node, name = (params["layers"], key.split(".")[1]) if key.startswith("layers.") else (params, key)
    node[name] = np.asarray(value).astype(dtype)
  return params


def text_encoder_from_state_dict(state: Mapping[str, np.ndarray], config: TextEncoderConfig) -> UMT5Encoder:
  """A `UMT5Encoder` holding the converted weights of `state` (built abstractly, then filled)."""
  return checkpoints.module_with_params(lambda: UMT5Encoder(config, rngs=nnx.Rngs(0)), text_encoder_params(state, config))


def convert_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, config: TextEncoderConfig, *,
                       overwrite: bool = False) -> Path:
  """Reads a umT5 encoder checkpoint (HF safetensors or Wan .pth), converts it for `config` (its
  param_dtype is the stored dtype) and writes an Orbax checkpoint to `output`. Returns the output path."""
  return convert_file(checkpoint, output, config, kind=CHECKPOINT_KIND, to_params=text_encoder_params,
                      detect_layout=detect_layout, overwrite=overwrite)


def restore_text_encoder(directory: str | os.PathLike, *, dtype: str | None = None,
                         mesh: jax.sharding.Mesh | None = None) -> UMT5Encoder:
  """A `UMT5Encoder` restored from `convert_checkpoint` output; `dtype` overrides the activation
  dtype; `mesh` shards the parameters by their logical axis names (heads, mlp on "model")."""
  return checkpoints.restore_configured(directory, CHECKPOINT_KIND, TextEncoderConfig, UMT5Encoder, dtype=dtype,
                                       mesh=mesh)
