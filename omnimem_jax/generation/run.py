"""Running a validated `Plan`: load the weights, encode the prompts, roll the DiT out chunk by chunk,
decode every chunk as it arrives (Wan VAE, or a latent visualisation), append it to the mp4, and write
the latents and the JSON run report. Every file goes through `omnimem_jax.io` / `omnimem_jax.video`
(a temporary name renamed into place). What the library warns during the run (untrained gates, a
truncated prompt) is printed as a note on stdout and kept in the report, like the plan's notes."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, UInt8

from omnimem_jax import environment, io, sharding
from omnimem_jax.config import SamplerConfig
from omnimem_jax.convert import umt5, wan_dit, wan_vae
from omnimem_jax.data import synthetic
from omnimem_jax.generation import panels, report
from omnimem_jax.generation import plan as planning
from omnimem_jax.generation.options import GenerateOptions
from omnimem_jax.generation.plan import Plan
from omnimem_jax.model import text
from omnimem_jax.model.vae import jit_decode_chunk, to_uint8
from omnimem_jax.model.wan import CausalWanModel, CrossKV
from omnimem_jax.rollout import Rollout
from omnimem_jax.video import Mp4Writer

LATENT_VIS_RANGE = 3.0  # latents (unit variance) are shown over [-3, 3] -> [0, 255]


# ---- pixels ----------------------------------------------------------------------------------------


def visualise_latents(latents: Float[np.ndarray, "b c f h w"], *, first: bool, spatial: int = 8, temporal: int = 4
                      ) -> UInt8[np.ndarray, "b t hs ws 3"]:
  """Latents [B, C, F, H, W] -> uint8 video [B, T, H*spatial, W*spatial, 3]: channels 0-2 over
  [-LATENT_VIS_RANGE, LATENT_VIS_RANGE], nearest-upsampled; the video's first latent frame gives one
  frame and every other `temporal` frames, as the VAE would."""
  channels = latents.shape[1]
  rgb = np.moveaxis(np.asarray(latents, np.float32)[:, [i % channels for i in range(3)]], 1, -1)  # [B, F, H, W, 3]
  pixels = np.round((np.clip(rgb / LATENT_VIS_RANGE, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
  repeats = [1 if first and index == 0 else temporal for index in range(rgb.shape[1])]
  return np.repeat(pixels, repeats, axis=1).repeat(spatial, axis=2).repeat(spatial, axis=3)


def tile_batch(video: UInt8[np.ndarray, "b t h w 3"]) -> UInt8[np.ndarray, "t h bw 3"]:
  """[B, T, H, W, 3] -> [T, H, B*W, 3]: a batch side by side in one video."""
  return np.concatenate(list(video), axis=2)


class ChunkDecoder:
  """Latent chunks -> uint8 video frames: the Wan VAE with its streaming cache (`jit_decode_chunk`), or
  the latent visualisation when the plan has no VAE."""

  def __init__(self, plan: Plan, batch_size: int | None = None):
    self.vae = None if plan.vae is None else wan_vae.restore_vae(plan.vae)
    if self.vae is not None:
      self._decode = jit_decode_chunk(self.vae)
      config, batch_size = plan.config, batch_size or plan.batch_size
      self._cache = sharding.place_like_params(
          self.vae, self.vae.init_decode_cache(batch_size, config.latent_height, config.latent_width))

  def __call__(self, latents: Float[np.ndarray, "b c f h w"], *, first: bool) -> UInt8[np.ndarray, "b t h w 3"]:
    """One chunk's frames; `first` marks the video's first chunk (its first latent frame gives 1 frame)."""
    if self.vae is None:
      return visualise_latents(latents, first=first)
    frames, self._cache = self._decode(jnp.moveaxis(jnp.asarray(latents), 1, -1), self._cache, first=first)
    return np.asarray(to_uint8(frames))


# ---- model and conditioning ------------------------------------------------------------------------


def prompt_embeddings(plan: Plan) -> list[Float[Array, "b text_len text_dim"]]:
  """Text-encoder output per prompt switch, each [B, text_len, text_dim] (zero-padded as Wan does)."""
  config = plan.config
  if plan.conditioning == "prompt":
    encoder = umt5.restore_text_encoder(plan.text_encoder)
    tokenizer = text.load_tokenizer(plan.tokenizer, text_len=encoder.config.text_len)
    encoded = text.encode_prompts(encoder, tokenizer, [prompt.text for prompt in plan.prompts])
    embeddings = [encoded[index:index + 1] for index in range(len(plan.prompts))]
  elif plan.conditioning == "text_embeddings":
    array = np.load(plan.options.text_embeddings, allow_pickle=False).astype(np.float32)
    embeddings = [jnp.asarray(array if array.ndim == 3 else array[None])]
  else:
    embeddings = [jax.random.normal(jax.random.key(plan.options.seed), (1, config.text_len, config.text_dim))]
  return [jnp.pad(e, ((0, 0), (0, config.text_len - e.shape[1]), (0, 0))) for e in embeddings]


def load_model(plan: Plan, dtype: jnp.dtype) -> CausalWanModel:
  """The DiT, weights of the plan's dtype: restored from its checkpoint, or random weights of its preset (a
  smoke run)."""
  if plan.checkpoint is None:
    return CausalWanModel(plan.config, rngs=nnx.Rngs(plan.options.seed), dtype=dtype, param_dtype=plan.param_dtype)
  return wan_dit.restore_model(plan.checkpoint, memory=plan.config.memory, dtype=dtype, param_dtype=plan.param_dtype,
                               init_missing_gates=plan.options.init_missing_gates)


def build_rollout(plan: Plan, dtype: jnp.dtype) -> tuple[Rollout, list[tuple[int, CrossKV]]]:
  """The rollout of the plan's model (mesh, batch, backends, retrieval statistics) and its prompt
  switches as (first chunk, cross K/V)."""
  embeddings = prompt_embeddings(plan)
  mesh = None if plan.mesh is None else sharding.make_mesh(plan.mesh["data"], plan.mesh["model"])
  rollout = Rollout(load_model(plan, dtype), SamplerConfig(), batch_size=plan.batch_size, store_dtype=dtype,
                    kv_format=plan.kv_format, retrieval=plan.retrieval, backends=plan.backends, mesh=mesh)
  starts = [prompt.chunk for prompt in plan.prompts] or [0]
  prompts = [(chunk, rollout.cross_kv(np.broadcast_to(e, (plan.batch_size, *e.shape[1:]))))
             for chunk, e in zip(starts, embeddings, strict=True)]
  return rollout, prompts


# ---- warnings as notes -----------------------------------------------------------------------------


class _NoteHandler(logging.Handler):
  """Hands each log record's message to `note`."""

  def __init__(self, note: Callable[[str], None]):
    super().__init__(logging.WARNING)
    self.note = note

  def emit(self, record: logging.LogRecord) -> None:
    self.note(record.getMessage())


