"""The training loop's state and step, and `Trainer`: teacher-forcing training of one model on the
synthetic world with Orbax checkpoints (resumable) and export as a `wan_dit` checkpoint.

Usage:
  config = TrainConfig(model=demo_model_config("omnimem"))
  trainer = Trainer(config, "runs/omnimem")      # restores the latest checkpoint there, if any
  while trainer.step_count < 1000:
    metrics = trainer.step()                     # {"loss": ..., "grad_norm": ...}
  trainer.save(); trainer.export("runs/omnimem/export")

A run's directory also holds the TrainConfig it was saved with (`CONFIG_FILE`): resuming it with another
config is a CheckpointError naming the fields that differ, before any state is restored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omnimem_jax import checkpoints, io
from omnimem_jax.model.wan import CausalWanModel
from omnimem_jax.training.config import TrainConfig
from omnimem_jax.training.data import make_batch
from omnimem_jax.training.loss import loss_fn
from omnimem_jax.training.optim import ema_update, optimizer


CONFIG_FILE = "train_config.json"  # beside the step directories: the TrainConfig the run was saved with


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything that changes during training (a pytree: checkpointed as a whole)."""

  step: jax.Array  # int32 scalar: steps taken
  params: nnx.State
  ema: nnx.State
  opt_state: Any


