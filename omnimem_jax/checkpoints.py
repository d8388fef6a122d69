"""Orbax checkpoints of converted weights: a directory holding `params/` (an Orbax pytree of the NNX
state as a pure dict) and `omnimem.json` (what kind of model, its config, and notes such as whether
the gates were freshly initialised).

Saving writes to a temporary sibling directory and renames it into place, so an interrupted save
never leaves a half-written checkpoint and never damages an existing one. Restoring builds the model
abstractly (`nnx.eval_shape`: no memory, no compute), attaches a sharding to every parameter, and lets
Orbax place each array straight onto its devices.

A checkpoint that cannot be restored (its `params/` missing, truncated or corrupted, or holding arrays
its record's config does not describe) is a `CheckpointError` naming the directory and what is wrong,
on one line; `check_params` finds all but damaged array data from Orbax's metadata, before any weights
are read.
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import json
import logging
import os
import shutil
import sys
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
ORBAX_COMMIT_MARKER = "commit_success.txt"  # Orbax writes it after a save; it holds the absolute save path
FORMAT_VERSION = 1


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored: its parameters are missing, unreadable (truncated,
  corrupted) or do not match the config in its record. The message names the directory and the fault."""


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
  is complete. The rename of the finished staging directory is the commit, so Orbax's own marker file
  (which names the staging directory's absolute path) is not kept.
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
    (staging / PARAMS_DIR / ORBAX_COMMIT_MARKER).unlink(missing_ok=True)
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


def read_config(directory: str | os.PathLike, record: CheckpointRecord, config_type: Any) -> Any:
  """`config_type.from_dict(record.config)`; a config it cannot parse is a CheckpointError."""
  try:
    return config_type.from_dict(record.config)
  except (KeyError, TypeError, ValueError) as err:
    raise CheckpointError(f"{Path(directory) / METADATA_FILE} holds an unreadable {config_type.__name__}: "
                          f"{err}") from err


def saved_param_shapes(directory: str | os.PathLike) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Path -> shape of every array stored in the checkpoint's params, from Orbax's metadata (no weights
  are read); CheckpointError when `params/` is missing or its metadata unreadable."""
  params = Path(directory).absolute() / PARAMS_DIR
  if not params.is_dir():
    raise CheckpointError(f"{params} does not exist: the checkpoint has lost its weights (copy it again, or "
                          "convert / export it again)")
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(params).tree
  except (OSError, ValueError) as err:  # a missing or garbled _METADATA, a damaged OCDBT database
    raise CheckpointError(f"{params} is unreadable (truncated or corrupted): {_first_line(err)}") from err
  finally:
    handler.close()
  return {tuple(str(getattr(key, "key", key)) for key in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _compare_params(directory: str | os.PathLike, expected: Mapping[tuple[str, ...], tuple[int, ...]], *,
                   ignore: Callable[[tuple[str, ...]], bool] | None = None,
                   allow_missing: bool = False) -> set[tuple[str, ...]]:
  """Checks the stored arrays against `expected` (path -> shape) and returns the paths the checkpoint
  lacks (only allowed with `allow_missing`). Stored paths for which `ignore` is true are skipped.
  Anything unexpected, missing or misshapen is one CheckpointError naming the first few."""
  saved = {path: shape for path, shape in saved_param_shapes(directory).items() if ignore is None or not ignore(path)}
  missing = sorted(set(expected) - set(saved))
  problems = [f"{'.'.join(path)}: stored {saved[path]}, the config gives {tuple(expected[path])}"
              for path in sorted(set(saved) & set(expected)) if saved[path] != tuple(expected[path])]
  problems += [f"{'.'.join(path)}: stored, not in the config's model" for path in sorted(set(saved) - set(expected))]
  if not allow_missing:
    problems += [f"{'.'.join(path)}: missing" for path in missing]
  if problems:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise CheckpointError(f"{Path(directory) / PARAMS_DIR} does not match the config in "
                          f"{Path(directory) / METADATA_FILE}: {'; '.join(problems[:3])}{more}")
  return set(missing)


def check_params(directory: str | os.PathLike, create: Callable[[], nnx.Module]) -> None:
  """Before any weights load: the checkpoint's params hold exactly the arrays of `create()` (built
  abstractly), at their shapes; CheckpointError otherwise. Reads Orbax's metadata only."""
  state = nnx.state(nnx.eval_shape(create))
  _compare_params(directory, {path: value.shape for path, value in _flatten(nnx.to_pure_dict(state))})


def orbax_read(read: Callable[[], Any], path: str | os.PathLike) -> Any:
  """`read()`, an Orbax restore of `path`, with its read errors (damaged files, arrays stored with other
  shapes) turned into a one-line CheckpointError naming `path`."""
  try:
    return read()
  except Exception as err:  # Orbax re-raises TensorStore's read errors as a bare Exception
    if not isinstance(_root_cause(err), (OSError, ValueError)):
      raise
    message = f"cannot restore {path} (truncated, corrupted, or arrays of other shapes): {_first_line(err)}"
  _discard_abandoned_reads()  # outside the except block: the error no longer holds them
  raise CheckpointError(message)


def restore_params(directory: str | os.PathLike, target: Mapping[str, Any]) -> dict[str, Any]:
  """Restores the arrays named in `target` (a pure dict of `jax.ShapeDtypeStruct`, with shardings to
  place them on devices), cast to the target dtypes; unreadable array data is a CheckpointError."""
  target = dict(target)
  params = Path(directory).absolute() / PARAMS_DIR
  args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)  # saved arrays absent from target stay on disk

  def read() -> dict[str, Any]:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
      return checkpointer.restore(params, args=args)

  return orbax_read(read, params)


def _discard_abandoned_reads() -> None:
  """Finalises, silently, the reads Orbax abandoned after the first failed one. Orbax turns the
  GeneratorExit that closes each of them into an Exception, which Python would print ("Exception
  ignored in ...", with a page of TensorStore spec) whenever the garbage collector reached it."""
  hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
  asyncio_log = logging.getLogger("asyncio")
  disabled, asyncio_log.disabled = asyncio_log.disabled, True  # "Future exception was never retrieved"
  try:
    gc.collect()
  finally:
    sys.unraisablehook, asyncio_log.disabled = hook, disabled


def _root_cause(err: BaseException) -> BaseException:
  while err.__cause__ is not None:
    err = err.__cause__
  return err


def _first_line(err: BaseException) -> str:
  """The first line of the innermost cause of `err` (Orbax wraps TensorStore's messages in long specs)."""
  lines = str(_root_cause(err)).strip().splitlines() or [type(_root_cause(err)).__name__]
  return lines[0][:300]


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
  missing = _compare_params(directory, {path: value.shape for path, value in flat_target.items()}, ignore=ignore,
                           allow_missing=fill_missing is not None)
  restored = dict(_flatten(restore_params(directory, _unflatten(
      {path: value for path, value in flat_target.items() if path not in missing}))))
  if missing:
    filled = dict(_flatten(fill_missing(_unflatten({path: flat_target[path] for path in missing}))))
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
  config = read_config(directory, read_record(directory, kind), config_type)
  if dtype is not None:
    config = dataclasses.replace(config, dtype=dtype)
  return restore_module(directory, lambda: module_type(config, rngs=nnx.Rngs(0)), mesh=mesh)


def module_with_params(create: Callable[[], nnx.Module], params: Mapping[str, Any]) -> nnx.Module:
  """`create()` built abstractly (no random init) and filled with `params`, a pure dict of arrays."""
  graphdef, state = nnx.split(nnx.eval_shape(create))
  nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, dict(params)))
  return nnx.merge(graphdef, state)