@contextlib.contextmanager
def warnings_as_notes(out: TextIO) -> Iterator[list[str]]:
  """Yields a list that collects, while the block runs, the library's warnings (WARNING records of the
  `omnimem_jax` loggers, e.g. untrained gates, and Python warnings that would be shown, e.g. a prompt
  truncated to text_len); each is printed to `out` at once, as a note, instead of reaching stderr."""
  notes: list[str] = []

  def note(message: str) -> None:
    notes.append(message)
    print(message, file=out, flush=True)

  logger, handler = logging.getLogger("omnimem_jax"), _NoteHandler(note)
  propagate = logger.propagate
  logger.addHandler(handler)
  logger.propagate = False
  try:
    with warnings.catch_warnings():
      warnings.showwarning = lambda message, *_args, **_kwargs: note(str(message))
      yield notes
  finally:
    logger.removeHandler(handler)
    logger.propagate = propagate


# ---- the loop --------------------------------------------------------------------------------------


class Layout:
  """How decoded chunks become mp4 frames: one model's batch side by side, or, for a comparison of
  several models, their panels under labels with a caption strip (the time, and when the camera is back
  at a place it saw beyond the sliding window, how long ago)."""

  def __init__(self, plans: tuple[Plan, ...]):
    self.plans, first = plans, plans[0]
    self.labels = [panels.MODE_LABELS.get(p.config.memory.mode, p.config.memory.mode) for p in plans]
    self.upscale = panels.upscale_for(first.width) if len(plans) > 1 else 1
    self.revisits = revisit_captions(first) if len(plans) > 1 else []  # captions: comparisons only

  @property
  def size(self) -> tuple[int, int]:
    """(height, width) of the mp4."""
    first = self.plans[0]
    if len(self.plans) == 1:
      return first.height, first.width
    return panels.frame_size(first.height, first.width, self.labels, self.upscale)

  def frames(self, videos: list[UInt8[np.ndarray, "b t h w 3"]], chunk: int) -> UInt8[np.ndarray, "t hh ww 3"]:
    """The mp4 frames of one chunk from each plan's decoded batch."""
    if len(videos) == 1:
      return tile_batch(videos[0])
    config = self.plans[0].config
    offset = planning.video_frames_of_chunks(chunk, config) if chunk else 0
    captions = [f"{(offset + index) / config.fps:4.1f} s  {self.revisits[chunk]}".strip()
                for index in range(videos[0].shape[1])]
    return panels.compose([tile_batch(video) for video in videos], self.labels, captions, upscale=self.upscale)


