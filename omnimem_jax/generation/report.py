"""What a generation run tells: the lines it prints first and last, one progress line per chunk, and
the JSON run report (inputs, config, video, timing, memory, kernel backends asked for and run,
retrieval statistics, versions, device)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from omnimem_jax import environment
from omnimem_jax.config import store_bytes
from omnimem_jax.generation.options import DEFAULT_PRESET
from omnimem_jax.generation.plan import Plan, architecture, video_frames_of_chunks


@dataclasses.dataclass(frozen=True)
class RunFacts:
  """What a run measured and used, gathered by `run.run` for the report."""

  dtype: str  # compute and KV-store dtype
  sampler: dict[str, Any]  # the SamplerConfig's fields
  latent_frames: int
  pixels: str  # "vae" or "latent_visualisation"
  chunk_seconds: list[float]  # DiT seconds per chunk (chunk 0 includes compilation)
  compilations: int
  decode_seconds: float  # decoding and writing
  total_seconds: float  # end to end
  chunks_in_memory: int  # chunks the KV store holds at the end
  peak_device_bytes: int | None
  histograms: np.ndarray | None  # [chunks, layers, bins] retrieval histograms, or None
  backends_used: dict[str, list[str]]  # op -> kernel backends that ran


def retrieval_summary(histograms: np.ndarray, window_chunks: int) -> dict[str, Any]:
  """Per-layer statistics of `SegmentOutput.retrieval` stacked over chunks ([chunks, layers, bins]):
  selected blocks by how many chunks back they lie (summed over chunks; the last bin holds everything
  at least that far), and the fraction at or beyond `window_chunks` (outside the sliding window)."""
  per_layer = np.asarray(histograms, np.int64).sum(axis=0)  # [layers, bins]
  layers = []
  for index, counts in enumerate(per_layer):
    total = int(counts.sum())
    outside = int(counts[window_chunks:].sum())
    layers.append({"layer": index, "histogram": counts.tolist(), "selected": total,
                   "fraction_outside_window": outside / total if total else None})
  total, outside = int(per_layer.sum()), int(per_layer[:, window_chunks:].sum())
  return {"window_chunks": window_chunks, "bins": "chunks back (0 = current chunk; last bin: that many or more)",
          "fraction_outside_window": outside / total if total else None, "per_layer": layers}


# ---- lines -----------------------------------------------------------------------------------------


def opening_lines(plan: Plan, dtype: str) -> list[str]:
  """The plan's notes, then what is generated on which device."""
  config = plan.config
  return [*plan.notes, f"generating {plan.num_chunks} chunks = {plan.frames} frames ({plan.frames / config.fps:.2f} s "
                       f"at {config.fps} fps), {config.memory.mode} attention, {dtype} on {environment.device()['device']}"]


def eta_seconds(wall: list[float], num_chunks: int) -> float | None:
  """Estimated seconds left after len(wall) chunks, from the chunks after chunk 0 (which also compiles);
  None while only chunk 0 is done and more remain."""
  remaining = num_chunks - len(wall)
  if len(wall) > 1:
    return remaining * float(np.mean(wall[1:]))
  return None if remaining else 0.0


def format_progress(chunk: int, num_chunks: int, seconds: float, frames: int, eta: float | None) -> str:
  """One progress line: chunk i/N, DiT milliseconds, video frames per DiT second, estimated time left."""
  counter = f"{chunk + 1}/{num_chunks}".rjust(2 * len(str(num_chunks)) + 1)
  remaining = "?" if eta is None else f"{eta:.1f} s"
  return f"chunk {counter}  {seconds * 1e3:9.1f} ms  {frames / seconds:8.1f} FPS  ETA {remaining}"


