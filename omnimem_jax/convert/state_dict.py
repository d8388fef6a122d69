"""Reading PyTorch-world checkpoints into flat `{name: numpy array}` state dicts, and the generic
steps every converter shares: choosing the weight set, stripping wrapper prefixes, merging LoRA,
transposing Linear / Conv kernels, and checking names and shapes.

`.safetensors` files (one file, a directory of shards, or a `*.safetensors.index.json`) are read
without torch, bf16 included (through `ml_dtypes`, which ships with jax). `.pt` / `.pth` pickles need
torch (`pip install 'omnimem-jax[convert]'`) and are loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

StateDict = dict[str, np.ndarray]

# Sub-dicts of training checkpoints, most preferred first (Self-Forcing / CausVid / LongLive).
WEIGHT_SET_PREFERENCE = ("generator_ema", "generator", "model", "generator_lora")
# What a separate LoRA file holds: peft names, `<module>.lora_A[.<adapter>].weight` and `...lora_B...`.
LORA_KEY_PATTERNS = "'<module>.lora_A[.<adapter>].weight' and '<module>.lora_B[.<adapter>].weight'"
# Wrapper names inserted anywhere in a key by FSDP, DDP, torch.compile, activation checkpointing, peft.
WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module.",
                   ".base_layer")
# Leading prefixes of wrapped models (WanDiffusionWrapper's `model.`, peft's `base_model.model.`).
LEADING_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "model.")

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _read_safetensors_file(path: Path) -> StateDict:
  """One .safetensors file, memory-mapped: an 8-byte header length, a JSON header, raw tensors. A file
  that breaks the format (empty, truncated, another format) is a ValueError naming it."""
  size = path.stat().st_size
  with open(path, "rb") as f:
    prefix = f.read(8)
    header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
    if header_len is None or header_len > size - 8:
      raise ValueError(f"{path} is not a .safetensors file: its {size} bytes cannot hold the header it announces "
                       "(empty, truncated, or another format)")
    try:
      header = json.loads(f.read(header_len))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
      raise ValueError(f"{path} is not a .safetensors file: its header is not JSON ({err})") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path} is not a .safetensors file: its header is not a JSON object")
  data_len = size - 8 - header_len
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len) if data_len else np.zeros(0, np.uint8)
  return {name: _tensor(path, name, info, data) for name, info in header.items() if name != "__metadata__"}


def _tensor(path: Path, name: str, info: Any, data: np.ndarray) -> np.ndarray:
  """The tensor `name` of a safetensors header entry, a view of the file's data; ValueError for an
  entry that is malformed or points outside the file."""
  try:
    dtype_name, shape, (start, end) = info["dtype"], [int(n) for n in info["shape"]], info["data_offsets"]
  except (KeyError, TypeError, ValueError) as err:
    raise ValueError(f"{path} is not a valid .safetensors file: tensor {name!r} has a malformed entry "
                     f"({err!r})") from None
  if dtype_name not in _SAFETENSORS_DTYPES:
    raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
  dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
  if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= len(data)
          and end - start == math.prod(shape) * dtype.itemsize and min(shape, default=0) >= 0):
    raise ValueError(f"{path} is truncated or damaged: tensor {name!r} ({dtype_name} {shape}) points at bytes "
                     f"[{start}, {end}) of {len(data)}")
  return data[start:end].view(dtype).reshape(shape)


def _safetensors_files(path: Path) -> list[Path]:
  if path.is_dir():
    files = sorted(path.glob("*.safetensors"))
    if not files:
      raise FileNotFoundError(f"no .safetensors files in directory {path}")
    return files
  if path.name.endswith(".index.json"):
    try:
      shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
      raise ValueError(f"{path} is not a safetensors shard index (a JSON object with a 'weight_map'): "
                       f"{err!r}") from None
    return [path.parent / str(shard) for shard in shards]
  return [path]


def _torch_to_numpy(tree: Any) -> Any:
  import torch  # noqa: PLC0415 (optional dependency)

  if isinstance(tree, torch.Tensor):
    tensor = tree.detach().cpu()
    if tensor.dtype == torch.bfloat16:
      return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
  if isinstance(tree, Mapping):
    return {str(key): _torch_to_numpy(value) for key, value in tree.items()}
  return tree


def _read_torch(path: Path) -> dict[str, Any]:
  try:
    import torch  # noqa: PLC0415 (optional dependency)
  except ImportError as err:
    raise ImportError(f"reading {path.name} (a PyTorch pickle) needs torch: pip install 'omnimem-jax[convert]' "
                      "(or convert the file to .safetensors elsewhere)") from err
  try:
    tree = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # torch's errors for a file it cannot read
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    raise ValueError(f"{path} is not a readable PyTorch checkpoint: {reason}") from None
  if not isinstance(tree, Mapping):
    raise ValueError(f"{path}: expected a dict of tensors (a state dict or a training checkpoint), "
                     f"got {type(tree).__name__}")
  return _torch_to_numpy(tree)


def read_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
  """The raw (possibly nested) dict of numpy arrays stored at `path` (.safetensors, .pt, .pth, dir)."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  if path.is_dir() or path.suffix == ".safetensors" or path.name.endswith(".index.json"):
    tree: dict[str, Any] = {}
    for file in _safetensors_files(path):
      tree.update(_read_safetensors_file(file))
    return tree
  if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
    return _read_torch(path)
  raise ValueError(f"unsupported checkpoint file {path.name}: expected .safetensors (file, shard index or "
                   "directory) or a PyTorch .pt / .pth pickle")