def revisit_captions(plan: Plan) -> list[str]:
  """Per chunk, "back at a place seen X s ago" when the plan's world shows a place last seen beyond the
  sliding window, else ""; all "" when the world is unknown."""
  if plan.world is None:
    return [""] * plan.num_chunks
  visits = synthetic.earlier_visits(plan.world, plan.num_chunks)
  seconds_per_chunk = plan.config.vae_temporal_stride * plan.config.memory.frames_per_chunk / plan.config.fps
  captions = []
  for chunk in range(plan.num_chunks):
    earlier = np.flatnonzero(visits[chunk])
    back = chunk - int(earlier.max()) if earlier.size else 0
    far = earlier.size and back >= plan.config.memory.window_chunks
    captions.append(f"back at a place seen {back * seconds_per_chunk:.1f} s ago" if far else "")
  return captions


@dataclasses.dataclass(frozen=True)
class Streamed:
  """What the chunk loop produced for one plan: the latents, retrieval histograms, backends that ran."""

  latents: Float[np.ndarray, "b c f h w"]
  histograms: np.ndarray | None  # [chunks, layers, bins], omnimem mode with statistics only
  backends_used: dict[str, list[str]]  # op -> backends the rollout's compiled functions run


def stream_chunks(plans: tuple[Plan, ...], rollouts: list[tuple[Rollout, list[tuple[int, CrossKV]]]],
                  decode: ChunkDecoder, writer: Mp4Writer, progress: TextIO) -> tuple[list[Streamed], list[float]]:
  """Rolls every plan's model out chunk by chunk in lockstep, decoding each chunk and appending its frames
  (`Layout`) to the mp4 as it arrives; one progress line per chunk (end-to-end FPS, with the DiT's share).
  Returns what each plan produced and the wall seconds of each chunk (all models, decoding and writing)."""
  first, layout = plans[0], Layout(plans)
  streams = [rollout.stream(prompts, first.num_chunks, first.options.seed, recache_chunks=first.recache_chunks)
             for rollout, prompts in rollouts]
  latents, histograms, wall = [[] for _ in plans], [[] for _ in plans], []
  for segments in zip(*streams, strict=True):
    chunk, dit_seconds = segments[0].first_chunk, sum(segment.seconds for segment in segments)
    chunk_start = time.perf_counter() - dit_seconds
    chunk_latents = [np.asarray(segment.latents, np.float32) for segment in segments]  # each [B, C, 3, H, W]
    video = decode(np.concatenate(chunk_latents), first=chunk == 0)
    writer.write(layout.frames(np.split(video, len(plans)), chunk))
    for index, segment in enumerate(segments):
      latents[index].append(chunk_latents[index])
      if segment.retrieval is not None:
        histograms[index].append(np.asarray(segment.retrieval.histograms))
    wall.append(time.perf_counter() - chunk_start)
    print(report.format_progress(chunk, first.num_chunks, video.shape[1], wall[-1], dit_seconds,
                                 report.eta_seconds(wall, first.num_chunks)), file=progress, flush=True)
  return [Streamed(latents=np.concatenate(latents[i], axis=2),
                   histograms=np.concatenate(histograms[i]) if histograms[i] else None,
                   backends_used=rollout.backends_used) for i, (rollout, _) in enumerate(rollouts)], wall


