r"""Trains the demo's codec: a small Wan-architecture VAE on the pixel world (logic:
omnimem_jax/training/codec.py), exported as a `wan_vae` checkpoint for experiments/train.py --codec and
experiments/generate.py --vae.

  python experiments/train_codec.py --steps=3000 --export=assets/demo/vae   # how the committed codec was made (GPU)
  python experiments/train_codec.py --steps=20 --batch_size=2 --export=/tmp/codec   # a smoke run (CPU)
  python experiments/train_codec.py --start=assets/demo/vae --time_budget_s=600 --export=runs/vae2   # train further

Bad flags give one line `error: ...` and exit code 2 before any work.
"""

import time
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags

from omnimem_jax import cli

_STEPS = flags.DEFINE_integer("steps", 3000, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Clips per step.")
_FRAMES = flags.DEFINE_integer("latent_frames", 4, "Latent frames per clip (1 + 4 (F - 1) video frames).")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Peak AdamW learning rate.")
_KL = flags.DEFINE_float("kl_weight", 1e-4, "Weight of the KL term.")
_TIME_BUDGET = flags.DEFINE_float("time_budget_s", None, "Also stop once this many seconds of training passed.")
_SEED = flags.DEFINE_integer("seed", 0, "Worlds, noise and initialisation seed.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 100, "Print the loss every this many steps.")
_EXPORT = flags.DEFINE_string("export", None, "Write the codec here (a wan_vae checkpoint).", required=True)
_START = flags.DEFINE_string("start", None, "Train further from this codec (an --export of this script); --steps "
                             "counts this run's steps.")


def _validate() -> None:
  for flag in (_STEPS, _BATCH, _LOG_EVERY):
    if flag.value < 1:
      cli.fail(f"--{flag.name} must be >= 1, got {flag.value}")
  if _FRAMES.value < 2:
    cli.fail(f"--latent_frames must be >= 2, got {_FRAMES.value}")
  if not (_LR.value > 0 and _KL.value >= 0):
    cli.fail(f"--learning_rate must be > 0 and --kl_weight >= 0, got {_LR.value} and {_KL.value}")
  if _TIME_BUDGET.value is not None and not _TIME_BUDGET.value > 0:
    cli.fail(f"--time_budget_s must be > 0, got {_TIME_BUDGET.value}")
  if _START.value is not None and not Path(_START.value).is_dir():
    cli.fail(f"--start={_START.value} is not a directory (give a codec exported by this script)")
  export = Path(_EXPORT.value)
  if export.exists():
    cli.fail(f"--export={export} already exists; remove it or pick another path")
  parent = next(p for p in export.absolute().parents if p.exists())
  if not parent.is_dir():
    cli.fail(f"--export={export} cannot be written: {parent} is not a directory")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  _validate()
  import jax  # noqa: PLC0415 (heavy imports after the flags are known to be good)

  from omnimem_jax.training import codec  # noqa: PLC0415

  config = codec.CodecConfig(latent_frames=_FRAMES.value, batch_size=_BATCH.value, learning_rate=_LR.value,
                             kl_weight=_KL.value, seed=_SEED.value)
  initial, done_before = None, 0
  if _START.value is not None:
    try:
      initial, done_before = codec.resume_codec(_START.value, config)
    except (OSError, ValueError) as err:  # checkpoints.CheckpointError is a ValueError
      cli.fail(f"--start={_START.value}: {err}")
  print(f"codec: {_STEPS.value} steps of {config.batch_size} clips on {jax.devices()[0].device_kind}"
        + (f", after {done_before} steps of {_START.value}" if initial is not None else ""), flush=True)
  start = time.perf_counter()
  vae, history = codec.train_codec(config, _STEPS.value, start=initial, log_every=_LOG_EVERY.value,
                                   time_budget_s=_TIME_BUDGET.value)
  steps = done_before + (history[-1]["step"] if history else 0)
  path = codec.export_codec(vae, config, _EXPORT.value, steps=steps, notes={
      "history": history, "train_seconds": time.perf_counter() - start, "device": jax.devices()[0].device_kind,
      "jax": jax.__version__, "started_from": _START.value})
  print(f"exported the codec to {path}", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