def train_step(graphdef: nnx.GraphDef, rest: nnx.State, config: TrainConfig, state: TrainState,
               batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW update of the parameters (`rest`: the model's non-parameter state) and their EMA, with the
  metrics {"loss", "grad_norm"} (the norm before clipping)."""

  def loss_of(params):
    return loss_fn(nnx.merge(graphdef, params, rest), batch, config.select_own_noisy_chunk)

  (loss, _), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
  updates, opt_state = optimizer(config).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
  return TrainState(step=state.step + 1, params=params, ema=ema_update(state.ema, params, config.ema_decay),
                    opt_state=opt_state), metrics


@functools.lru_cache(maxsize=8)
def compiled_step(config: TrainConfig, mesh: Mesh) -> Any:
  """The jitted, donated train step for `config` on `mesh` (state replicated, batch split over "data").
  Cached, so every Trainer of the same config and mesh shares one compilation."""
  graphdef, _, rest = nnx.split(nnx.eval_shape(lambda: CausalWanModel(config.model, rngs=nnx.Rngs(0))),
                                nnx.Param, ...)
  replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
  return jax.jit(functools.partial(train_step, graphdef, rest, config),
                 in_shardings=(replicated, split), out_shardings=(replicated, replicated), donate_argnums=0)


def default_mesh(batch_size: int) -> Mesh:
  """A 1-D "data" mesh over as many local devices as divide the batch (data parallel)."""
  devices = jax.local_devices()
  count = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
  return Mesh(np.asarray(devices[:count]), ("data",))


def _pure(state: TrainState) -> dict[str, Any]:
  """The state as nested dicts of arrays (what Orbax writes)."""
  return {"step": state.step, "params": nnx.to_pure_dict(state.params), "ema": nnx.to_pure_dict(state.ema),
          "opt_state": {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(state.opt_state))}}


def _from_pure(pure: dict[str, Any], like: TrainState) -> TrainState:
  """The inverse of `_pure`, with `like`'s structure."""

  def state_from(values: dict[str, Any], template: nnx.State) -> nnx.State:
    state = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(state, values)
    return state

  leaves = [pure["opt_state"][name] for name in sorted(pure["opt_state"])]
  return TrainState(step=jnp.asarray(pure["step"], jnp.int32), params=state_from(pure["params"], like.params),
                    ema=state_from(pure["ema"], like.ema),
                    opt_state=jax.tree.unflatten(jax.tree.structure(like.opt_state), leaves))


def check_resumable(directory: str | os.PathLike, config: TrainConfig) -> None:
  """Refuses to resume the run in `directory` with another config: the state's shapes and every step's
  data depend on it, and the export records it. A CheckpointError names the fields that differ (runs
  saved before `CONFIG_FILE` existed are only checked by Orbax, at restore)."""
  path = Path(directory) / CONFIG_FILE
  if not path.is_file():
    return
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError) as err:
    raise checkpoints.CheckpointError(f"{path} is unreadable ({err}): it records the run's config") from err
  differ = _differences(saved, json.loads(json.dumps(config.to_dict())))
  if differ:
    (name, was, now), rest = differ[0], differ[1:]
    also = ", ".join(f"{field}={new} trained with {old}" for field, old, new in rest[:5])
    also = f" (also {also})" if rest else ""
    raise checkpoints.CheckpointError(
        f"{name}={now} but the run in {directory} was trained with {name}={was}{also}; resume it with its own "
        "settings, or train in another directory")


def _differences(saved: Any, current: Any, name: str = "config") -> list[tuple[str, Any, Any]]:
  """(field name, saved value, current value) of every leaf of two `to_dict()` trees that differs, the
  fields of each level before those of its nested configs."""
  if isinstance(saved, dict) and isinstance(current, dict):
    keys = sorted(set(saved) | set(current), key=lambda key: (isinstance(saved.get(key), dict), key))
    return [difference for key in keys for difference in _differences(saved.get(key), current.get(key), key)]
  return [] if saved == current else [(name, saved, current)]


class Trainer:
  """Teacher-forcing training of one model on the synthetic world, with Orbax checkpoints.

  The constructor restores the latest checkpoint under `directory` (if any), so re-running the same
  command resumes. Parameters are replicated over the mesh, batches split over its "data" axis;
  `step()` is one jitted, donated update.
  """

  def __init__(self, config: TrainConfig, directory: str | os.PathLike | None = None, *, mesh: Mesh | None = None,
               max_to_keep: int = 2):
    self.config = config
    self.directory = None if directory is None else Path(directory).absolute()
    self.manager = None
    latest = None
    if self.directory is not None:
      self.manager = ocp.CheckpointManager(self.directory,
                                           options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))
      latest = self.manager.latest_step()
      if latest is not None:
        check_resumable(self.directory, config)  # before the model is built
    self.mesh = default_mesh(config.batch_size) if mesh is None else mesh
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
    self.graphdef, params, self.rest = nnx.split(CausalWanModel(config.model, rngs=nnx.Rngs(config.seed)),
                                                 nnx.Param, ...)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=jax.tree.map(jnp.copy, params),
                       opt_state=optimizer(config).init(params))
    self.state = jax.device_put(state, self.replicated)
    if latest is not None:
      self.restore(latest)
    self.step_fn = compiled_step(config, self.mesh)

  @property
  def step_count(self) -> int:
    return int(self.state.step)

  def batch(self, step: int | None = None) -> dict[str, jax.Array]:
    """The (sharded) batch of step `step` (default: the next one)."""
    data = make_batch(self.config, self.step_count if step is None else step)
    return jax.device_put(data, self.batch_sharding)

  def step(self, batch: dict[str, jax.Array] | None = None) -> dict[str, float]:
    """One update on `batch` (default: the next step's batch); returns the metrics as floats."""
    self.state, metrics = self.step_fn(self.state, self.batch() if batch is None else batch)
    return {name: float(value) if value.ndim == 0 else np.asarray(value).tolist() for name, value in metrics.items()}

  def save(self, wait: bool = True) -> None:
    """Checkpoints the whole state at its step, and the config beside it (no-op without a directory).
    A step already saved (the last periodic save, a finished run re-run) is not saved again."""
    if self.manager is None:
      return
    io.write_json(self.directory / CONFIG_FILE, self.config.to_dict())
    if self.manager.latest_step() != self.step_count:
      self.manager.save(self.step_count, args=ocp.args.StandardSave(_pure(self.state)), force=True)
    if wait:
      self.manager.wait_until_finished()

  def restore(self, step: int) -> None:
    """Replaces the state by the checkpoint of `step` under the directory (CheckpointError if unreadable)."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated),
                            _pure(self.state))
    pure = checkpoints.orbax_read(lambda: self.manager.restore(step, args=ocp.args.StandardRestore(abstract)),
                                  self.directory / str(step))
    self.state = _from_pure(pure, self.state)

  def model(self, ema: bool = True) -> CausalWanModel:
    """The trained model (EMA parameters by default)."""
    return nnx.merge(self.graphdef, self.state.ema if ema else self.state.params, self.rest)

  def close(self) -> None:
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()

  def export(self, directory: str | os.PathLike, *, ema: bool = True, notes: dict[str, Any] | None = None,
             overwrite: bool = False) -> Path:
    """Writes the (EMA) weights as a `wan_dit` checkpoint that `wan_dit.restore_model` and
    `experiments/generate.py --checkpoint=...` read; the record's `training` holds the step count,
    `ema`, `TrainConfig.to_dict()` and `notes`."""
    params = jax.device_get(nnx.to_pure_dict(self.state.ema if ema else self.state.params))
    config = self.config.model
    record = checkpoints.CheckpointRecord(
        kind=checkpoints.Kind.DIT, config=config.to_dict(), param_dtype="float32",
        has_gates=config.memory.mode == "omnimem", source="omnimem_jax.training (synthetic world)",
        training={"steps": self.step_count, "ema": ema, **self.config.to_dict(), **(notes or {})})
    return checkpoints.save_checkpoint(directory, params, record, overwrite=overwrite)
