r"""Teacher-forcing training of a small causal DiT on the synthetic orbiting-camera world (logic:
omnimem_jax/training/). Re-running the same command resumes from the latest checkpoint in --run_dir;
re-running a finished run trains nothing and changes nothing, except that it writes a new --export.

  python experiments/train.py --mode=omnimem --run_dir=runs/omnimem --steps=3000 \
      --export=assets/demo_checkpoint            # the committed demo checkpoint was made like this
  python experiments/train.py --mode=window --run_dir=runs/window --steps=3000 --export=runs/window/export
  python experiments/train.py --mode=dense --run_dir=runs/dense --time_budget_s=120 --export=runs/dense/export

Writes Orbax checkpoints (state: params, EMA, optimizer, step) and the run's config under
--run_dir/checkpoints, a JSON loss log (--run_dir/log.json; train_seconds sums every session) and, with
--export, the EMA weights as a `wan_dit` checkpoint that experiments/generate.py (--checkpoint) and
experiments/eval_memory.py read. Bad input gives one line `error: ...` and exit code 2, before any
training where it can: bad flags, an existing or unwritable --export, an unwritable --run_dir, a
--run_dir/log.json that is not a loss log, flags that differ from those the run was trained with, and
damaged checkpoints. A failed export leaves the run saved: the same command exports it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from absl import app, flags, logging

from omnimem_jax import cli, io

if TYPE_CHECKING:
  from omnimem_jax.training import Trainer, TrainConfig

_MODE = flags.DEFINE_enum("mode", "omnimem", ["omnimem", "window", "dense"], "Attention mode to train.")
_RUN_DIR = flags.DEFINE_string("run_dir", None, "Directory of the run's Orbax checkpoints and log (resumes).")
_STEPS = flags.DEFINE_integer("steps", 2000, "Train until this many steps in total.")
_TIME_BUDGET = flags.DEFINE_float("time_budget_s", None, "Also stop once this many seconds of training passed.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Clips per step (split over the local devices).")
_CHUNKS = flags.DEFINE_integer("num_chunks", 12, "Chunks (3 latent frames each) per training clip.")
_LR = flags.DEFINE_float("learning_rate", 3e-4, "Peak AdamW learning rate.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 100, "Linear warm-up steps.")
_EMA = flags.DEFINE_float("ema_decay", 0.99, "EMA decay of the exported weights.")
_SHIFT = flags.DEFINE_float("sigma_shift", 3.0, "Shift of the logit-normal noise level toward high noise (1: none).")
_OWN = flags.DEFINE_bool("select_own_noisy_chunk", True, "Official TF AWE: a noisy chunk may select its own blocks.")
_DIM = flags.DEFINE_integer("dim", 128, "Model width (heads of 32).")
_LAYERS = flags.DEFINE_integer("num_layers", 4, "Transformer blocks.")
_WORLD_WIDTH = flags.DEFINE_integer("world_width", 96, "Panorama circumference (columns); period = width / speed.")
_SPEED = flags.DEFINE_integer("speed", 4, "Columns the camera pans per frame.")
_CODEC = flags.DEFINE_string("codec", None, "Train on the pixel world encoded by this codec (experiments/"
                             "train_codec.py), whose record gives the world; default: the latent-space world.")
_NUM_WORLDS = flags.DEFINE_integer("num_worlds", 1024, "With --codec: distinct worlds, encoded once.")
_SEED = flags.DEFINE_integer("seed", 0, "Data, noise and initialisation seed.")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 500, "Checkpoint every this many steps (and at the end).")
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Print and log the loss every this many steps.")
_EXPORT = flags.DEFINE_string("export", None, "Write the EMA weights here as a wan_dit checkpoint at the end.")


def _validate() -> dict[str, Any] | None:
  """Refuses bad flags and unusable paths before any work; returns the run's loss log, if it has one."""
  if _RUN_DIR.value is None:
    cli.fail("--run_dir is required (checkpoints and the loss log go there)")
  for flag in (_STEPS, _BATCH, _CHUNKS, _WARMUP, _DIM, _LAYERS, _SAVE_EVERY, _LOG_EVERY, _WORLD_WIDTH, _SPEED,
               _NUM_WORLDS):
    if flag.value < 1:
      cli.fail(f"--{flag.name} must be >= 1, got {flag.value}")
  if _TIME_BUDGET.value is not None and not _TIME_BUDGET.value > 0:
    cli.fail(f"--time_budget_s must be > 0, got {_TIME_BUDGET.value}")
  if _DIM.value % 32:
    cli.fail(f"--dim must be a multiple of 32 (heads of 32), got {_DIM.value}")
  if _EXPORT.value is not None and Path(_EXPORT.value).exists():
    cli.fail(f"--export={_EXPORT.value} already exists; remove it or pick another path")
  run_dir = Path(_RUN_DIR.value)
  if run_dir.exists() and not run_dir.is_dir():
    cli.fail(f"--run_dir={run_dir} is not a directory")
  for flag in (_RUN_DIR, _EXPORT):
    if flag.value is not None:
      try:
        io.check_writable(flag.value)
      except OSError as err:
        cli.fail(f"--{flag.name}: {err}")
  return _read_log(run_dir / "log.json")


def _read_log(path: Path) -> dict[str, Any] | None:
  """The run's loss log, None if it has none; one that is not a loss log is refused, never replaced."""
  if not path.exists():
    return None
  try:
    log = json.loads(path.read_text())
  except (OSError, ValueError) as err:
    cli.fail(f"{path} is not a readable JSON loss log ({err}); move it away to start a new log")
  if not isinstance(log, dict) or not isinstance(log.get("history"), list):
    cli.fail(f"{path} is not a loss log of experiments/train.py (no 'history' list); move it away to start a new log")
  return log