def pick_weight_set(tree: Mapping[str, Any], preference: Iterable[str] = WEIGHT_SET_PREFERENCE) -> StateDict:
  """The first sub-dict of `preference` present in a training checkpoint, else the root itself.

  Non-array entries (step counters, optimizer metadata) at the chosen level are ignored.
  """
  for name in preference:
    if isinstance(tree.get(name), Mapping):
      tree = tree[name]
      break
  return {key: value for key, value in tree.items() if isinstance(value, np.ndarray)}


def strip_prefixes(state: Mapping[str, np.ndarray]) -> StateDict:
  """Removes wrapper infixes anywhere and wrapper prefixes at the start of every key."""
  stripped: StateDict = {}
  for key, value in state.items():
    name = key
    for infix in WRAPPER_INFIXES:
      name = name.replace(infix, "." if infix.startswith(".") else "")
    name = name.replace("..", ".")
    changed = True
    while changed:
      changed = False
      for prefix in LEADING_PREFIXES:
        if name.startswith(prefix):
          name, changed = name[len(prefix):], True
    if name in stripped:
      raise ValueError(f"keys {key!r} and another key both become {name!r} once wrapper prefixes are stripped")
    stripped[name] = value
  return stripped


def load_state_dict(path: str | os.PathLike, preference: Iterable[str] = WEIGHT_SET_PREFERENCE) -> StateDict:
  """Flat state dict of the preferred weight set in `path`, wrapper prefixes stripped."""
  return strip_prefixes(pick_weight_set(read_checkpoint_file(path), preference))


def _is_lora_key(key: str) -> bool:
  return ".lora_A." in key or ".lora_B." in key


def load_lora(path: str | os.PathLike) -> StateDict:
  """The LoRA weights of a separate LoRA file (LongLive: {"generator_lora": peft state dict}), wrapper
  prefixes stripped. A file without LoRA weights, or with anything besides them (merging it would
  silently replace base weights), is a ValueError naming the key patterns expected."""
  state = load_state_dict(path, preference=("generator_lora", *WEIGHT_SET_PREFERENCE))
  others = sorted(key for key in state if not _is_lora_key(key))
  if len(others) == len(state):
    raise ValueError(f"LoRA file {path} holds no LoRA weights: expected tensors named {LORA_KEY_PATTERNS} (peft "
                     f"names, e.g. under 'generator_lora'); it holds {len(state)} tensors such as {others[:3]}")
  if others:
    raise ValueError(f"LoRA file {path} holds {len(others)} tensors that are not LoRA weights, such as {others[:3]}: "
                     f"merging them would replace base weights; expected only tensors named {LORA_KEY_PATTERNS}")
  return state


