r"""End-to-end rollout benchmark at the real 1.3B shape: per-chunk DiT latency vs video length.

Random bf16 weights (speed does not depend on their values), batch 1, the streaming driver (one
chunk per compiled segment: 4 denoising calls + the context pass). Memory per mode: omnimem and
dense keep the full history (capacity = chunks); window / sink_window keep only what they read
(pinned + recent chunks), as Self-Forcing and LongLive do. Run one mode per process so the device's
peak memory is per mode, then merge and plot:

  for mode in omnimem window sink_window dense; do
    python experiments/bench_rollout.py --mode=$mode --chunks=80 --output=rollout_$mode.json
  done
  python experiments/bench_rollout.py --merge=rollout_omnimem.json,rollout_window.json,... \
      --output=benchmarks/results/rollout_h200_bf16.json --plot=benchmarks/results/rollout_h200_bf16.png

`--kv_format=fp8|int4` keeps omnimem's full-resolution K/V compact (`memory.store`; default bf16).
`--mesh=data=1,model=1` times the sharded code path (store and weights laid out on a mesh, attention
under `shard_map`), to compare with the default single-device path on one GPU. `--backends` chooses
each attention op's backend (`Rollout(..., backends=...)`); the JSON records what was asked for and
what ran, beside the device, versions, commit and flags (`omnimem_jax.benchmarking.write_report`).
JAX's GPU memory pool takes 97% of the memory unless a pool setting is given
(`environment.use_most_device_memory`). Before the run, the memory plan of `generate.py` for the same
rollout (`omnimem_jax.budget`) is printed and recorded beside the measured peak; a plan that does not
fit is recorded, not refused (the run shows what happens).

  python experiments/bench_rollout.py --preset=tiny --chunks=3 --output=/tmp/rollout.json   # smoke run
"""

import dataclasses
import json
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from omnimem_kernels import dispatch
from omnimem_kernels.backends import Backends
from omnimem_jax import benchmarking, budget, environment, io, sharding
from omnimem_jax.config import ATTENTION_MODES, ModelConfig, SamplerConfig
from omnimem_jax.model.wan import CausalWanModel
from omnimem_jax.rollout import Rollout

_MODE = flags.DEFINE_enum("mode", "omnimem", ATTENTION_MODES, "Attention mode to time.")
_CHUNKS = flags.DEFINE_integer("chunks", 80, "Chunks to generate (80 = 60 s of video).")
_PRESET = flags.DEFINE_string("preset", "wan2.1-t2v-1.3b", "Model preset.")
_BACKENDS = flags.DEFINE_string("backends", "", "Backend per attention op, e.g. 'selection=triton,dense=mosaic_gpu' "
                                "(omnimem_kernels.backends.Backends.parse; default: per platform).")
_MESH = flags.DEFINE_string("mesh", None, "Run the sharded path on this mesh, e.g. 'data=1,model=1' (default: the "
                            "unsharded single-device path).")
_KV_FORMAT = flags.DEFINE_enum("kv_format", "bf16", ["bf16", "fp8", "int4"], "Full-resolution K/V format of the "
                               "store (compact: omnimem mode).")
_MERGE = flags.DEFINE_list("merge", None, "Merge these per-mode JSON files (instead of running).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON output path.", required=True)
_PLOT = flags.DEFINE_string("plot", None, "With --merge: PNG of latency and memory vs video length.")


def video_frames(chunks: int, frames_per_chunk: int = 3, temporal_stride: int = 4) -> int:
  """Decoded frames of the first `chunks` chunks (chunk 0 gives 9, each later one 12)."""
  return (chunks * frames_per_chunk - 1) * temporal_stride + 1


def bench_config(mode: str, chunks: int) -> ModelConfig:
  """The preset in `mode`: full history (capacity = chunks), or for window / sink_window only the
  chunks they read (pinned + recent)."""
  base = ModelConfig.from_preset(_PRESET.value)
  memory = dataclasses.replace(base.memory, mode=mode, capacity_chunks=max(chunks, base.memory.capacity_chunks))
  capacity = memory.min_capacity_chunks if mode in ("window", "sink_window") else chunks
  return dataclasses.replace(base, memory=dataclasses.replace(memory, capacity_chunks=capacity))


def memory_plan(config: ModelConfig, backends: Backends) -> budget.MemoryPlan:
  """The plan `generate.py` would make for this rollout (bf16 weights and store, one prompt, the stream's
  default 7 recache chunks, no VAE), printed."""
  mesh = None if _MESH.value is None else sharding.parse_mesh(_MESH.value)
  run = budget.RunShape(dits=(budget.DiT(config, "bfloat16", kv_format=_KV_FORMAT.value),), batch_size=1,
                        dtype="bfloat16", mesh=None if mesh is None else (mesh["data"], mesh["model"]),
                        backends=backends)
  plan = budget.plan_memory(run, budget.device_capacity(run.devices))
  print(plan.table(), flush=True)
  return plan


