r"""Long-memory benchmark: revisit consistency and retrieval recall of trained omnimem / window / dense
models on the synthetic orbiting-camera world (metrics: omnimem_jax/evaluation.py).

  python experiments/eval_memory.py --checkpoints=omnimem:assets/demo_checkpoint,window:runs/window/export,\
dense:runs/dense/export --output=benchmarks/results/memory_bench.json

For each mode and each of --num_videos held-out worlds (seeds never used in training):
  prefix   the first orbit (--prefix_chunks chunks) is given as ground truth: written into the KV store
           by the rollout's context passes (t = 0, `Rollout.write_context`), then the same Rollout
           generates the remaining chunks with the 4-step sampler (`Rollout.generate`). Every generated
           frame revisits a view of the prefix; PSNR / SSIM against it (= its first appearance), by
           revisit distance.
  free     the whole video is generated from noise (Rollout.run); revisited frames against the frames
           the model itself generated at the view's first appearance.
  recall   (omnimem) per layer, the share of the dense oracle's attention mass over the selection
           candidates that the top-k selected blocks hold, on a teacher-forcing pass over a ground-truth
           clip (noisy half at sigma 0.625, the sampler's last step), against the chance level.
With `--kv_formats=bf16,fp8,int4` the omnimem checkpoint is evaluated once per KV store format (the
full-resolution tier compact: `memory.store`), reported as `omnimem` (bf16) and `omnimem_fp8`, ...; each
compact format also reports `picks_unchanged`: the share of the bf16 store's top-k picks (every chunk,
model call, layer, head and query group of the free runs) that the compact store's free runs picked too.
Checkpoints trained on the pixel world through a codec (`train.py --codec`) are evaluated on that world
encoded by the codec (--codec, default: the path their record names).
Writes JSON (and a PNG plot with --plot, default next to the JSON) atomically. The plot needs matplotlib
(`pip install 'omnimem-jax[plot]'`); without it a one-line note says so and only the JSON is written.
Bad input (flags, a checkpoint that is not an intact training export of its mode) gives one line
`error: ...` and exit code 2 before any evaluation. JAX's GPU memory pool takes 97% of the memory unless a
pool setting is given (`environment.use_most_device_memory`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from absl import app, flags, logging

from omnimem_jax import cli, io

if TYPE_CHECKING:
  from omnimem_kernels.backends import Backends

_CHECKPOINTS = flags.DEFINE_list("checkpoints", None, "mode:path pairs of exported wan_dit checkpoints.")
_NUM_VIDEOS = flags.DEFINE_integer("num_videos", 4, "Held-out worlds per mode.")
_NUM_CHUNKS = flags.DEFINE_integer("num_chunks", 24, "Chunks per video (3 orbits of the default world).")
_PREFIX = flags.DEFINE_integer("prefix_chunks", None, "Ground-truth chunks before generation (default: one orbit).")
_RECALL_CHUNKS = flags.DEFINE_integer("recall_chunks", 12, "Chunks of the teacher-forcing clip for recall.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed; world seeds are 10**9 + video index.")
_BACKENDS = flags.DEFINE_string("backends", "selection=xla",
                                "Backends of the rollout's attention ops, e.g. 'selection=triton,dense=xla' "
                                "(unset ops: per-platform defaults).")
_CODEC = flags.DEFINE_string("codec", None, "The codec checkpoints trained with train.py --codec were trained on "
                             "(default: the path their record names).")
_KV_FORMATS = flags.DEFINE_multi_enum("kv_formats", ["bf16"], ["bf16", "fp8", "int4"],
                                      "KV store formats to evaluate the omnimem checkpoint with.")
_OUTPUT = flags.DEFINE_string("output", "benchmarks/results/memory_bench.json", "JSON results.")
_PLOT = flags.DEFINE_string("plot", None, "PNG plot (default: --output with .png; 'none' to skip).")

MODES = ("omnimem", "window", "dense")
WORLD_SEED_BASE = 10**9  # training draws world seeds below 2**31 - 1 from its own generator; see report


def _parse_checkpoints() -> dict[str, Path]:
  """--checkpoints as {mode: path}, every path an intact training export of that mode (checked from its
  record and Orbax's metadata, before any weights load)."""
  from omnimem_jax import checkpoints  # noqa: PLC0415 (heavy imports after the flags are known to be good)
  from omnimem_jax.convert import wan_dit  # noqa: PLC0415
  from omnimem_jax.data import synthetic  # noqa: PLC0415

  if not _CHECKPOINTS.value:
    cli.fail("--checkpoints is required: mode:path pairs, e.g. omnimem:assets/demo_checkpoint")
  result = {}
  for item in _CHECKPOINTS.value:
    mode, sep, path = item.partition(":")
    if not sep or mode not in MODES:
      cli.fail(f"--checkpoints entry {item!r} must be mode:path with mode in {MODES}")
    if mode in result:
      cli.fail(f"--checkpoints lists {mode} twice ({result[mode]} and {path})")
    try:
      record = checkpoints.read_record(path, checkpoints.Kind.DIT)
      wan_dit.check_checkpoint(path)
      world = (record.training or {}).get("world")
      if not isinstance(world, dict):
        raise ValueError(f"{path} is not an export of experiments/train.py (its record has no training world "
                         "to draw held-out videos from)")
      synthetic.WorldConfig.from_dict(world)
      _codec_of(record)
    except (OSError, ValueError) as err:
      cli.fail(f"--checkpoints {mode}: {err}")
    if record.config["memory"]["mode"] != mode:
      cli.fail(f"--checkpoints {mode}: {path} holds a {record.config['memory']['mode']} model")
    result[mode] = Path(path)
  return result


def _codec_of(record: Any) -> Path | None:
  """The codec a checkpoint's training world was encoded with (--codec, else its record's path), checked
  to be a VAE checkpoint; None for a checkpoint trained on the latent-space world."""
  from omnimem_jax import checkpoints  # noqa: PLC0415

  recorded = (record.training or {}).get("codec")
  if recorded is None:
    return None
  path = Path(_CODEC.value or recorded)
  try:
    checkpoints.read_record(path, checkpoints.Kind.VAE)
  except (OSError, ValueError) as err:
    raise ValueError(f"it was trained on the world encoded by the codec {recorded}, and --codec={path} is not "
                     f"one ({err}); point --codec at that codec") from err
  return path


def _plot_path(output: Path) -> Path | None:
  """Where the plot goes (--plot, default beside the JSON), or None: with --plot=none, or without
  matplotlib (said in one line now, before the evaluation; the JSON is written all the same)."""
  if _PLOT.value == "none":
    return None
  try:
    import matplotlib  # noqa: F401, PLC0415 (optional: the `plot` extra)
  except ImportError:
    print("note: no plot: matplotlib is not installed (pip install 'omnimem-jax[plot]'); the JSON is written",
          file=sys.stderr)
    return None
  return Path(_PLOT.value or output.with_suffix(".png"))


def evaluate_mode(path: Path, mode: str, num_chunks: int, prefix: int, backends: Backends,
                  kv_format: str = "bf16", record_ids: bool = False) -> tuple[dict[str, Any], list[Any]]:
  """One checkpoint's scores (the JSON's entry for it), and with `record_ids` the selected block ids of
  each video's free run (`rollout.Retrieval.ids`)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from omnimem_jax import checkpoints, evaluation, training as train  # noqa: PLC0415
  from omnimem_jax.config import ModelConfig, SamplerConfig  # noqa: PLC0415
  from omnimem_jax.convert import wan_dit, wan_vae  # noqa: PLC0415
  from omnimem_jax.data import synthetic  # noqa: PLC0415
  from omnimem_jax.rollout import Rollout  # noqa: PLC0415
  from omnimem_jax.training import codec  # noqa: PLC0415

  record = checkpoints.read_record(path, checkpoints.Kind.DIT)
  config = ModelConfig.from_dict(record.config)
  world = synthetic.WorldConfig(**record.training["world"])
  codec_path = _codec_of(record)
  vae = None if codec_path is None else wan_vae.restore_vae(codec_path)
  memory = dataclasses.replace(config.memory, capacity_chunks=num_chunks)
  model = wan_dit.restore_model(path, memory=memory, dtype=jnp.float32)
  frames_per_chunk = memory.frames_per_chunk
  frames = num_chunks * frames_per_chunk
  source = synthetic.revisit_schedule(world, frames)
  window_frames = memory.recent_chunks * frames_per_chunk
  rollout = Rollout(model, SamplerConfig(), store_dtype=jnp.float32, backends=backends, kv_format=kv_format,
                    record_ids=record_ids)
  forward = jax.jit(train.teacher_forcing_forward, static_argnames=("select_own_noisy_chunk", "with_recall"))
  prefix_scores, free_scores, recalls, timings, ids = [], [], [], [], []
  for video_index in range(_NUM_VIDEOS.value):
    world_seed = WORLD_SEED_BASE + video_index
    truth = (synthetic.video(world, world_seed, frames) if vae is None  # [C, F, H, W]
             else codec.encode_worlds(vae, world, np.array([world_seed]), frames)[0])
    data_range = float(truth.max() - truth.min())
    text = jax.random.normal(jax.random.key(world_seed), (1, config.text_len, config.text_dim))
    cross = rollout.cross_kv(text)
    seed = _SEED.value + video_index
    start = time.perf_counter()
    # Prefix: ground-truth first orbit in the store, then generation.
    state = rollout.init_state(seed, recache_chunks=0)
    state = rollout.write_context(state, cross, truth[None, :, :prefix * frames_per_chunk])
    _, latents, _ = rollout.generate(state, cross, num_chunks - prefix)
    generated = np.concatenate([truth[:, :prefix * frames_per_chunk], np.asarray(latents[0])], axis=1)
    prefix_scores.append(evaluation.revisit_scores(generated, truth, source,
                                                   np.arange(prefix * frames_per_chunk, frames), data_range))
    # Free run: the whole video from noise.
    free, picks = rollout.run([(0, cross)], num_chunks, seed=seed)
    free = np.asarray(free[0])
    if record_ids:
      ids.append(picks.ids)
    free_scores.append(evaluation.revisit_scores(free, free, source, np.arange(frames),
                                                 float(free.max() - free.min())))
    timings.append(time.perf_counter() - start)
    if mode == "omnimem":
      clip = _RECALL_CHUNKS.value
      batch = {"latents": jnp.asarray(truth[None, :, :clip * frames_per_chunk]),
               "noise": jax.random.normal(jax.random.key(video_index), (1, *truth[:, :clip * frames_per_chunk].shape)),
               "sigma": jnp.full((1, clip), 0.625, jnp.float32), "text": text}
      noisy, timesteps, _ = train.noised(batch, frames_per_chunk)
      _, stats = forward(model, batch["latents"], noisy, timesteps, text, select_own_noisy_chunk=False,
                         with_recall=True)
      recalls.append(np.asarray(stats["recall"]))
  result = {
      "checkpoint": str(path), "codec": None if codec_path is None else str(codec_path),
      "config": config.to_dict(), "world": dataclasses.asdict(world),
      "training_steps": record.training.get("steps"), "training_seconds": record.training.get("train_seconds"),
      "kv_format": kv_format, "window_frames": window_frames, "seconds_per_video": float(np.mean(timings)),
      "backends": rollout.backends_used,
      "prefix": evaluation.summarise(prefix_scores, min_distance=window_frames + 1),
      "free": evaluation.summarise(free_scores, min_distance=window_frames + 1),
  }
  if recalls:
    masks = train.chunk_masks(memory, _RECALL_CHUNKS.value, select_own_noisy_chunk=False)
    result["retrieval_recall"] = {
        "per_layer": np.mean(recalls, axis=0).tolist(), "mean": float(np.mean(recalls)),
        "chance": evaluation.chance_recall(masks.candidates, _RECALL_CHUNKS.value, memory.exclude_window_chunks,
                                           config.blocks_per_chunk, memory.top_k),
        "clip_chunks": _RECALL_CHUNKS.value, "noisy_sigma": 0.625}
  return result, ids


def plot(results: dict[str, Any], path: Path) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for mode, result in results["modes"].items():
    for ax, protocol in zip(axes, ("prefix", "free"), strict=True):
      by = result[protocol]["by_distance"]
      distances = [int(d) for d in by]
      ax.plot(distances, [by[str(d)]["psnr_db"] for d in distances], marker="o", label=mode)
  for ax, protocol in zip(axes, ("prefix", "free"), strict=True):
    window = next(iter(results["modes"].values()))["window_frames"]
    ax.axvline(window, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("revisit distance (latent frames since first appearance)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title({"prefix": "ground-truth first orbit, then generated", "free": "generated from noise"}[protocol])
    ax.legend()
  fig.suptitle(f"Revisit consistency ({results['device']}, jax {results['jax']}); dashed: sliding window")
  fig.tight_layout()
  with io.atomic_file(path) as partial:
    fig.savefig(partial, dpi=110, format="png")


def _shown(value: float | None, unit: str = "") -> str:
  """A score for the progress line; 'none' where the run measured none (no revisit beyond the window)."""
  return "none" if value is None else f"{value:.3f}{unit}"


def evaluate_all(checkpoints: dict[str, Path], prefix: int, backends: Backends) -> dict[str, dict[str, Any]]:
  """Every checkpoint's scores, the omnimem one once per --kv_formats (bf16 first: the compact formats'
  picks are compared with its picks), each printed in one line as it completes."""
  import numpy as np  # noqa: PLC0415

  from omnimem_jax import checkpoints as ckpt, evaluation  # noqa: PLC0415

  formats = sorted(set(_KV_FORMATS.value), key=["bf16", "fp8", "int4"].index)  # bf16 first: the picks' reference
  compare = "bf16" in formats and len(formats) > 1
  runs = [(mode, path, fmt) for mode, path in checkpoints.items() for fmt in (formats if mode == "omnimem" else ["bf16"])]
  reference_ids, modes = None, {}
  for mode, path, kv_format in runs:
    start = time.perf_counter()
    name = mode if kv_format == "bf16" else f"{mode}_{kv_format}"
    try:
      r, ids = evaluate_mode(path, mode, _NUM_CHUNKS.value, prefix, backends, kv_format,
                             record_ids=compare and mode == "omnimem")
    except ckpt.CheckpointError as err:  # weights damaged past what the metadata shows
      cli.fail(f"--checkpoints {mode}: {err}")
    if ids and kv_format == "bf16":
      reference_ids = ids
    elif ids:
      r["picks_unchanged"] = evaluation.picks_unchanged(np.concatenate(reference_ids, axis=3),
                                                        np.concatenate(ids, axis=3))  # videos as batch
      r["picks_unchanged"]["against"] = "omnimem (bf16 store), free runs of the same seeds"
    modes[name] = r
    unchanged = r.get("picks_unchanged", {}).get("fraction_unchanged")
    print(f"{name:12s} prefix PSNR beyond window {_shown(r['prefix']['psnr_db'], ' dB')} SSIM "
          f"{_shown(r['prefix']['ssim'])} | free {_shown(r['free']['psnr_db'], ' dB')} | recall "
          f"{_shown(r.get('retrieval_recall', {}).get('mean'))}"
          + ("" if unchanged is None else f" | picks unchanged {unchanged:.3f}")
          + f" | {time.perf_counter() - start:.0f} s", flush=True)
  return modes


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  for flag in (_NUM_VIDEOS, _NUM_CHUNKS, _RECALL_CHUNKS):
    if flag.value < 1:
      cli.fail(f"--{flag.name} must be >= 1, got {flag.value}")
  output = Path(_OUTPUT.value)
  if output.suffix != ".json":
    cli.fail(f"--output={output} must end in .json")
  logging.set_verbosity(logging.WARNING)
  from omnimem_jax import environment  # noqa: PLC0415 (imports JAX: only once the flags are good)

  environment.use_most_device_memory()  # before JAX starts its backends (the checkpoint checks do)
  checkpoints = _parse_checkpoints()
  plot_path = _plot_path(output)
  for path in (output, plot_path):
    if path is not None:
      try:
        io.check_writable(path)
      except OSError as err:
        cli.fail(err)
  import jax  # noqa: PLC0415

  from omnimem_jax import checkpoints as ckpt  # noqa: PLC0415
  from omnimem_jax.data import synthetic  # noqa: PLC0415
  from omnimem_kernels.backends import Backends  # noqa: PLC0415

  try:
    backends = Backends.parse(_BACKENDS.value)
  except ValueError as err:
    cli.fail(f"--backends: {err}")

  worlds = {mode: ckpt.read_record(path, ckpt.Kind.DIT).training["world"] for mode, path in checkpoints.items()}
  period_chunks = synthetic.WorldConfig.from_dict(next(iter(worlds.values()))).period_chunks
  prefix = int(period_chunks) if _PREFIX.value is None else _PREFIX.value
  if not 1 <= prefix < _NUM_CHUNKS.value:
    cli.fail(f"--prefix_chunks={prefix} must lie in [1, --num_chunks={_NUM_CHUNKS.value})")
  results = {"device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform,
             "jax": jax.__version__, "num_videos": _NUM_VIDEOS.value, "num_chunks": _NUM_CHUNKS.value,
             "prefix_chunks": prefix, "world_seeds": f"{WORLD_SEED_BASE} + video index",
             "psnr": "10 log10(range^2 / MSE) on latents, range = max - min of the reference video"}
  results["modes"] = evaluate_all(checkpoints, prefix, backends)
  modes = results["modes"]
  if {"omnimem", "window", "dense"} <= set(modes):
    o, w, d = (modes[m]["prefix"]["psnr_db"] for m in ("omnimem", "window", "dense"))
    results["goal"] = {"omnimem_minus_dense_db": o - d, "omnimem_minus_window_db": o - w,
                       "met": bool(o >= d - 1.0 and o >= w + 3.0),
                       "rule": "prefix protocol, revisit distance beyond the window: omnimem at most 1 dB below dense "
                               "and >= 3 dB above window"}
    print(json.dumps(results["goal"]))
  io.write_json(output, results)
  if plot_path is not None:
    plot(results, plot_path)
  print(f"wrote {output}" + (f" and {plot_path}" if plot_path else ""))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
