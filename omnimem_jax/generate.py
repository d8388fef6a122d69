"""Text (or text embeddings) in, long mp4 out: the logic behind `experiments/generate.py`.

Two phases, so that bad input fails fast and cheaply:

  plan = generate.plan(GenerateOptions(...))   # validates everything: reads only JSON metadata,
                                               # .npy headers and the prompt file; GenerateError if bad
  report = generate.run(plan)                  # loads weights, encodes prompts, rolls out chunk by
                                               # chunk, decodes each chunk as it arrives, writes files

`run` streams: every chunk is decoded (Wan VAE, or a latent visualisation without one) and appended
to the mp4 as soon as the DiT produces it; a progress line per chunk goes to stderr. Outputs are
written under a temporary name and renamed into place, so an existing file is never left half
written. Without a DiT checkpoint the run uses random weights of a preset: a smoke run, labelled as
such on stdout and in the JSON report, that tests the pipeline and not the pictures.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, TextIO

import numpy as np

from omnimem_jax import checkpoints
from omnimem_jax.config import ATTENTION_MODES, PRESETS, ModelConfig, SamplerConfig, store_bytes
from omnimem_jax.model.vae import VAEConfig, jit_decode_chunk

DEFAULT_SECONDS = 10.0  # video length when neither --seconds nor --num_frames is given
DEFAULT_OUTPUT = "outputs/demo.mp4"
DEFAULT_PRESET = "tiny"
# --model_dir layout: component -> subdirectory.
MODEL_DIR_LAYOUT = {"checkpoint": "dit", "vae": "vae", "text_encoder": "text_encoder", "tokenizer": "tokenizer"}
LATENT_VIS_RANGE = 3.0  # latents (unit variance) are shown over [-3, 3] -> [0, 255]


class GenerateError(ValueError):
  """Bad input: the message says what is wrong and what to do (one line)."""


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
  """Everything `experiments/generate.py` takes as flags (None: the default that the rule names).

  Attributes:
    checkpoint: Orbax DiT checkpoint (experiments/convert_checkpoint.py); None: random weights.
    preset: architecture of the random weights (default "tiny"); with a checkpoint, it must match it.
    prompt / prompt_file / text_embeddings: conditioning, at most one. The prompt file has lines
      `latent_frame: prompt`; None of them: a random embedding from the seed.
    seconds / num_frames: video length (16 fps), at most one; default DEFAULT_SECONDS.
    seed: noise seed (and seed of random weights and of a random embedding).
    attention: "omnimem", "window", "sink_window" or "dense" (default: the checkpoint's mode, or omnimem).
    top_k, window_chunks, exclude_window_chunks, group_size: MemoryConfig overrides.
    capacity_chunks: KV store slots (default: every requested chunk, i.e. full history).
    recache_frames: latent frames re-encoded under a new prompt at a switch (rounded down to chunks).
    output: mp4 path; report: JSON path (default: output with .json); save_latents: optional .npy path.
    vae, text_encoder, tokenizer: converted VAE / umT5 checkpoints and the tokenizer directory.
    model_dir: a directory laid out as MODEL_DIR_LAYOUT; fills the four paths above that are not given.
    init_missing_gates: omnimem mode from a checkpoint without gates (untrained gates).
    dtype: compute and KV-store dtype: "float32", "bfloat16", or None (float32 on CPU, else bfloat16).
    retrieval_stats: record per-layer retrieval histograms in omnimem mode (one extra scoring pass).
    mesh: e.g. "data=2,model=2": shard the batch over "data" and the heads (weights, KV store) over
      "model" (`omnimem_jax.sharding`); None runs on one device.
    batch_size: videos generated side by side (each its own noise); default: the embeddings' batch, or 1.
  """

  checkpoint: str | None = None
  preset: str | None = None
  prompt: str | None = None
  prompt_file: str | None = None
  text_embeddings: str | None = None
  seconds: float | None = None
  num_frames: int | None = None
  seed: int = 0
  attention: str | None = None
  top_k: int | None = None
  window_chunks: int | None = None
  exclude_window_chunks: int | None = None
  group_size: int | None = None
  capacity_chunks: int | None = None
  recache_frames: int = 21
  output: str = DEFAULT_OUTPUT
  report: str | None = None
  save_latents: str | None = None
  vae: str | None = None
  text_encoder: str | None = None
  tokenizer: str | None = None
  model_dir: str | None = None
  init_missing_gates: bool = False
  dtype: str | None = None
  retrieval_stats: bool = True
  mesh: str | None = None
  batch_size: int | None = None


@dataclasses.dataclass(frozen=True)
class PromptSwitch:
  """A prompt and where it starts: latent frame as written, and the chunk it takes effect at."""

  latent_frame: int
  chunk: int
  text: str


@dataclasses.dataclass(frozen=True)
class Plan:
  """A validated run: resolved paths, the model config, the length in chunks, the conditioning."""

  options: GenerateOptions
  config: ModelConfig
  checkpoint: Path | None
  vae: Path | None
  text_encoder: Path | None
  tokenizer: Path | None
  conditioning: str  # "prompt", "text_embeddings" or "random_embedding"
  prompts: tuple[PromptSwitch, ...]
  batch_size: int
  mesh: dict[str, int] | None  # ("data", "model") axis sizes, or None for one device
  num_chunks: int
  requested_frames: int
  output: Path
  report: Path
  latents: Path | None
  pixel_scale: int  # video pixels per latent pixel (the VAE's spatial compression; 8 for the visualisation)
  notes: tuple[str, ...]

  @property
  def smoke(self) -> bool:
    """Random DiT weights: the run tests the pipeline only."""
    return self.checkpoint is None

  @property
  def frames(self) -> int:
    return video_frames_of_chunks(self.num_chunks, self.config)

  @property
  def height(self) -> int:
    return self.config.latent_height * self.pixel_scale

  @property
  def width(self) -> int:
    """Width of the mp4: a batch is tiled side by side."""
    return self.config.latent_width * self.pixel_scale * self.batch_size

  @property
  def recache_chunks(self) -> int:
    return self.options.recache_frames // self.config.memory.frames_per_chunk


# ---- lengths ---------------------------------------------------------------------------------------


def video_frames_of_chunks(num_chunks: int, config: ModelConfig) -> int:
  """Video frames of `num_chunks` chunks: 4 (latent frames - 1) + 1 (chunk 0 gives 9, later ones 12)."""
  latent_frames = num_chunks * config.memory.frames_per_chunk
  return config.vae_temporal_stride * (latent_frames - 1) + 1


def chunks_for_frames(frames: int, config: ModelConfig) -> int:
  """Fewest chunks whose video holds at least `frames` frames."""
  first = video_frames_of_chunks(1, config)
  later = config.vae_temporal_stride * config.memory.frames_per_chunk
  return 1 + max(0, math.ceil((frames - first) / later))


# ---- validation ------------------------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
  raise GenerateError(message)


def _existing_dir(path: str, flag: str) -> Path:
  directory = Path(path)
  if not directory.exists():
    _fail(f"{flag}={path} does not exist")
  if not directory.is_dir():
    _fail(f"{flag}={path} is not a directory")
  return directory


def _metadata(path: str, flag: str, kind: checkpoints.Kind) -> tuple[Path, checkpoints.CheckpointRecord]:
  """A converted checkpoint's JSON record, refusing a missing directory or one of another kind."""
  directory = _existing_dir(path, flag)
  try:
    return directory, checkpoints.read_record(directory, kind)
  except (OSError, ValueError) as err:
    raise GenerateError(f"{flag}: {err}") from err


def _writable_file(path: str, flag: str, suffix: str) -> Path:
  """Checks that `path` can be written (its nearest existing ancestor is a writable directory)."""
  target = Path(path)
  if target.suffix.lower() != suffix:
    _fail(f"{flag}={path} must end in {suffix}")
  if target.is_dir():
    _fail(f"{flag}={path} is a directory")
  ancestor = target.parent
  while not ancestor.exists():
    ancestor = ancestor.parent
  if not ancestor.is_dir():
    _fail(f"{flag}={path} cannot be written: {ancestor} is not a directory")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    _fail(f"{flag}={path} cannot be written: no write permission in {ancestor}")
  return target


def _architecture(config: ModelConfig) -> dict[str, Any]:
  """The config without its memory settings (which a run may change)."""
  fields = config.to_dict()
  fields.pop("memory")
  return fields


def _base_config(options: GenerateOptions, checkpoint: Path | None, record: checkpoints.CheckpointRecord | None) -> ModelConfig:
  """The checkpoint's config (refusing a different --preset), or the preset's for random weights."""
  if options.preset is not None and options.preset not in PRESETS:
    _fail(f"--preset={options.preset} is unknown; choose one of {sorted(PRESETS)}")
  if record is None:
    return PRESETS[options.preset or DEFAULT_PRESET]
  try:
    config = ModelConfig.from_dict(record.config)
  except (KeyError, TypeError, ValueError) as err:
    raise GenerateError(f"--checkpoint={checkpoint} holds an unreadable model config: {err}") from err
  if options.preset is not None:
    saved, wanted = _architecture(config), _architecture(PRESETS[options.preset])
    differ = [f"{name} {saved[name]} != {wanted[name]}" for name in saved if saved[name] != wanted[name]]
    if differ:
      _fail(f"--checkpoint={checkpoint} is not a {options.preset} checkpoint ({', '.join(differ[:4])}); "
            "drop --preset (the checkpoint's config is used) or pick the matching checkpoint")
  return config


def _with_memory_flags(options: GenerateOptions, config: ModelConfig, num_chunks: int) -> ModelConfig:
  """`config` with the attention and memory flags applied; capacity defaults to the whole video."""
  if options.attention is not None and options.attention not in ATTENTION_MODES:
    _fail(f"--attention={options.attention} is unknown; choose one of {list(ATTENTION_MODES)}")
  overrides = {name: getattr(options, name) for name in ("top_k", "window_chunks", "exclude_window_chunks",
                                                         "group_size") if getattr(options, name) is not None}
  if options.attention is not None:
    overrides["mode"] = options.attention
  try:
    memory = dataclasses.replace(config.memory, **overrides)
    capacity = (max(num_chunks, memory.min_capacity_chunks) if options.capacity_chunks is None
                else options.capacity_chunks)
    return dataclasses.replace(config, memory=dataclasses.replace(memory, capacity_chunks=capacity))
  except ValueError as err:
    raise GenerateError(f"memory flags: {err}") from err


def read_prompt_file(path: str, frames_per_chunk: int) -> tuple[list[PromptSwitch], list[str]]:
  """Parses `latent_frame: prompt` lines (blank lines and '#' comments skipped); returns the switches
  and notes about frames rounded down to a chunk boundary."""
  file = Path(path)
  if not file.is_file():
    _fail(f"--prompt_file={path} does not exist")
  switches: list[PromptSwitch] = []
  notes = []
  for number, line in enumerate(file.read_text().splitlines(), start=1):
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\S.*?)\s*", line)
    if match is None:
      _fail(f"--prompt_file={path} line {number}: expected 'latent_frame: prompt', got {line.strip()!r}")
    frame, text = int(match.group(1)), match.group(2)
    chunk = frame // frames_per_chunk
    if switches and chunk <= switches[-1].chunk:
      _fail(f"--prompt_file={path} line {number}: latent frame {frame} (chunk {chunk}) must come after the "
            f"previous prompt's chunk {switches[-1].chunk}; prompts switch at chunk boundaries of "
            f"{frames_per_chunk} latent frames")
    if frame % frames_per_chunk:
      notes.append(f"prompt at latent frame {frame} starts at the chunk boundary, latent frame "
                   f"{chunk * frames_per_chunk} (chunk {chunk})")
    switches.append(PromptSwitch(frame, chunk, text))
  if not switches:
    _fail(f"--prompt_file={path} holds no 'latent_frame: prompt' line")
  if switches[0].latent_frame != 0:
    _fail(f"--prompt_file={path}: the first prompt must start at latent frame 0, got {switches[0].latent_frame}")
  return switches, notes