def merge_lora(state: Mapping[str, np.ndarray], scale: float = 1.0) -> StateDict:
  """Folds every `X.lora_A[.adapter].weight` / `X.lora_B[...]` pair into `X.weight`: W += scale * B @ A.

  `scale` is alpha / rank (1.0 for LongLive). Merged in float32, then cast back to W's dtype.
  """
  merged = dict(state)
  pairs: dict[str, dict[str, np.ndarray]] = {}
  for key in state:
    for part in ("lora_A", "lora_B"):
      marker = f".{part}."
      if marker in key:
        base = key.split(marker)[0]
        pairs.setdefault(base, {})[part] = merged.pop(key)
  problems = []
  for base, pair in sorted(pairs.items()):
    weight_key = f"{base}.weight"
    if set(pair) != {"lora_A", "lora_B"}:
      problems.append(f"{base}: only {sorted(pair)} present")
    elif weight_key not in merged:
      problems.append(f"{base}: no base weight {weight_key!r} to merge into")
    else:
      weight = merged[weight_key]
      delta = pair["lora_B"].astype(np.float32) @ pair["lora_A"].astype(np.float32)
      if delta.shape != weight.shape:
        problems.append(f"{base}: B @ A has shape {delta.shape}, the weight {weight.shape}")
      else:
        merged[weight_key] = (weight.astype(np.float32) + scale * delta).astype(weight.dtype)
  if problems:
    raise ValueError("cannot merge LoRA weights:\n  " + "\n  ".join(problems))
  return merged


def linear_kernel(weight: np.ndarray) -> np.ndarray:
  """torch Linear `[out, in]` -> flax kernel `[in, out]`."""
  return np.ascontiguousarray(weight.T)


def conv_kernel(weight: np.ndarray) -> np.ndarray:
  """torch Conv `[out, in, *spatial]` -> flax kernel `[*spatial, in, out]` (any spatial rank)."""
  return np.ascontiguousarray(np.moveaxis(weight, (0, 1), (-1, -2)))


def check_names_and_shapes(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]],
                           source: str) -> None:
  """One ValueError listing every missing key, unexpected key and shape mismatch, if any."""
  missing = sorted(set(expected) - set(got))
  unexpected = sorted(set(got) - set(expected))
  mismatched = sorted(f"{key}: checkpoint {tuple(got[key])}, model {tuple(expected[key])}"
                      for key in set(expected) & set(got) if tuple(got[key]) != tuple(expected[key]))
  if not (missing or unexpected or mismatched):
    return
  lines = [f"{source} does not match the model:"]
  for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
    if items:
      lines.append(f"  {title} ({len(items)}):")
      lines.extend(f"    {item}" for item in items[:50])
      if len(items) > 50:
        lines.append(f"    ... and {len(items) - 50} more")
  lines.append("  Check that the checkpoint is the right kind and the preset / config matches it.")
  raise ValueError("\n".join(lines))


def nest(flat: Mapping[str, Any]) -> dict[Any, Any]:
  """{"a.0.b": x} -> {"a": {0: {"b": x}}}: dotted parameter paths to the nested pure dict of
  `nnx.to_pure_dict` (integer keys for list entries)."""
  tree: dict[Any, Any] = {}
  for path, value in flat.items():
    node = tree
    parts = [int(part) if part.isdigit() else part for part in path.split(".")]
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value
  return tree


def flatten(tree: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
  """The inverse of `nest`: a nested pure dict to {dotted path: leaf}."""
  flat: dict[str, Any] = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    flat.update(flatten(value, path + ".") if isinstance(value, Mapping) else {path: value})
  return flat

