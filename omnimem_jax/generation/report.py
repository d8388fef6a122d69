"""What a generation run tells: the lines it prints first and last, one progress line per chunk, and
the JSON run report (inputs, config, video, timing, memory, kernel backends asked for and run,
retrieval statistics, versions, device). Speeds lead with end-to-end frames per second (DiT, decoding
and writing); the DiT's own figures follow, labelled as such. Paths appear as the user gave them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from omnimem_jax import environment, evaluation
from omnimem_jax.data import synthetic
from omnimem_jax.generation.options import DEFAULT_PRESET
from omnimem_jax.generation.plan import Plan, architecture, video_frames_of_chunks

REPOSITORY = Path(__file__).resolve().parents[2]  # paths inside it are reported relative to it


@dataclasses.dataclass(frozen=True)
class RunFacts:
  """What a run measured and used, gathered by `run.run` for the report."""

  dtype: str  # compute and KV-store dtype
  sampler: dict[str, Any]  # the SamplerConfig's fields
  latent_frames: int
  pixels: str  # "vae" or "latent_visualisation"
  chunk_seconds: list[float]  # per chunk, end to end: DiT, decoding and writing (chunk 0 compiles)
  dit_chunk_seconds: list[float]  # per chunk, the DiT alone (Rollout.timings)
  compilations: int
  total_seconds: float  # end to end: loading, compilation, every chunk
  chunks_in_memory: int  # chunks the KV store holds at the end
  peak_device_bytes: int | None
  histograms: np.ndarray | None  # [chunks, layers, bins] retrieval histograms, or None
  backends_used: dict[str, list[str]]  # op -> kernel backends that ran
  notes: list[str]  # what the library warned during the run (`run.warnings_as_notes`)


def _distances(counts: np.ndarray) -> dict[str, Any]:
  """Picks by distance (`counts[d]`: blocks d chunks back): their number, histogram, mean and median
  (the smallest distance with at least half the picks at or below it); None where nothing was picked."""
  total = int(counts.sum())
  median = int(np.searchsorted(np.cumsum(counts), total / 2)) if total else None
  mean = float(np.arange(len(counts)) @ counts / total) if total else None
  return {"selected": total, "histogram": counts.tolist(), "mean_distance": mean, "median_distance": median}


def retrieval_summary(histograms: np.ndarray) -> dict[str, Any]:
  """How far back the blocks the selection picked lie, in chunks, from `SegmentOutput.retrieval.histograms`
  stacked over the run's chunks ([chunks, layers, bins]; bin d counts picks d chunks back).

  The bins reach capacity_chunks, and a store of capacity_chunks slots holds nothing farther back than
  capacity_chunks - 1, so every distance of the run has its own bin. Returns a dict of named figures:
  the whole run's (`selected`, `histogram`, `mean_distance`, `median_distance`) and the same per layer
  (`per_layer`); a further figure is one more key.
  """
  per_layer = np.asarray(histograms, np.int64).sum(axis=0)  # [layers, bins]
  return {"bins": "chunks back from the selecting chunk (0 = the current chunk)", **_distances(per_layer.sum(axis=0)),
          "per_layer": [{"layer": index, **_distances(counts)} for index, counts in enumerate(per_layer)]}


def retrieval_section(plan: Plan, histograms: np.ndarray) -> dict[str, Any]:
  """`retrieval_summary`, and where the plan knows its world's revisits (a checkpoint trained on the
  synthetic world), `earlier_visit`: the share of picks beyond the sliding window that come from an
  earlier visit of the place in view, against chance (`evaluation.revisit_picks`; None if the video
  never comes back to a place beyond the window)."""
  summary = retrieval_summary(histograms)
  if plan.world is not None:
    visits = synthetic.earlier_visits(plan.world, plan.num_chunks)
    summary["earlier_visit"] = evaluation.revisit_picks(histograms, visits, plan.config.memory.window_chunks)
  return summary


# ---- lines -----------------------------------------------------------------------------------------


def opening_lines(plan: Plan) -> list[str]:
  """The plan's notes, its memory plan (what the run holds on each device), then what is generated on which
  device."""
  config, device = plan.config, environment.device()["device"]
  memory = plan.memory.table().splitlines() if plan.memory is not None else []
  return [*plan.notes, *memory,
          f"generating {plan.num_chunks} chunks = {plan.frames} frames ({plan.frames / config.fps:.2f} s at "
          f"{config.fps} fps), {config.memory.mode} attention, {plan.dtype} on {device}"]


def eta_seconds(wall: list[float], num_chunks: int) -> float | None:
  """Estimated seconds left after len(wall) chunks, from the chunks after chunk 0 (which also compiles);
  None while only chunk 0 is done and more remain."""
  remaining = num_chunks - len(wall)
  if len(wall) > 1:
    return remaining * float(np.mean(wall[1:]))
  return None if remaining else 0.0


def format_progress(chunk: int, num_chunks: int, frames: int, seconds: float, dit_seconds: float,
                    eta: float | None) -> str:
  """One progress line: chunk i/N, its video frames per second end to end (over `seconds`: DiT,
  decoding and writing), its wall and DiT milliseconds, estimated time left."""
  counter = f"{chunk + 1}/{num_chunks}".rjust(2 * len(str(num_chunks)) + 1)
  remaining = "?" if eta is None else f"{eta:.1f} s"
  return (f"chunk {counter}  {frames / seconds:8.1f} FPS end to end  {seconds * 1e3:9.1f} ms  "
          f"(DiT {dit_seconds * 1e3:.1f} ms)  ETA {remaining}")


def closing_lines(plans: tuple[Plan, ...], records: list[dict[str, Any]], size: tuple[int, int]) -> list[str]:
  """What was written (an mp4 of `size` = (height, width)), and how fast: end to end first, then each
  model's DiT alone, its chunks dropped from memory and, where its world's revisits are known, how often
  retrieval picked the earlier visit. One line for one model; a line per model for a comparison."""
  first, timing = plans[0], records[0]["timing"]
  steady = timing["fps_after_first_chunk"]
  compared = f", {len(plans)} models side by side" if len(plans) > 1 else ""
  head = (f"{'SMOKE RUN (random weights): ' if first.smoke else ''}wrote {first.output} ({first.frames} frames, "
          f"{size[1]}x{size[0]}{compared}) and {first.report}: {timing['end_to_end_fps']:.1f} FPS end to end "
          f"({timing['end_to_end_seconds']:.1f} s with loading and compilation"
          + (f"; {steady:.1f} FPS after chunk 0" if steady else "") + ")")
  models = [_model_line(record) for record in records]
  if len(plans) == 1:
    return [f"{head}; {models[0]}"]
  return [head, *(f"{plan.config.memory.mode}: {line}" for plan, line in zip(plans, models, strict=True))]


def _model_line(record: dict[str, Any]) -> str:
  revisit = (record["retrieval"] or {}).get("earlier_visit")
  return (f"the DiT alone {record['timing']['dit_fps']:.1f} FPS; {record['memory']['chunks_dropped']} chunks dropped "
          "from memory" + ("" if revisit is None else
                           f"; {100 * revisit['fraction_from_earlier_visit']:.0f}% of the blocks retrieved beyond the "
                           f"window came from the earlier visit of the place in view (chance "
                           f"{100 * revisit['chance']:.0f}%)"))


# ---- the JSON report -------------------------------------------------------------------------------


def shown_path(path: Path | str | None) -> str | None:
  """A path as the report shows it: as given, but relative to the repository where an absolute path lies
  inside it (the demo checkpoint that experiments/generate.py fills in), so that no machine's checkout
  location lands in a report."""
  if path is None:
    return None
  path = Path(path)
  return str(path.relative_to(REPOSITORY)) if path.is_absolute() and path.is_relative_to(REPOSITORY) else str(path)


def _inputs(plan: Plan) -> dict[str, Any]:
  options = plan.options
  return {
      "checkpoint": shown_path(plan.checkpoint),
      "preset": None if plan.checkpoint is not None else options.preset or DEFAULT_PRESET,
      "vae": shown_path(plan.vae),
      "text_encoder": shown_path(plan.text_encoder),
      "tokenizer": shown_path(plan.tokenizer),
      "conditioning": plan.conditioning,
      "text_embeddings": shown_path(options.text_embeddings),
      "prompts": [dataclasses.asdict(prompt) for prompt in plan.prompts],
      "recache_chunks": plan.recache_chunks,
      "seed": options.seed,
  }


def _fps_after_first_chunk(plan: Plan, chunk_seconds: list[float]) -> float | None:
  """Video frames after chunk 0 (which compiles) per second of the later chunks; None for one chunk."""
  if len(chunk_seconds) < 2:
    return None
  return (plan.frames - video_frames_of_chunks(1, plan.config)) / sum(chunk_seconds[1:])


def _timing(plan: Plan, facts: RunFacts) -> dict[str, Any]:
  dit_seconds = sum(facts.dit_chunk_seconds)
  return {
      "end_to_end_fps": plan.frames / facts.total_seconds,
      "end_to_end_seconds": facts.total_seconds,
      "fps_after_first_chunk": _fps_after_first_chunk(plan, facts.chunk_seconds),
      "chunk_seconds": facts.chunk_seconds,
      "decode_and_write_seconds": sum(facts.chunk_seconds) - dit_seconds,
      "dit_fps": plan.frames / dit_seconds,
      "dit_fps_after_first_chunk": _fps_after_first_chunk(plan, facts.dit_chunk_seconds),
      "dit_seconds": dit_seconds,
      "dit_chunk_seconds": facts.dit_chunk_seconds,
      "compilations": facts.compilations,
      "note": "end_to_end: loading to the last frame written; chunk_seconds: each chunk's DiT, decoding and "
              "writing; dit_*: the DiT alone (Rollout.timings). Chunk 0 includes compilation, a prompt switch "
              "its KV recache",
  }


def backends_section(plan: Plan, used: dict[str, list[str]]) -> dict[str, Any]:
  """The kernel backends: as asked (`--backends`), each op's preference list on this platform, and
  the backends that actually ran (recorded while the rollout traced)."""
  return {"requested": plan.backends.to_dict(), "preferences": plan.backends.preferences(), "used": used}


def comparison_report(plans: tuple[Plan, ...], records: list[dict[str, Any]], size: tuple[int, int]
                      ) -> dict[str, Any]:
  """The JSON report of a side-by-side comparison (an mp4 of `size` = (height, width)): the models in
  panel order, then each model's own run report (`build_report`; end-to-end times cover all models)."""
  return {"comparison": [plan.config.memory.mode for plan in plans], "output": records[0]["output"],
          "video": {**records[0]["video"], "height": size[0], "width": size[1], "panels": len(plans)},
          "runs": records}


