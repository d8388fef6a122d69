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
from omnimem_jax.generation import plan as planning
from omnimem_jax.generation import report
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

  def __init__(self, plan: Plan):
    self.vae = None if plan.vae is None else wan_vae.restore_vae(plan.vae)
    if self.vae is not None:
      self._decode = jit_decode_chunk(self.vae)
      config = plan.config
      self._cache = sharding.place_like_params(
          self.vae, self.vae.init_decode_cache(plan.batch_size, config.latent_height, config.latent_width))

  def __call__(self, latents: Float[np.ndarray, "b c f h w"], *, first: bool) -> UInt8[np.ndarray, "b t h w 3"]:
    """One chunk's frames; `first` marks the video's first chunk (its first latent frame gives 1 frame)."""
    if self.vae is None:
      return visualise_latents(latents, first=first)
    frames, self._cache = self._decode(jnp.moveaxis(jnp.asarray(latents), 1, -1), self._cache, first=first)
    return np.asarray(to_uint8(frames))


# ---- model and conditioning ------------------------------------------------------------------------


def compute_dtype(options: GenerateOptions) -> jnp.dtype:
  """--dtype, else float32 on CPU and bfloat16 on accelerators."""
  return jnp.dtype(options.dtype or ("float32" if jax.devices()[0].platform == "cpu" else "bfloat16"))


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
  """The DiT: restored from the plan's checkpoint, or random weights of its preset (a smoke run)."""
  if plan.checkpoint is None:
    return CausalWanModel(plan.config, rngs=nnx.Rngs(plan.options.seed), dtype=dtype)
  return wan_dit.restore_model(plan.checkpoint, memory=plan.config.memory, dtype=dtype,
                               init_missing_gates=plan.options.init_missing_gates)


def build_rollout(plan: Plan, dtype: jnp.dtype) -> tuple[Rollout, list[tuple[int, CrossKV]]]:
  """The rollout of the plan's model (mesh, batch, backends, retrieval statistics) and its prompt
  switches as (first chunk, cross K/V)."""
  embeddings = prompt_embeddings(plan)
  mesh = None if plan.mesh is None else sharding.make_mesh(plan.mesh["data"], plan.mesh["model"])
  retrieval = plan.options.retrieval_stats and plan.config.memory.mode == "omnimem"
  rollout = Rollout(load_model(plan, dtype), SamplerConfig(), batch_size=plan.batch_size, store_dtype=dtype,
                    retrieval=retrieval, backends=plan.backends, mesh=mesh)
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


@dataclasses.dataclass(frozen=True)
class Streamed:
  """What the chunk loop produced: the latents, retrieval histograms, times, backends that ran."""

  latents: Float[np.ndarray, "b c f h w"]
  histograms: np.ndarray | None  # [chunks, layers, bins], omnimem mode with statistics only
  chunk_seconds: list[float]  # per chunk, end to end: DiT, decoding and writing
  backends_used: dict[str, list[str]]  # op -> backends the rollout's compiled functions run


def stream_chunks(plan: Plan, rollout: Rollout, prompts: list[tuple[int, CrossKV]], decode: ChunkDecoder,
                  writer: Mp4Writer, progress: TextIO) -> Streamed:
  """Rolls out every chunk, decoding and appending each to the mp4 as it arrives; one progress line
  per chunk (its end-to-end FPS, with the DiT's share)."""
  latents, histograms, wall = [], [], []
  for segment in rollout.stream(prompts, plan.num_chunks, plan.options.seed, recache_chunks=plan.recache_chunks):
    chunk_start = time.perf_counter() - segment.seconds
    chunk_latents = np.asarray(segment.latents, np.float32)  # [B, C, 3, H, W]
    video = decode(chunk_latents, first=segment.first_chunk == 0)
    writer.write(tile_batch(video))
    latents.append(chunk_latents)
    if segment.retrieval is not None:
      histograms.append(np.asarray(segment.retrieval))
    wall.append(time.perf_counter() - chunk_start)
    print(report.format_progress(segment.first_chunk, plan.num_chunks, video.shape[1], wall[-1], segment.seconds,
                                 report.eta_seconds(wall, plan.num_chunks)), file=progress, flush=True)
  return Streamed(latents=np.concatenate(latents, axis=2),
                  histograms=np.concatenate(histograms) if histograms else None, chunk_seconds=wall,
                  backends_used=rollout.backends_used)


def run(plan: Plan, *, out: TextIO | None = None, progress: TextIO | None = None) -> dict[str, Any]:
  """Generates the video the plan describes; writes the mp4, the report (and latents); returns the report.

  Messages and notes (the plan's, then the library's warnings: `warnings_as_notes`) go to `out`
  (default stdout), one progress line per chunk to `progress` (default stderr). A failure anywhere,
  NaN or infinite latents included (`rollout.NonFiniteLatentsError`, naming the chunk), removes the
  partial video and leaves any existing file untouched.
  """
  out, progress = out or sys.stdout, progress or sys.stderr
  start = time.perf_counter()
  with (Mp4Writer(plan.output, height=plan.height, width=plan.width, fps=plan.config.fps) as writer,
        warnings_as_notes(out) as run_notes):
    dtype = compute_dtype(plan.options)
    for line in report.opening_lines(plan, dtype.name):
      print(line, file=out, flush=True)
    rollout, prompts = build_rollout(plan, dtype)
    streamed = stream_chunks(plan, rollout, prompts, ChunkDecoder(plan), writer, progress)
    peak_bytes = environment.peak_device_bytes()
  if plan.latents is not None:
    io.atomic_write(plan.latents, lambda file: np.save(file, streamed.latents))
  facts = report.RunFacts(
      dtype=dtype.name, sampler=dataclasses.asdict(rollout.sampler), latent_frames=streamed.latents.shape[2],
      pixels="latent_visualisation" if plan.vae is None else "vae",
      chunk_seconds=streamed.chunk_seconds, dit_chunk_seconds=[seconds for _, _, seconds in rollout.timings],
      compilations=rollout.traces, total_seconds=time.perf_counter() - start,
      chunks_in_memory=int(np.sum(np.asarray(rollout.store.slot_chunk) >= 0)), peak_device_bytes=peak_bytes,
      histograms=streamed.histograms, backends_used=streamed.backends_used, notes=run_notes)
  record = report.build_report(plan, facts)
  io.write_json(plan.report, record)
  print(report.closing_line(plan, record), file=out)
  return record


def generate(options: GenerateOptions, **kwargs: Any) -> dict[str, Any]:
  """plan + run: validates, then generates; returns the report."""
  return run(planning.plan(options), **kwargs)