def _embedding_batch(path: str, config: ModelConfig) -> int:
  """Batch size of a text-embeddings .npy ([tokens, text_dim] or [B, tokens, text_dim]), read from its
  header only."""
  file = Path(path)
  if not file.is_file():
    _fail(f"--text_embeddings={path} does not exist")
  try:
    array = np.load(file, mmap_mode="r", allow_pickle=False)
  except (OSError, ValueError, EOFError) as err:
    raise GenerateError(f"--text_embeddings={path} is not a readable .npy array: {err}") from err
  shape = array.shape
  if len(shape) not in (2, 3) or shape[-1] != config.text_dim or not 1 <= shape[-2] <= config.text_len or (
      len(shape) == 3 and shape[0] < 1):
    _fail(f"--text_embeddings={path} has shape {list(shape)}; expected [tokens, {config.text_dim}] or "
          f"[batch, tokens, {config.text_dim}] with 1 <= tokens <= {config.text_len} (text-encoder output)")
  if not np.issubdtype(array.dtype, np.floating):
    _fail(f"--text_embeddings={path} has dtype {array.dtype}; expected floating point")
  return 1 if len(shape) == 2 else shape[0]


def _length(options: GenerateOptions, config: ModelConfig) -> tuple[int, int]:
  """(requested video frames, chunks), refusing lengths past the RoPE table."""
  if options.seconds is not None and options.num_frames is not None:
    _fail("give --seconds or --num_frames, not both")
  if options.num_frames is not None:
    if options.num_frames < 1:
      _fail(f"--num_frames must be >= 1, got {options.num_frames}")
    frames, asked = options.num_frames, f"--num_frames={options.num_frames}"
  else:
    seconds = DEFAULT_SECONDS if options.seconds is None else options.seconds
    if not seconds > 0:
      _fail(f"--seconds must be > 0, got {seconds}")
    frames, asked = math.ceil(seconds * config.fps - 1e-9), f"--seconds={seconds:g}"
  num_chunks = chunks_for_frames(frames, config)
  if num_chunks > config.max_chunks:
    longest = video_frames_of_chunks(config.max_chunks, config)
    _fail(f"{asked} needs {num_chunks} chunks ({num_chunks * config.memory.frames_per_chunk} latent frames), past "
          f"the RoPE horizon of {config.rope_max_frames} latent frames ({config.max_video_seconds:.1f} s); the "
          f"longest video is {config.max_chunks} chunks = {longest} frames ({longest / config.fps:.1f} s)")
  return frames, num_chunks