def build_report(plan: Plan, facts: RunFacts) -> dict[str, Any]:
  """The JSON run report of a finished run."""
  config = plan.config
  return {
      "smoke": plan.smoke,
      "notes": [*plan.notes, *facts.notes],
      "output": shown_path(plan.output),
      "latents": shown_path(plan.latents),
      "inputs": _inputs(plan),
      "config": {"model": architecture(config), "memory": dataclasses.asdict(config.memory), "sampler": facts.sampler,
                 "dtype": facts.dtype, "batch_size": plan.batch_size, "mesh": plan.mesh},
      "video": {"chunks": plan.num_chunks, "latent_frames": facts.latent_frames, "frames": plan.frames,
                "requested_frames": plan.requested_frames, "seconds": plan.frames / config.fps, "fps": config.fps,
                "height": plan.height, "width": plan.width, "pixels": facts.pixels},
      "timing": _timing(plan, facts),
      "memory": {"kv_format": plan.kv_format, "capacity_chunks": config.memory.capacity_chunks,
                 "pooled_chunks": config.memory.pooled_slots, "chunks_in_memory": facts.chunks_in_memory,
                 "chunks_dropped": plan.num_chunks - facts.chunks_in_memory,
                 "plan": None if plan.memory is None else plan.memory.to_dict(),
                 "peak_device_bytes": facts.peak_device_bytes},
      "backends": backends_section(plan, facts.backends_used),
      "retrieval": None if facts.histograms is None else retrieval_section(plan, facts.histograms),
      "versions": environment.versions(),
      "device": environment.device(),
  }
