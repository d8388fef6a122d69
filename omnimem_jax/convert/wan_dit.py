"""Wan2.1 DiT state dicts (original Wan, diffusers, Self-Forcing / CausVid / LongLive, official OmniMem)
-> the parameters of `CausalWanModel`, and -> an Orbax checkpoint.

Every accepted layout is first brought to original Wan names (diffusers names are renamed; wrapper
prefixes are stripped and LoRA is merged by `state_dict`), then one table maps each model parameter
to its original key and the transform between them. The same table gives the shapes the checkpoint
must have, so every missing, unexpected or mis-shaped tensor is reported at once, by its original
name.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnimem_jax import checkpoints
from omnimem_jax.config import PRESETS, MemoryConfig, ModelConfig
from omnimem_jax.convert import state_dict as sd
from omnimem_jax.model.wan import GATE_ORDER, CausalWanModel, initial_gate_params

_LOG = logging.getLogger(__name__)
CHECKPOINT_KIND = checkpoints.Kind.DIT
GATE_WARNING = ("OmniMem gates were freshly initialised (all gates ~0.5): this checkpoint was not trained with "
                "OmniMem, so omnimem-mode output is NOT meaningful until the gates are trained. Use window / "
                "sink_window / dense mode for this checkpoint, or an OmniMem-trained checkpoint.")

# diffusers name -> original Wan name (re.sub patterns applied in order). diffusers swaps the names of
# the cross-attention norm (original norm3, affine) and the FFN norm (original norm2, no parameters).
DIFFUSERS_TO_ORIGINAL: tuple[tuple[str, str | Callable[[re.Match], str]], ...] = (
    (r"^condition_embedder\.time_embedder\.linear_([12])\.", lambda m: f"time_embedding.{2 * int(m[1]) - 2}."),
    (r"^condition_embedder\.text_embedder\.linear_([12])\.", lambda m: f"text_embedding.{2 * int(m[1]) - 2}."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"_attn\.to_out\.0\.", "_attn.o."),
    (r"_attn\.to_([qkv])\.", r"_attn.\1."),
    (r"\.norm2\.", ".norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
)

# (dotted model parameter path, original key, transform). Block entries are per layer ("blocks.{i}.").
_TOP_LEVEL = (
    ("patch_embedding.kernel", "patch_embedding.weight", "conv"),
    ("patch_embedding.bias", "patch_embedding.bias", "copy"),
    ("text_embedding.linear_in.kernel", "text_embedding.0.weight", "linear"),
    ("text_embedding.linear_in.bias", "text_embedding.0.bias", "copy"),
    ("text_embedding.linear_out.kernel", "text_embedding.2.weight", "linear"),
    ("text_embedding.linear_out.bias", "text_embedding.2.bias", "copy"),
    ("time_embedding.linear_in.kernel", "time_embedding.0.weight", "linear"),
    ("time_embedding.linear_in.bias", "time_embedding.0.bias", "copy"),
    ("time_embedding.linear_out.kernel", "time_embedding.2.weight", "linear"),
    ("time_embedding.linear_out.bias", "time_embedding.2.bias", "copy"),
    ("time_projection.kernel", "time_projection.1.weight", "linear"),
    ("time_projection.bias", "time_projection.1.bias", "copy"),
    ("head_modulation", "head.modulation", "unsqueeze"),
    ("head.kernel", "head.head.weight", "linear"),
    ("head.bias", "head.head.bias", "copy"),
)
_PER_BLOCK = (
    ("modulation", "modulation", "unsqueeze"),
    *((f"{attn}.{proj}.kernel", f"{attn}.{proj}.weight", "linear")
      for attn in ("self_attn", "cross_attn") for proj in ("q", "k", "v", "o")),
    *((f"{attn}.{proj}.bias", f"{attn}.{proj}.bias", "copy")
      for attn in ("self_attn", "cross_attn") for proj in ("q", "k", "v", "o")),
    *((f"{attn}.norm_{x}", f"{attn}.norm_{x}.weight", "copy") for attn in ("self_attn", "cross_attn") for x in "qk"),
    ("self_attn.g_proj.kernel", "self_attn.g_proj.weight", "linear"),
    ("self_attn.g_proj.bias", "self_attn.g_proj.bias", "copy"),
    ("norm_cross_scale", "norm3.weight", "copy"),
    ("norm_cross_bias", "norm3.bias", "copy"),
    ("ffn.linear_in.kernel", "ffn.0.weight", "linear"),
    ("ffn.linear_in.bias", "ffn.0.bias", "copy"),
    ("ffn.linear_out.kernel", "ffn.2.weight", "linear"),
    ("ffn.linear_out.bias", "ffn.2.bias", "copy"),
)


def _to_model(array: np.ndarray, transform: str) -> np.ndarray:
  if transform == "linear":
    return sd.linear_kernel(array)
  if transform == "conv":
    return sd.conv_kernel(array)
  if transform == "unsqueeze":
    return array.reshape(array.shape[1:])
  return array


def _torch_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
  if transform == "linear":
    return shape[::-1]
  if transform == "conv":
    return (shape[-1], shape[-2], *shape[:-2])
  if transform == "unsqueeze":
    return (1, *shape)
  return shape


def detect_layout(state: Mapping[str, Any]) -> str:
  """"original" (Wan / Self-Forcing / OmniMem names) or "diffusers"; ValueError for anything else."""
  if any(".attn1.to_q." in key for key in state):
    return "diffusers"
  if any(".self_attn.q." in key for key in state):
    return "original"
  sample = sorted(state)[:8]
  raise ValueError("not a Wan DiT state dict: found neither original ('blocks.N.self_attn.q.weight') nor "
                   f"diffusers ('blocks.N.attn1.to_q.weight') names; first keys: {sample}")


def to_original_names(state: Mapping[str, np.ndarray]) -> sd.StateDict:
  """Renames a diffusers state dict to original Wan names (original names pass through)."""
  if detect_layout(state) == "original":
    return dict(state)
  renamed = {}
  for key, value in state.items():
    name = key
    for pattern, replacement in DIFFUSERS_TO_ORIGINAL:
      name = re.sub(pattern, replacement, name)
    renamed[name] = value
  return renamed


def has_gates(state: Mapping[str, Any]) -> bool:
  return any(".self_attn.g_proj." in key for key in state)


def gates_to_initialise(mode: str, has_gates: bool, *, allow: bool, source: str, remedy: str) -> bool:
  """The rule "omnimem mode needs gates", for every caller (conversion, restore, generate's planning).

  Args:
    mode: the attention mode to run (`MemoryConfig.mode`); only "omnimem" reads the gates.
    has_gates: whether the checkpoint holds the gate projections (`blocks.N.self_attn.g_proj`).
    allow: let omnimem mode start from untrained gates when the checkpoint has none.
    source: names the checkpoint in the error ("this checkpoint", a path or a flag).
    remedy: what the caller's user can do instead (a baseline mode, the flag that sets `allow`).

  Returns True when the gates must be initialised (omnimem mode, no gates, allowed: the output is not
  meaningful until they are trained), False when nothing is missing; raises ValueError when the gates
  are missing and not allowed.
  """
  if mode != "omnimem" or has_gates:
    return False
  if not allow:
    raise ValueError(f"{source} has no OmniMem gates (blocks.N.self_attn.g_proj): it was not trained with OmniMem "
                     f"and omnimem mode needs them; {remedy}")
  return True


def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...]:
  if key not in state:
    raise ValueError(f"cannot infer the DiT architecture: the state dict has no {key!r}")
  return tuple(state[key].shape)


def _num_heads(state: Mapping[str, Any], dim: int, base: ModelConfig, num_heads: int | None) -> int:
  """`num_heads`, else the gates' rows / 3, else the head count of `base` or a preset of the same dim."""
  if num_heads is not None:
    return num_heads
  if has_gates(state):
    return _shape(state, "blocks.0.self_attn.g_proj.weight")[0] // len(GATE_ORDER)
  presets = {name: factory() for name, factory in PRESETS.items()}
  for name, config in (("the base config", base), *presets.items()):
    if config.dim == dim:
      _LOG.info("num_heads=%d from %s (dim %d)", config.num_heads, name, dim)
      return config.num_heads
  dims = ", ".join(f"{name}: {config.dim}" for name, config in presets.items())
  raise ValueError(f"the checkpoint's dim {dim} matches no preset ({dims}) and weight shapes cannot tell the number "
                   "of attention heads (q, k, v and their norms span all heads): give num_heads (--num_heads), "
                   "or the whole ModelConfig (--config JSON)")


def infer_config(state: Mapping[str, Any], base: ModelConfig, num_heads: int | None = None) -> ModelConfig:
  """The ModelConfig a DiT state dict describes (prefix-stripped and LoRA-merged; either layout).

  The weight shapes give dim, ffn_dim, num_layers, in / out channels, the patch size, text_dim and
  freq_dim. They cannot give the number of attention heads, except through OmniMem gates
  (`[3 * num_heads, dim]`): `num_heads` when given, else the gates, else the head count of `base` or
  of a preset with the same dim; otherwise a ValueError says to give it. Every field the weights do
  not hold (token geometry, text length, RoPE, fps, memory settings) comes from `base`.
  """
  state = to_original_names(state)
  dim, in_channels, *patch_size = _shape(state, "patch_embedding.weight")
  layers = {int(match[1]) for key in state if (match := re.match(r"blocks\.(\d+)\.", key))}
  if not layers:
    raise ValueError("cannot infer the DiT architecture: the state dict has no blocks.N.* tensors")
  head_rows = _shape(state, "head.head.weight")[0]
  fields = {"dim": dim, "ffn_dim": _shape(state, "blocks.0.ffn.0.weight")[0], "num_layers": max(layers) + 1,
            "in_channels": in_channels, "out_channels": head_rows // math.prod(patch_size),
            "patch_size": tuple(patch_size), "text_dim": _shape(state, "text_embedding.0.weight")[1],
            "freq_dim": _shape(state, "time_embedding.0.weight")[1],
            "num_heads": _num_heads(state, dim, base, num_heads)}
  return dataclasses.replace(base, **fields)


def _abstract_params(config: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """Dotted model parameter path -> abstract array, from the model built abstractly."""
  model = nnx.eval_shape(lambda: CausalWanModel(config, rngs=nnx.Rngs(0)))
  return sd.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _parameter_table(config: ModelConfig) -> list[tuple[str, str | list[str], str]]:
  """(model path, original key or per-layer keys, transform) for every parameter of the model."""
  table: list[tuple[str, str | list[str], str]] = list(_TOP_LEVEL)
  for path, key, transform in _PER_BLOCK:
    table.append((f"blocks.{path}", [f"blocks.{i}.{key}" for i in range(config.num_layers)], transform))
  return table


def convert_state_dict(state: Mapping[str, np.ndarray], config: ModelConfig, *, dtype: Any = jnp.bfloat16,
                       init_gates: bool = False, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
  """Model parameters (a pure dict for `nnx.replace_by_pure_dict`) from a prefix-stripped, LoRA-merged
  state dict, and notes for the checkpoint record.

  Args:
    state: original or diffusers names (see `state_dict.load_state_dict`).
    config: the model the weights are for; omnimem mode needs gate weights (`self_attn.g_proj`).
    dtype: parameter dtype to cast to.
    init_gates: omnimem mode with a checkpoint without gates: initialise them instead of refusing
      (the output is not meaningful until the gates are trained; a warning says so).
    seed: PRNG seed of initialised gates.
  """
  notes: dict[str, Any] = {"layout": detect_layout(state), "gates_initialised": False}
  state = to_original_names(state)
  wants_gates = config.memory.mode == "omnimem"
  if has_gates(state) and not wants_gates:
    _LOG.warning("the checkpoint has OmniMem gates (self_attn.g_proj); %s mode does not use them, so they are "
                 "dropped", config.memory.mode)
    state = {key: value for key, value in state.items() if ".self_attn.g_proj." not in key}
  fill_gates = gates_to_initialise(
      config.memory.mode, has_gates(state), allow=init_gates, source="this checkpoint",
      remedy="convert it for a baseline mode (--mode=window, sink_window or dense), or pass init_gates=True "
             "(--init_gates) to start omnimem mode from untrained gates")

  abstract = _abstract_params(config)
  load_gates = wants_gates and not fill_gates
  table = [row for row in _parameter_table(config) if load_gates or "g_proj" not in row[0]]
  expected = {}
  for path, keys, transform in table:
    shape = abstract[path].shape
    if isinstance(keys, list):
      expected.update({key: _torch_shape(shape[1:], transform) for key in keys})
    else:
      expected[keys] = _torch_shape(shape, transform)
  sd.check_names_and_shapes(expected, {key: value.shape for key, value in state.items()}, "the checkpoint")

  flat: dict[str, np.ndarray] = {}
  for path, keys, transform in table:
    if isinstance(keys, list):
      flat[path] = np.stack([_to_model(state[key], transform) for key in keys]).astype(dtype)
    else:
      flat[path] = _to_model(state[keys], transform).astype(dtype)
  if fill_gates:
    _LOG.warning(GATE_WARNING)
    notes["gates_initialised"] = True
    gates = initial_gate_params(config, jax.random.key(seed), dtype)
    flat.update({f"blocks.self_attn.g_proj.{name}": np.asarray(value) for name, value in gates.items()})
  return sd.nest(flat), notes


def convert_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike,
                       config: ModelConfig | Callable[[sd.StateDict], ModelConfig], *,
                       lora: str | os.PathLike | None = None, lora_scale: float = 1.0, dtype: Any = jnp.bfloat16,
                       init_gates: bool = False, overwrite: bool = False) -> Path:
  """Reads a PyTorch-world DiT checkpoint (plus an optional separate LoRA file), converts it for
  `config` and writes an Orbax checkpoint to `output`. Returns the output path.

  `config` is the model the weights are for, or a function of the (LoRA-merged) state dict that
  returns it, e.g. `lambda state: infer_config(state, base)` for an architecture read from the shapes.
  """
  checkpoints.check_conversion_paths([checkpoint, lora], output, overwrite=overwrite)
  state = sd.load_state_dict(checkpoint)
  if lora is not None:
    state.update(sd.load_lora(lora))
  state = sd.merge_lora(state, lora_scale)
  if not isinstance(config, ModelConfig):
    config = config(state)
  params, notes = convert_state_dict(state, config, dtype=dtype, init_gates=init_gates)
  record = checkpoints.CheckpointRecord(
      kind=CHECKPOINT_KIND, config=config.to_dict(), param_dtype=jnp.dtype(dtype).name,
      has_gates=config.memory.mode == "omnimem", source=Path(checkpoint).name,
      lora=None if lora is None else {"file": Path(lora).name, "scale": lora_scale}, **notes)
  return checkpoints.save_checkpoint(output, params, record, overwrite=overwrite)


def check_checkpoint(directory: str | os.PathLike) -> None:
  """Before any weights load (Orbax metadata only): `directory` is a DiT checkpoint whose params hold
  exactly the arrays, at their shapes, of the model its record's config describes. Raises
  CheckpointError (a missing `params/` or damaged metadata, an unreadable config, a config that disagrees
  with the weights), or the errors of `checkpoints.read_record`; damaged array data shows at restore."""
  record = checkpoints.read_record(directory, CHECKPOINT_KIND)
  config = checkpoints.read_config(directory, record, ModelConfig)
  checkpoints.check_params(directory, lambda: CausalWanModel(config, rngs=nnx.Rngs(0)))


def restore_model(directory: str | os.PathLike, *, memory: MemoryConfig | None = None, mesh: jax.sharding.Mesh | None = None,
                  dtype: Any = jnp.bfloat16, param_dtype: Any | None = None,
                  init_missing_gates: bool = False) -> CausalWanModel:
  """A `CausalWanModel` restored from a converted checkpoint, parameters placed on devices.

  Args:
    directory: output of `convert_checkpoint`.
    memory: attention mode and memory settings to run with (default: those saved at conversion).
    mesh: shard parameters over this mesh by their logical axis names (default: one device).
    dtype: compute dtype; param_dtype: parameter dtype (default: as saved).
    init_missing_gates: allow omnimem mode on a checkpoint without gates (see `convert_state_dict`).
  """
  record = checkpoints.read_record(directory, CHECKPOINT_KIND)
  config = checkpoints.read_config(directory, record, ModelConfig)
  if memory is not None:
    config = dataclasses.replace(config, memory=memory)
  param_dtype = record.param_dtype if param_dtype is None else param_dtype
  wants_gates, saved_gates = config.memory.mode == "omnimem", bool(record.has_gates)
  saved_mode = record.config["memory"]["mode"]
  init_gates = gates_to_initialise(
      config.memory.mode, saved_gates, allow=init_missing_gates, source=str(directory),
      remedy=f"it was converted for {saved_mode} mode: run it in that mode, or pass init_missing_gates=True to start "
             "from untrained gates")
  if init_gates or (wants_gates and record.gates_initialised):
    _LOG.warning(GATE_WARNING)
  if saved_gates and not wants_gates:
    _LOG.warning("ignoring the checkpoint's OmniMem gates in %s mode", config.memory.mode)

  def fill_gates(missing: dict[str, Any]) -> dict[str, Any]:
    gates = initial_gate_params(config, jax.random.key(0), param_dtype)
    return {"blocks": {"self_attn": {"g_proj": {name: gates[name] for name in missing["blocks"]["self_attn"]["g_proj"]}}}}

  return checkpoints.restore_module(
      directory, lambda: CausalWanModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype), mesh=mesh,
      fill_missing=fill_gates if init_gates else None,
      ignore=(lambda path: "g_proj" in path) if saved_gates and not wants_gates else None)