def run_mode(mode: str, chunks: int, backends: Backends) -> dict:
  config = bench_config(mode, chunks)
  plan = memory_plan(config, backends)
  model = CausalWanModel(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  text = np.random.default_rng(0).standard_normal((1, config.text_len, config.text_dim)).astype(jnp.bfloat16)
  mesh = None if _MESH.value is None else sharding.make_mesh(**sharding.parse_mesh(_MESH.value), config=config)
  rollout = Rollout(model, SamplerConfig(), backends=backends, mesh=mesh, kv_format=_KV_FORMAT.value)
  cross = rollout.cross_kv(text)
  start = time.perf_counter()
  latencies, error = [], None
  with dispatch.recording() as ran:  # the ops' backends are chosen while the first chunk traces
    try:
      for segment in rollout.stream([(0, cross)], num_chunks=chunks, seed=0):
        latencies.append(segment.seconds)
        print(f"{mode} chunk {segment.first_chunk}: {1e3 * segment.seconds:.1f} ms", flush=True)
    except jax.errors.JaxRuntimeError as err:  # e.g. out of device memory
      error = str(err).splitlines()[0][:300]
  total = time.perf_counter() - start
  stats = jax.devices()[0].memory_stats() or {}
  done = len(latencies)
  steady = latencies[1:]  # chunk 0 includes compilation
  return {
      "mode": mode, "kv_format": _KV_FORMAT.value, "backends": backends.to_dict(), "backends_ran": benchmarking.backends_ran(ran), "mesh": _MESH.value,
      "chunks_requested": chunks, "chunks_done": done, "error": error,
      "capacity_chunks": config.memory.capacity_chunks, "traces": rollout.traces,
      "chunk_seconds": latencies, "first_chunk_seconds_incl_compile": latencies[0] if latencies else None,
      "steady_mean_chunk_seconds": float(np.mean(steady)) if steady else None,
      "last_chunk_seconds": latencies[-1] if latencies else None,
      # DiT throughput: decoded frames over DiT time, chunk 0 (compilation) excluded
      "dit_fps": (video_frames(done) - video_frames(1)) / sum(steady) if steady else None,
      "wall_seconds": total, "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
      "bytes_limit": stats.get("bytes_limit"), "plan": plan.to_dict(),
  }


def label(result: dict) -> str:
  """The mode, tagged with the backends asked for and the mesh where they differ from the defaults."""
  tags = [f"{op}={value}" for op, value in result["backends"].items() if value is not None]
  tags += [result["kv_format"]] if result.get("kv_format", "bf16") != "bf16" else []
  tags += [f"mesh {result['mesh']}"] if result["mesh"] else []
  return f"{result['mode']}[{', '.join(tags)}]" if tags else result["mode"]


def merge(paths: Sequence[str], output: str, plot: str | None) -> None:
  """One JSON (and optionally a PNG) of per-mode runs, each result with its run's commit and flags."""
  runs = []
  for path in paths:
    with open(path) as file:
      runs.append(json.load(file))
  report = {key: runs[0][key] for key in ("device", "platform", "versions", "preset", "dtype", "batch")}
  report["results"] = [{**run["result"], "git": run["git"], "flags": run["flags"]} for run in runs]

  by_mode = {f"{label(r)}@{r['chunks_done']}": r for r in report["results"] if r["steady_mean_chunk_seconds"]}
  window = next((r["steady_mean_chunk_seconds"] for name, r in by_mode.items() if name.startswith("window@")), None)
  if window:  # mean DiT seconds per chunk over each completed run, relative to window mode's
    report["ratio_to_window"] = {name: r["steady_mean_chunk_seconds"] / window for name, r in by_mode.items()}
  io.write_json(output, report)
  print(f"wrote {output}")
  if plot:
    import matplotlib  # noqa: PLC0415 (plotting only)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, (latency, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for result in (r for r in report["results"] if r["chunks_done"] > 1):  # failed runs are in the JSON only
      seconds = np.arange(1, result["chunks_done"]) * 0.75
      latency.plot(seconds, result["chunk_seconds"][1:], label=label(result))
      memory.bar(f"{label(result)}\n{result['chunks_done']} chunks", result["peak_bytes_in_use"] / 2**30)
    latency.set(xlabel="video length (s)", ylabel="DiT seconds per chunk (5 calls)", title=report["device"])
    latency.legend()
    memory.set(ylabel="peak device memory (GiB)", title="peak memory of each completed run")
    figure.tight_layout()
    with io.atomic_file(plot) as partial:
      figure.savefig(partial, dpi=120, format="png")
    print(f"wrote {plot}")


def main(argv: Sequence[str]) -> None:
  del argv
  environment.use_most_device_memory()  # before JAX starts its backends
  if _MERGE.value:
    merge(_MERGE.value, _OUTPUT.value, _PLOT.value)
    return
  backends = Backends.parse(_BACKENDS.value)
  result = run_mode(_MODE.value, _CHUNKS.value, backends)
  benchmarking.write_report(_OUTPUT.value, {"preset": _PRESET.value, "dtype": "bfloat16", "batch": 1,
                                            "result": result}, backends=backends)
  print(json.dumps({k: v for k, v in result.items() if k != "chunk_seconds"}))


if __name__ == "__main__":
  app.run(main)