def _mesh(text: str, config: ModelConfig, batch_size: int) -> dict[str, int]:
  """--mesh parsed and checked against the visible devices, the heads and the batch."""
  from omnimem_jax import sharding  # noqa: PLC0415 (imports jax)

  try:
    sizes = sharding.parse_mesh(text)
    sharding.make_mesh(sizes["data"], sizes["model"], config=config, batch_size=batch_size)
  except ValueError as err:
    _fail(f"--mesh={text}: {err}")
  return sizes


def plan(options: GenerateOptions) -> Plan:
  """Validates every flag, file and combination without loading weights; raises GenerateError."""
  fill = dict.fromkeys(MODEL_DIR_LAYOUT)
  if options.model_dir is not None:
    model_dir = _existing_dir(options.model_dir, "--model_dir")
    if not (model_dir / MODEL_DIR_LAYOUT["checkpoint"]).is_dir():
      _fail(f"--model_dir={options.model_dir} has no {MODEL_DIR_LAYOUT['checkpoint']}/ (the converted DiT); "
            f"expected subdirectories {', '.join(d + '/' for d in MODEL_DIR_LAYOUT.values())}")
    fill = {name: str(model_dir / sub) if (model_dir / sub).is_dir() else None
            for name, sub in MODEL_DIR_LAYOUT.items()}
  paths = {name: getattr(options, name) or fill[name] for name in MODEL_DIR_LAYOUT}

  # Conflicting flags.
  given = [flag for flag in ("prompt", "prompt_file", "text_embeddings") if getattr(options, flag) is not None]
  if len(given) > 1:
    _fail(f"give one of --prompt, --prompt_file, --text_embeddings, not {' and '.join('--' + g for g in given)}")
  wants_text = options.prompt is not None or options.prompt_file is not None
  if options.prompt is not None and not options.prompt.strip():
    _fail("--prompt is empty")
  if wants_text and (paths["text_encoder"] is None or paths["tokenizer"] is None):
    _fail("--prompt and --prompt_file need a text encoder: give --text_encoder and --tokenizer (or --model_dir); "
          "or pass precomputed --text_embeddings")
  if not wants_text and (options.text_encoder is not None or options.tokenizer is not None):
    _fail("--text_encoder / --tokenizer are only used with --prompt or --prompt_file")
  if options.recache_frames < 0:
    _fail(f"--recache_frames must be >= 0, got {options.recache_frames}")
  if options.dtype not in (None, "float32", "bfloat16"):
    _fail(f"--dtype={options.dtype} is unknown; choose float32 or bfloat16")

  # Checkpoints: metadata only.
  checkpoint = record = None
  if paths["checkpoint"] is not None:
    checkpoint, record = _metadata(paths["checkpoint"], "--checkpoint", checkpoints.Kind.DIT)
  base = _base_config(options, checkpoint, record)
  requested_frames, num_chunks = _length(options, base)
  config = _with_memory_flags(options, base, num_chunks)
  if (record is not None and config.memory.mode == "omnimem" and not record.has_gates
      and not options.init_missing_gates):
    _fail(f"--checkpoint={paths['checkpoint']} has no OmniMem gates (converted for "
          f"{record.config['memory']['mode']} mode): pass --attention={record.config['memory']['mode']}, or "
          "--init_missing_gates to start omnimem mode from untrained gates")

  vae, pixel_scale = None, 8
  if paths["vae"] is not None:
    vae, vae_record = _metadata(paths["vae"], "--vae", checkpoints.Kind.VAE)
    try:
      vae_config = VAEConfig.from_dict(vae_record.config)
    except (KeyError, TypeError, ValueError) as err:
      raise GenerateError(f"--vae={paths['vae']} holds an unreadable VAE config: {err}") from err
    if vae_config.z_dim != config.out_channels:
      _fail(f"--vae={paths['vae']} has {vae_config.z_dim} latent channels but the DiT makes {config.out_channels}")
    pixel_scale = vae_config.spatial_compression
  text_encoder = tokenizer = None
  if wants_text:
    text_encoder, text_record = _metadata(paths["text_encoder"], "--text_encoder", checkpoints.Kind.TEXT_ENCODER)
    text_dim, text_len = text_record.config.get("dim"), text_record.config.get("text_len")
    if text_dim != config.text_dim or text_len is None or text_len > config.text_len:
      _fail(f"--text_encoder={paths['text_encoder']} gives [{text_len}, {text_dim}] embeddings; the DiT takes "
            f"up to {config.text_len} tokens of width {config.text_dim}")
    tokenizer = _existing_dir(paths["tokenizer"], "--tokenizer")
    if not ((tokenizer / "tokenizer.json").is_file() or (tokenizer / "spiece.model").is_file()):
      _fail(f"--tokenizer={paths['tokenizer']} holds neither tokenizer.json nor spiece.model")

  notes: list[str] = []
  frames_per_chunk = config.memory.frames_per_chunk
  batch_size = 1
  if options.prompt_file is not None:
    prompts, prompt_notes = read_prompt_file(options.prompt_file, frames_per_chunk)
    notes += prompt_notes
    if prompts[-1].chunk >= num_chunks:
      _fail(f"--prompt_file={options.prompt_file}: the prompt at latent frame {prompts[-1].latent_frame} starts "
            f"after the video ends ({num_chunks} chunks = {num_chunks * frames_per_chunk} latent frames)")
    conditioning = "prompt"
  elif options.prompt is not None:
    prompts, conditioning = [PromptSwitch(0, 0, options.prompt)], "prompt"
  elif options.text_embeddings is not None:
    prompts, conditioning = [], "text_embeddings"
    batch_size = _embedding_batch(options.text_embeddings, config)
  else:
    prompts, conditioning = [], "random_embedding"
    notes.append(f"no prompt: the conditioning is a random text embedding drawn from seed {options.seed}")

  if options.batch_size is not None:
    if options.batch_size < 1:
      _fail(f"--batch_size must be >= 1, got {options.batch_size}")
    if batch_size > 1 and options.batch_size != batch_size:
      _fail(f"--batch_size={options.batch_size} contradicts --text_embeddings, which holds a batch of {batch_size}")
    batch_size = options.batch_size
  mesh = None if options.mesh is None else _mesh(options.mesh, config, batch_size)

  output = _writable_file(options.output, "--output", ".mp4")
  report = _writable_file(options.report or str(output.with_suffix(".json")), "--report", ".json")
  latents = None if options.save_latents is None else _writable_file(options.save_latents, "--save_latents", ".npy")
  named = [output, report] + ([latents] if latents else [])
  if len({path.resolve() for path in named}) < len(named):
    _fail(f"--output, --report and --save_latents must be different files, got {', '.join(map(str, named))}")

  frames = video_frames_of_chunks(num_chunks, config)
  if frames != requested_frames:
    notes.append(f"{requested_frames} frames requested: rounded up to {num_chunks} whole chunks = {frames} frames "
                 f"({frames / config.fps:.2f} s; chunk 0 gives 9 frames, every later chunk 12)")
  if config.memory.capacity_chunks < num_chunks:
    notes.append(f"capacity {config.memory.capacity_chunks} chunks < {num_chunks} chunks: the KV store reuses "
                 f"slots, dropping {num_chunks - config.memory.capacity_chunks} chunks from memory")
  if vae is None:
    notes.append("no VAE: the video shows latent channels 0-2 over [-3, 3], upsampled 8x in space and 4x in time")
  if checkpoint is None:
    notes.insert(0, f"SMOKE RUN: random weights ({options.preset or DEFAULT_PRESET} preset), no checkpoint: this "
                    "tests the pipeline; the pictures mean nothing")
  return Plan(options=options, config=config, checkpoint=checkpoint, vae=vae,
              text_encoder=text_encoder, tokenizer=tokenizer, conditioning=conditioning, prompts=tuple(prompts),
              batch_size=batch_size, mesh=mesh, num_chunks=num_chunks, requested_frames=requested_frames,
              output=output, report=report, latents=latents, pixel_scale=pixel_scale, notes=tuple(notes))