def _world() -> Any:
  """The world to train on (a `synthetic.WorldConfig`): the codec's (from its record; --world_width / --speed
  then refused), else the flags'."""
  from omnimem_jax import checkpoints  # noqa: PLC0415
  from omnimem_jax.data import synthetic  # noqa: PLC0415

  if _CODEC.value is None:
    return synthetic.WorldConfig(world_width=_WORLD_WIDTH.value, speed=_SPEED.value)
  if _WORLD_WIDTH.present or _SPEED.present:
    cli.fail("--world_width / --speed come from the codec's record with --codec; drop them")
  training = checkpoints.read_record(_CODEC.value, checkpoints.Kind.VAE).training or {}
  if "world" not in training:
    cli.fail(f"--codec={_CODEC.value} records no training world (not made by experiments/train_codec.py)")
  return synthetic.WorldConfig.from_dict(training["world"])


def _train_config() -> TrainConfig:
  """The TrainConfig of the flags (a bad combination: one line, exit 2)."""
  from omnimem_jax import training  # noqa: PLC0415 (heavy imports after the flags are known to be good)

  try:
    world = _world()
    model = training.demo_model_config(_MODE.value, _CHUNKS.value, dim=_DIM.value, ffn_dim=2 * _DIM.value,
                                       num_heads=_DIM.value // 32, num_layers=_LAYERS.value,
                                       in_channels=world.channels, out_channels=world.channels)
    return training.TrainConfig(model=model, world=world, num_chunks=_CHUNKS.value, batch_size=_BATCH.value,
                                learning_rate=_LR.value, warmup_steps=_WARMUP.value, ema_decay=_EMA.value,
                                sigma_shift=_SHIFT.value, select_own_noisy_chunk=_OWN.value, seed=_SEED.value,
                                codec=_CODEC.value, num_worlds=_NUM_WORLDS.value)
  except (OSError, ValueError) as err:
    cli.fail(err)


def _train(trainer: Trainer, log: dict[str, Any]) -> tuple[int, float, float | None]:
  """Steps until --steps (or the time budget), appending the mean loss every --log_every steps to
  log["history"] and checkpointing every --save_every steps. Returns (steps taken, seconds, seconds of
  the first step, which includes the compilation)."""
  start = time.perf_counter()
  first_step_seconds = None
  taken = 0
  recent: list[float] = []
  while trainer.step_count < _STEPS.value:
    if _TIME_BUDGET.value is not None and time.perf_counter() - start > _TIME_BUDGET.value:
      print(f"time budget of {_TIME_BUDGET.value:g} s reached at step {trainer.step_count}", flush=True)
      break
    metrics = trainer.step()
    taken += 1
    if first_step_seconds is None:
      first_step_seconds = time.perf_counter() - start
    recent.append(metrics["loss"])
    step = trainer.step_count
    if step % _LOG_EVERY.value == 0 or step == _STEPS.value:
      entry = {"step": step, "loss": sum(recent) / len(recent), "grad_norm": metrics["grad_norm"],
               "seconds": time.perf_counter() - start}
      log["history"].append(entry)
      recent = []
      print(f"step {step:6d}  loss {entry['loss']:.4f}  grad_norm {entry['grad_norm']:.3f}  "
            f"{entry['seconds']:.0f} s", flush=True)
    if step % _SAVE_EVERY.value == 0:
      trainer.save(wait=False)
  return taken, time.perf_counter() - start, first_step_seconds


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  saved_log = _validate()
  logging.set_verbosity(logging.WARNING)  # keep Orbax INFO lines out of the loss log
  config = _train_config()
  import jax  # noqa: PLC0415

  from omnimem_jax import training  # noqa: PLC0415

  run_dir = Path(_RUN_DIR.value)
  try:
    trainer = training.Trainer(config, run_dir / "checkpoints")
  except (OSError, ValueError) as err:  # an unwritable run directory, a run of another config, damaged files
    cli.fail(err)
  log = saved_log if saved_log is not None and trainer.step_count > 0 else {"history": []}
  device = str(jax.devices()[0].device_kind)
  log.update(config=config.to_dict(), device=device, jax=jax.__version__, devices=jax.device_count())
  print(f"{_MODE.value}: step {trainer.step_count} -> {_STEPS.value} on {jax.device_count()} x {device}, "
        f"world period {config.world.period} frames", flush=True)
  taken, seconds, first_step_seconds = _train(trainer, log)
  trainer.save()
  trainer.close()
  log_path = run_dir / "log.json"
  if taken or saved_log is None:  # a finished run re-run keeps its log as it was
    log.update(steps=trainer.step_count, train_seconds=log.get("train_seconds", 0.0) + seconds)
    if first_step_seconds is not None:
      log["first_step_seconds"] = first_step_seconds
    io.write_json(log_path, log)
  if _EXPORT.value is not None:
    final = log["history"][-1]["loss"] if log["history"] else None
    try:
      path = trainer.export(_EXPORT.value, notes={"final_logged_loss": final, "train_seconds": log.get("train_seconds"),
                                                  "device": device, "jax": jax.__version__})
    except OSError as err:
      cli.fail(f"--export={_EXPORT.value}: {err}; the run is saved: run the same command again to export it")
    print(f"exported EMA weights to {path}")
  print(f"done: {trainer.step_count} steps, {taken} in this run ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