def _facts(plan: Plan, rollout: Rollout, streamed: Streamed, wall: list[float], dtype: jnp.dtype, total: float,
           peak_bytes: int | None, notes: list[str]) -> report.RunFacts:
  return report.RunFacts(
      dtype=dtype.name, sampler=dataclasses.asdict(rollout.sampler), latent_frames=streamed.latents.shape[2],
      pixels="latent_visualisation" if plan.vae is None else "vae",
      chunk_seconds=wall, dit_chunk_seconds=[seconds for _, _, seconds in rollout.timings],
      compilations=rollout.traces, total_seconds=total,
      chunks_in_memory=int(np.sum(np.asarray(rollout.store.slot_chunk) >= 0)), peak_device_bytes=peak_bytes,
      histograms=streamed.histograms, backends_used=streamed.backends_used, notes=notes)


def run(plans: Plan | tuple[Plan, ...], *, out: TextIO | None = None, progress: TextIO | None = None
        ) -> dict[str, Any]:
  """Generates the video the plan describes, or, given several plans (`plan.plan_runs`), the same video
  by each model side by side; writes the mp4, the report (and latents); returns the report.

  Messages and notes (the plans', then the library's warnings: `warnings_as_notes`) go to `out`
  (default stdout), one progress line per chunk to `progress` (default stderr). A failure anywhere,
  NaN or infinite latents included (`rollout.NonFiniteLatentsError`, naming the chunk), removes the
  partial video and leaves any existing file untouched.
  """
  plans = (plans,) if isinstance(plans, Plan) else tuple(plans)
  out, progress, first = out or sys.stdout, progress or sys.stderr, plans[0]
  start = time.perf_counter()
  height, width = Layout(plans).size
  with (Mp4Writer(first.output, height=height, width=width, fps=first.config.fps) as writer,
        warnings_as_notes(out) as run_notes):
    dtype = jnp.dtype(first.dtype)
    for line in dict.fromkeys(line for plan in plans for line in report.opening_lines(plan)):
      print(line, file=out, flush=True)
    rollouts = [build_rollout(plan, dtype) for plan in plans]
    decoder = ChunkDecoder(first, batch_size=len(plans) * first.batch_size)
    streamed, wall = stream_chunks(plans, rollouts, decoder, writer, progress)
    peak_bytes = environment.peak_device_bytes()
  if first.latents is not None:
    io.atomic_write(first.latents, lambda file: np.save(file, streamed[0].latents))
  total = time.perf_counter() - start
  records = [report.build_report(plan, _facts(plan, rollout, result, wall, dtype, total, peak_bytes, run_notes))
             for plan, (rollout, _), result in zip(plans, rollouts, streamed, strict=True)]
  record = records[0] if len(plans) == 1 else report.comparison_report(plans, records, (height, width))
  io.write_json(first.report, record)
  for line in report.closing_lines(plans, records, (height, width)):
    print(line, file=out)
  return record


def generate(options: GenerateOptions, **kwargs: Any) -> dict[str, Any]:
  """plan + run: validates, then generates; returns the report."""
  return run(planning.plan_runs(options), **kwargs)
