"""Orbax checkpoints of converted weights: a directory holding `params/` (an Orbax pytree of the NNX
state as a pure dict) and `omnimem.json` (what kind of model, its config, and notes such as whether
the gates were freshly initialised).

Saving writes to a temporary sibling directory and renames it into place, so an interrupted save
never leaves a half-written checkpoint and never damages an existing one. Restoring builds the model
abstractly (`nnx.eval_shape`: no memory, no compute), attaches a sharding to every parameter, and lets
Orbax place each array straight onto its devices.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from omnimem_jax import io, sharding

METADATA_FILE = "omnimem.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


class Kind(enum.StrEnum):
  """What a checkpoint holds (the `kind` field of its record)."""

  DIT = "wan_dit"  # the causal Wan DiT (`omnimem_jax.convert.wan_dit`, training export)
  VAE = "wan_vae"  # the Wan 2.1 VAE (`omnimem_jax.convert.wan_vae`)
  TEXT_ENCODER = "umt5_encoder"  # the umT5-XXL text encoder (`omnimem_jax.convert.umt5`)


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
  """The JSON record (`omnimem.json`) beside a checkpoint's parameters.

  Attributes:
    kind: what the parameters are.
    config: the architecture's `to_dict()` (ModelConfig, VAEConfig or TextEncoderConfig).
    source: where the weights came from (a file name, or "omnimem_jax.training ...").
    layout: the source state dict's key layout, for converted checkpoints.
    param_dtype: the stored parameter dtype (DiT).
    has_gates: whether the parameters include the OmniMem gate projections (DiT).
    gates_initialised: whether those gates were freshly initialised, not trained (DiT).
    lora: how a LoRA was merged, if one was (DiT).
    training: the training run's config and step count, for exported models.
    format_version: the record's format.
  """

  kind: Kind
  config: dict[str, Any]
  source: str | None = None
  layout: str | None = None
  param_dtype: str | None = None
  has_gates: bool | None = None
  gates_initialised: bool | None = None
  lora: dict[str, Any] | None = None
  training: dict[str, Any] | None = None
  format_version: int = FORMAT_VERSION

  def __post_init__(self) -> None:
    object.__setattr__(self, "kind", Kind(self.kind))
    if not isinstance(self.config, dict):
      raise ValueError(f"a checkpoint record's config must be a dict, got {type(self.config).__name__}")

  def to_json(self) -> dict[str, Any]:
    return {name: value for name, value in dataclasses.asdict(self).items() if value is not None} | {
        "kind": self.kind.value}

  @classmethod
  def from_json(cls, record: Mapping[str, Any], where: str = "checkpoint record") -> CheckpointRecord:
    """Parses a record, refusing unknown fields and unknown kinds with a clear error."""
    names = {field.name for field in dataclasses.fields(cls)}
    record = dict(record)
    if "source_layout" in record and "layout" not in record:  # records written before format 1's dataclass
      record["layout"] = record.pop("source_layout")
    unknown = sorted(set(record) - names)
    if unknown or "kind" not in record or "config" not in record:
      raise ValueError(f"{where}: a record needs 'kind' and 'config' and has only the fields {sorted(names)}; got "
                       f"unknown {unknown}, missing {sorted({'kind', 'config'} - set(record))}")
    if record["kind"] not in {kind.value for kind in Kind}:
      raise ValueError(f"{where}: unknown kind {record['kind']!r}; known: {[kind.value for kind in Kind]}")
    return cls(**record)


def check_conversion_paths(inputs: list[str | os.PathLike | None], output: str | os.PathLike, *,
                           overwrite: bool) -> None:
  """Before any conversion work: every given input exists, and `output` is free (or may be replaced)."""
  for path in inputs:
    if path is not None and not Path(path).exists():
      raise FileNotFoundError(f"checkpoint {path} does not exist")
  if Path(output).exists() and not overwrite:
    raise FileExistsError(f"{output} already exists; choose another output path or pass overwrite=True (--overwrite)")


def save_checkpoint(directory: str | os.PathLike, params: Mapping[str, Any], record: CheckpointRecord, *,
                    overwrite: bool = False) -> Path:
  """Writes `params` (a nested dict of arrays, e.g. `nnx.to_pure_dict(state)`) and its `record`.

  An existing `directory` is replaced only with `overwrite=True`, and only once the new checkpoint
  is complete.
  """
  directory = Path(directory).absolute()
  if not isinstance(record, CheckpointRecord):
    raise TypeError(f"record must be a CheckpointRecord, got {type(record).__name__}")
  if directory.exists() and not overwrite:
    raise FileExistsError(f"{directory} already exists; choose another output path or pass overwrite=True "
                          "(--overwrite)")
  staging = io.temporary_directory_beside(directory)
  try:
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:  # synchronous: done when it returns
      checkpointer.save(staging / PARAMS_DIR, args=ocp.args.StandardSave(dict(params)))
    (staging / METADATA_FILE).write_text(json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n")
    if directory.exists():
      retired = directory.with_name(f".{directory.name}.old-{os.getpid()}")
      directory.rename(retired)
      staging.rename(directory)
      shutil.rmtree(retired)
    else:
      staging.rename(directory)
  finally:
    if staging.exists():
      shutil.rmtree(staging)
  return directory


def read_record(directory: str | os.PathLike, kind: Kind | None = None) -> CheckpointRecord:
  """The record of a checkpoint; with `kind`, refuses a checkpoint of another kind."""
  directory = Path(directory)
  path = directory / METADATA_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{directory} is not an OmniMem-JAX checkpoint (no {METADATA_FILE}); convert "
                            "PyTorch weights first with experiments/convert_checkpoint.py")
  try:
    fields = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise ValueError(f"{path} is not valid JSON ({err})") from None
  if not isinstance(fields, dict):
    raise ValueError(f"{path} must hold a JSON object")
  record = CheckpointRecord.from_json(fields, where=str(path))
  if kind is not None and record.kind != kind:
    raise ValueError(f"{directory} holds a {record.kind.value!r} checkpoint, expected {Kind(kind).value!r}")
  return record


def saved_param_names(directory: str | os.PathLike) -> set[tuple[str, ...]]:
  """Paths of every array stored in the checkpoint's params."""
  metadata = ocp.StandardCheckpointer().metadata(Path(directory).absolute() / PARAMS_DIR)
  tree = metadata.item_metadata.tree
  return {tuple(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def restore_params(directory: str | os.PathLike, target: Mapping[str, Any]) -> dict[str, Any]:
  """Restores the arrays named in `target` (a pure dict of `jax.ShapeDtypeStruct`, with shardings to
  place them on devices), cast to the target dtypes."""
  target = dict(target)
  args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)  # saved arrays absent from target stay on disk
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    return checkpointer.restore(Path(directory).absolute() / PARAMS_DIR, args=args)


def restore_module(directory: str | os.PathLike, create: Callable[[], nnx.Module], *, mesh: Mesh | None = None,
                   rules: Mapping[str, str | None] = sharding.LOGICAL_RULES,
                   fill_missing: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                   ignore: Callable[[tuple[str, ...]], bool] | None = None) -> nnx.Module:
  """Builds `create()` abstractly and fills it from the checkpoint.

  Args:
    directory: a checkpoint written by `save_checkpoint`.
    create: builds the module (called under `nnx.eval_shape`, so it allocates nothing).
    mesh: place every parameter with the sharding its logical axis names map to under `rules`; default
      the first local device.
    rules: logical axis name -> mesh axis.
    fill_missing: given the pure dict of abstract parameters the checkpoint lacks, returns their
      values (e.g. freshly initialised gates); without it, missing parameters are an error.
    ignore: saved parameter paths the module does not use (left unread instead of an error).
  """
  abstract = nnx.eval_shape(create)
  graphdef, state = nnx.split(abstract)
  mesh = Mesh(jax.local_devices()[:1], ("data",)) if mesh is None else mesh
  shardings = nnx.to_pure_dict(sharding.state_shardings(state, mesh, rules))
  target = jax.tree.map(lambda var, shard: jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=shard),
                        nnx.to_pure_dict(state), shardings)
  flat_target = dict(_flatten(target))
  saved = {path for path in saved_param_names(directory) if ignore is None or not ignore(path)}
  missing = {path: value for path, value in flat_target.items() if path not in saved}
  unexpected = sorted(".".join(path) for path in saved - set(flat_target))
  if unexpected or (missing and fill_missing is None):
    raise ValueError(f"checkpoint {directory} does not match the model: missing "
                     f"{sorted('.'.join(p) for p in missing)}, unexpected {unexpected}")
  restored = dict(_flatten(restore_params(directory, _unflatten(
      {path: value for path, value in flat_target.items() if path not in missing}))))
  if missing:
    filled = dict(_flatten(fill_missing(_unflatten(missing))))
    restored.update({path: jax.device_put(filled[path], flat_target[path].sharding) for path in missing})
  nnx.replace_by_pure_dict(state, _unflatten(restored))
  return nnx.merge(graphdef, state)


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
  items = []
  for key, value in tree.items():
    path = (*prefix, str(key))
    items.extend(_flatten(value, path) if isinstance(value, Mapping) else [(path, value)])
  return items


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def restore_configured(directory: str | os.PathLike, kind: Kind, config_type: Any,
                       module_type: Callable[..., nnx.Module], *, dtype: str | None = None,
                       mesh: Mesh | None = None) -> nnx.Module:
  """`module_type(config, rngs=...)` restored from a checkpoint of `kind` whose record holds a
  `config_type.to_dict()`; `dtype` (a config field) overrides the activation dtype, `mesh` shards the
  parameters by their logical axis names."""
  config = config_type.from_dict(read_record(directory, kind).config)
  if dtype is not None:
    config = dataclasses.replace(config, dtype=dtype)
  return restore_module(directory, lambda: module_type(config, rngs=nnx.Rngs(0)), mesh=mesh)


def module_with_params(create: Callable[[], nnx.Module], params: Mapping[str, Any]) -> nnx.Module:
  """`create()` built abstractly (no random init) and filled with `params`, a pure dict of arrays."""
  graphdef, state = nnx.split(nnx.eval_shape(create))
  nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, dict(params)))
  return nnx.merge(graphdef, state)