# ---- pixels ----------------------------------------------------------------------------------------


def visualise_latents(latents: np.ndarray, *, first: bool, spatial: int = 8, temporal: int = 4) -> np.ndarray:
  """Latents [B, C, F, H, W] -> uint8 video [B, T, H*spatial, W*spatial, 3]: channels 0-2 over
  [-LATENT_VIS_RANGE, LATENT_VIS_RANGE], nearest-upsampled; the video's first latent frame gives one
  frame and every other `temporal` frames, as the VAE would."""
  channels = latents.shape[1]
  rgb = np.moveaxis(np.asarray(latents, np.float32)[:, [i % channels for i in range(3)]], 1, -1)  # [B, F, H, W, 3]
  pixels = np.round((np.clip(rgb / LATENT_VIS_RANGE, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
  repeats = [1 if first and index == 0 else temporal for index in range(rgb.shape[1])]
  return np.repeat(pixels, repeats, axis=1).repeat(spatial, axis=2).repeat(spatial, axis=3)


def tile_batch(video: np.ndarray) -> np.ndarray:
  """[B, T, H, W, 3] -> [T, H, B*W, 3]: a batch side by side in one video."""
  return np.concatenate(list(video), axis=2)


# ---- run -------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Any) -> None:
  """Calls write(file) on a temporary sibling of `path`, then renames it into place."""
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
  try:
    with open(partial, "wb") as file:
      write(file)
    os.replace(partial, path)
  finally:
    partial.unlink(missing_ok=True)


def _versions() -> dict[str, str]:
  import flax  # noqa: PLC0415
  import jax  # noqa: PLC0415
  return {"python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": importlib.metadata.version("jaxlib"), "flax": flax.__version__, "numpy": np.__version__,
          "orbax-checkpoint": importlib.metadata.version("orbax-checkpoint")}


def _device() -> dict[str, Any]:
  import jax  # noqa: PLC0415
  device = jax.devices()[0]
  return {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()}


def _peak_memory_bytes() -> int | None:
  """Peak bytes in use on the first device, or None where the backend keeps no statistics (CPU)."""
  import jax  # noqa: PLC0415
  stats = jax.devices()[0].memory_stats()
  return None if not stats or "peak_bytes_in_use" not in stats else int(stats["peak_bytes_in_use"])


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


def _format_progress(chunk: int, num_chunks: int, seconds: float, frames: int, eta: float | None) -> str:
  """One progress line: chunk i/N, DiT milliseconds, video frames per DiT second, estimated time left."""
  counter = f"{chunk + 1}/{num_chunks}".rjust(2 * len(str(num_chunks)) + 1)
  remaining = "?" if eta is None else f"{eta:.1f} s"
  return f"chunk {counter}  {seconds * 1e3:9.1f} ms  {frames / seconds:8.1f} FPS  ETA {remaining}"


def _prompt_embeddings(plan: Plan) -> list[Any]:
  """Text-encoder output per prompt switch, each [B, text_len, text_dim] (zero-padded as Wan does)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from omnimem_jax.convert import umt5  # noqa: PLC0415
  from omnimem_jax.model import text  # noqa: PLC0415

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


def run(plan: Plan, *, out: TextIO | None = None, progress: TextIO | None = None) -> dict[str, Any]:
  """Generates the video the plan describes; writes the mp4, the report (and latents); returns the report.

  Messages go to `out` (default stdout), one progress line per chunk to `progress` (default stderr).
  The mp4 writer (an ffmpeg subprocess) starts before JAX starts its threads; a failure anywhere
  removes the partial video and leaves any existing file untouched.
  """
  out, progress = out or sys.stdout, progress or sys.stderr
  from omnimem_jax.video import Mp4Writer  # noqa: PLC0415

  start = time.perf_counter()
  config, options = plan.config, plan.options
  with Mp4Writer(plan.output, height=plan.height, width=plan.width, fps=config.fps) as writer:
    import jax  # noqa: PLC0415 (heavy imports only once the input is known to be good)
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from omnimem_jax import sharding  # noqa: PLC0415
    from omnimem_jax.convert import wan_dit, wan_vae  # noqa: PLC0415
    from omnimem_jax.model.vae import to_uint8  # noqa: PLC0415
    from omnimem_jax.model.wan import CausalWanModel  # noqa: PLC0415
    from omnimem_jax.rollout import Rollout  # noqa: PLC0415

    on_cpu = jax.devices()[0].platform == "cpu"
    dtype = jnp.dtype(options.dtype or ("float32" if on_cpu else "bfloat16"))
    for note in plan.notes:
      print(note, file=out)
    print(f"generating {plan.num_chunks} chunks = {plan.frames} frames ({plan.frames / config.fps:.2f} s at "
          f"{config.fps} fps), {config.memory.mode} attention, {dtype.name} on {_device()['kind']}", file=out,
          flush=True)

    embeddings = _prompt_embeddings(plan)
    if plan.checkpoint is None:
      model = CausalWanModel(config, rngs=nnx.Rngs(options.seed), dtype=dtype)
    else:
      model = wan_dit.restore_model(plan.checkpoint, memory=config.memory, dtype=dtype,
                                    init_missing_gates=options.init_missing_gates)
    mesh = None if plan.mesh is None else sharding.make_mesh(plan.mesh["data"], plan.mesh["model"])
    retrieval = options.retrieval_stats and config.memory.mode == "omnimem"
    rollout = Rollout(model, SamplerConfig(), batch_size=plan.batch_size, store_dtype=dtype, retrieval=retrieval,
                      mesh=mesh)
    starts = [prompt.chunk for prompt in plan.prompts] or [0]
    prompts = [(chunk, rollout.cross_kv(np.broadcast_to(e, (plan.batch_size, *e.shape[1:]))))
               for chunk, e in zip(starts, embeddings, strict=True)]

    vae = None if plan.vae is None else wan_vae.restore_vae(plan.vae)
    decode = None if vae is None else jit_decode_chunk(vae)
    cache = None if vae is None else checkpoints.place_like_params(
        vae, vae.init_decode_cache(plan.batch_size, config.latent_height, config.latent_width))

    latents, histograms, wall, decode_seconds = [], [], [], 0.0
    for segment in rollout.stream(prompts, plan.num_chunks, options.seed, recache_chunks=plan.recache_chunks):
      chunk_start = time.perf_counter() - segment.seconds
      chunk_latents = np.asarray(segment.latents, np.float32)  # [B, C, 3, H, W]
      if vae is None:
        video = visualise_latents(chunk_latents, first=segment.first_chunk == 0)
      else:
        frames, cache = decode(jnp.moveaxis(jnp.asarray(chunk_latents), 1, -1), cache, first=segment.first_chunk == 0)
        video = np.asarray(to_uint8(frames))
      writer.write(tile_batch(video))
      latents.append(chunk_latents)
      if segment.retrieval is not None:
        histograms.append(np.asarray(segment.retrieval))
      wall.append(time.perf_counter() - chunk_start)
      decode_seconds += wall[-1] - segment.seconds
      remaining = plan.num_chunks - len(wall)  # chunk 0 also compiles: estimate from the later ones
      eta = remaining * float(np.mean(wall[1:])) if len(wall) > 1 else None if remaining else 0.0
      print(_format_progress(segment.first_chunk, plan.num_chunks, segment.seconds, video.shape[1], eta),
            file=progress, flush=True)
    peak_bytes = _peak_memory_bytes()

  all_latents = np.concatenate(latents, axis=2)
  if plan.latents is not None:
    _atomic_write(plan.latents, lambda file: np.save(file, all_latents))
  chunk_seconds = [seconds for _, _, seconds in rollout.timings]
  dit_seconds = sum(chunk_seconds)
  steady_fps = ((plan.frames - video_frames_of_chunks(1, config)) / sum(chunk_seconds[1:])
                if len(chunk_seconds) > 1 else None)
  in_memory = int(np.sum(np.asarray(rollout.store.slot_chunk) >= 0))
  total_seconds = time.perf_counter() - start
  report = {
      "smoke": plan.smoke,
      "notes": list(plan.notes),
      "output": str(plan.output),
      "latents": None if plan.latents is None else str(plan.latents),
      "inputs": {
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
      },
      "config": {"model": _architecture(config), "memory": dataclasses.asdict(config.memory),
                 "sampler": dataclasses.asdict(rollout.sampler), "dtype": dtype.name, "batch_size": plan.batch_size,
                 "mesh": plan.mesh},
      "video": {"chunks": plan.num_chunks, "latent_frames": all_latents.shape[2], "frames": plan.frames,
                "requested_frames": plan.requested_frames, "seconds": plan.frames / config.fps, "fps": config.fps,
                "height": plan.height, "width": plan.width,
                "pixels": "latent_visualisation" if vae is None else "vae"},
      "timing": {
          "chunk_seconds": chunk_seconds,
          "note": "DiT seconds per chunk (Rollout.timings); chunk 0 includes compilation, a prompt switch its "
                  "KV recache",
          "dit_seconds": dit_seconds,
          "dit_fps": plan.frames / dit_seconds,
          "dit_fps_after_first_chunk": steady_fps,
          "decode_and_write_seconds": decode_seconds,
          "end_to_end_seconds": total_seconds,
          "end_to_end_fps": plan.frames / total_seconds,
          "compilations": rollout.traces,
      },
      "memory": {"capacity_chunks": config.memory.capacity_chunks, "chunks_in_memory": in_memory,
                 "chunks_dropped": plan.num_chunks - in_memory,
                 "store_bytes": store_bytes(config, plan.batch_size, dtype.itemsize),
                 "peak_device_bytes": peak_bytes},
      "retrieval": retrieval_summary(np.concatenate(histograms), config.memory.window_chunks) if histograms else None,
      "versions": _versions(),
      "device": _device(),
  }
  _atomic_write(plan.report, lambda file: file.write((json.dumps(report, indent=2) + "\n").encode()))
  print(f"{'SMOKE RUN (random weights): ' if plan.smoke else ''}wrote {plan.output} ({plan.frames} frames, "
        f"{plan.width}x{plan.height}) and {plan.report}; DiT {dit_seconds:.2f} s = "
        f"{report['timing']['dit_fps']:.1f} FPS"
        + (f" ({steady_fps:.1f} FPS after chunk 0, which compiles)" if steady_fps else "")
        + f"; end to end {total_seconds:.1f} s; {report['memory']['chunks_dropped']} chunks dropped from memory",
        file=out)
  return report


def generate(options: GenerateOptions, **kwargs: Any) -> dict[str, Any]:
  """plan + run: validates, then generates; returns the report."""
  return run(plan(options), **kwargs)