def closing_line(plan: Plan, record: dict[str, Any]) -> str:
  """What was written, and how fast."""
  timing = record["timing"]
  steady = timing["dit_fps_after_first_chunk"]
  return (f"{'SMOKE RUN (random weights): ' if plan.smoke else ''}wrote {plan.output} ({plan.frames} frames, "
          f"{plan.width}x{plan.height}) and {plan.report}; DiT {timing['dit_seconds']:.2f} s = "
          f"{timing['dit_fps']:.1f} FPS" + (f" ({steady:.1f} FPS after chunk 0, which compiles)" if steady else "")
          + f"; end to end {timing['end_to_end_seconds']:.1f} s; {record['memory']['chunks_dropped']} chunks "
          "dropped from memory")


# ---- the JSON report -------------------------------------------------------------------------------


def _inputs(plan: Plan) -> dict[str, Any]:
  options = plan.options
  return {
      "checkpoint": None if plan.checkpoint is None else str(plan.checkpoint),
      "preset": None if plan.checkpoint is not None else options.preset or DEFAULT_PRESET,
      "vae": None if plan.vae is None else str(plan.vae),
      "text_encoder": None if plan.text_encoder is None else str(plan.text_encoder),
      "tokenizer": None if plan.tokenizer is None else str(plan.tokenizer),
      "conditioning": plan.conditioning,
      "text_embeddings": options.text_embeddings,
      "prompts": [dataclasses.asdict(prompt) for prompt in plan.prompts],
      "recache_chunks": plan.recache_chunks,
      "seed": options.seed,
  }


def _timing(plan: Plan, facts: RunFacts) -> dict[str, Any]:
  chunk_seconds = facts.chunk_seconds
  dit_seconds = sum(chunk_seconds)
  steady_fps = ((plan.frames - video_frames_of_chunks(1, plan.config)) / sum(chunk_seconds[1:])
                if len(chunk_seconds) > 1 else None)
  return {
      "chunk_seconds": chunk_seconds,
      "note": "DiT seconds per chunk (Rollout.timings); chunk 0 includes compilation, a prompt switch its KV recache",
      "dit_seconds": dit_seconds,
      "dit_fps": plan.frames / dit_seconds,
      "dit_fps_after_first_chunk": steady_fps,
      "decode_and_write_seconds": facts.decode_seconds,
      "end_to_end_seconds": facts.total_seconds,
      "end_to_end_fps": plan.frames / facts.total_seconds,
      "compilations": facts.compilations,
  }


def backends_section(plan: Plan, used: dict[str, list[str]]) -> dict[str, Any]:
  """The kernel backends: as asked (`--backends`), each op's preference list on this platform, and
  the backends that actually ran (recorded while the rollout traced)."""
  return {"requested": plan.backends.to_dict(), "preferences": plan.backends.preferences(), "used": used}


def build_report(plan: Plan, facts: RunFacts) -> dict[str, Any]:
  """The JSON run report of a finished run."""
  config = plan.config
  itemsize = jnp.dtype(facts.dtype).itemsize
  return {
      "smoke": plan.smoke,
      "notes": list(plan.notes),
      "output": str(plan.output),
      "latents": None if plan.latents is None else str(plan.latents),
      "inputs": _inputs(plan),
      "config": {"model": architecture(config), "memory": dataclasses.asdict(config.memory), "sampler": facts.sampler,
                 "dtype": facts.dtype, "batch_size": plan.batch_size, "mesh": plan.mesh},
      "video": {"chunks": plan.num_chunks, "latent_frames": facts.latent_frames, "frames": plan.frames,
                "requested_frames": plan.requested_frames, "seconds": plan.frames / config.fps, "fps": config.fps,
                "height": plan.height, "width": plan.width, "pixels": facts.pixels},
      "timing": _timing(plan, facts),
      "memory": {"capacity_chunks": config.memory.capacity_chunks, "chunks_in_memory": facts.chunks_in_memory,
                 "chunks_dropped": plan.num_chunks - facts.chunks_in_memory,
                 "store_bytes": store_bytes(config, plan.batch_size, itemsize),
                 "peak_device_bytes": facts.peak_device_bytes},
      "backends": backends_section(plan, facts.backends_used),
      "retrieval": (None if facts.histograms is None else
                    retrieval_summary(facts.histograms, config.memory.window_chunks)),
      "versions": environment.versions(),
      "device": environment.device(),
  }
