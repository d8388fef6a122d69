"""Validation and planning of a generation run: every flag, file and combination is checked before any
weights load (only JSON checkpoint records, the text-embeddings .npy, which is small, and the prompt file
are read), and the run is resolved into a `Plan`: paths, the model config, the length in chunks, the
conditioning, the outputs, and the memory plan (`omnimem_jax.budget`: the bytes of every part
against the device's memory). Any bad input raises `GenerateError` with a one-line message; a run that
cannot fit, `DoesNotFit`, whose message also names settings that would."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, NoReturn

import jax
import numpy as np
from omnimem_kernels.backends import Backends

from omnimem_jax import budget, checkpoints
from omnimem_jax.config import ATTENTION_MODES, PRESETS, ModelConfig
from omnimem_jax.convert import wan_dit
from omnimem_jax.data.synthetic import WorldConfig
from omnimem_jax.generation.options import (DEFAULT_PRESET, DEFAULT_SECONDS, MAX_SEED, MODEL_DIR_LAYOUT, MODEL_OUTPUT,
                                            SMOKE_OUTPUT, DoesNotFit, GenerateError, GenerateOptions, PromptSwitch)
from omnimem_jax.memory import store
from omnimem_jax.model.vae import VAEConfig

LATENT_PIXEL_SCALE = 8  # the latent visualisation's upsampling (as the Wan VAE's spatial compression)
MAX_COMPARED = 4  # models side by side in one comparison


@dataclasses.dataclass(frozen=True)
class Plan:
  """A validated run: resolved paths, the model config, the length in chunks, the conditioning, the memory plan."""

  options: GenerateOptions
  config: ModelConfig
  dtype: str  # compute and KV-store dtype
  kv_format: str  # the KV store's full-resolution tier: "bf16" (plain, at dtype), "fp8" or "int4"
  param_dtype: str  # the DiT's weights: the checkpoint's, or float32 for random weights
  checkpoint: Path | None
  vae: Path | None
  vae_config: VAEConfig | None
  text_encoder: Path | None
  tokenizer: Path | None
  conditioning: str  # "prompt", "text_embeddings" or "random_embedding"
  prompts: tuple[PromptSwitch, ...]
  batch_size: int
  mesh: dict[str, int] | None  # ("data", "model") axis sizes, or None for one device
  backends: Backends  # the kernel backend of each op (None fields: per-platform defaults)
  num_chunks: int
  requested_frames: int
  output: Path
  report: Path
  latents: Path | None
  pixel_scale: int  # video pixels per latent pixel (the VAE's spatial compression; 8 for the visualisation)
  notes: tuple[str, ...]
  world: WorldConfig | None = None  # the synthetic world the checkpoint was trained on (its revisits are known)
  trained_chunks: int | None = None  # chunks per training clip of a trained checkpoint
  memory: budget.MemoryPlan | None = None  # what the run holds per device (set once every flag is valid)

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

  @property
  def retrieval(self) -> bool:
    """Whether the rollout records retrieval histograms (omnimem mode, unless --noretrieval_stats)."""
    return self.options.retrieval_stats and self.config.memory.mode == "omnimem"


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


def length_flag(num_chunks: int, config: ModelConfig, *, frames: bool = False) -> str:
  """The flag that asks for `num_chunks` chunks: --num_frames with `frames`, else --seconds (rounded down
  to hundredths, so that it rounds up to those chunks' frames and no more)."""
  video_frames = video_frames_of_chunks(num_chunks, config)
  if frames:
    return f"--num_frames={video_frames}"
  return f"--seconds={math.floor(video_frames / config.fps * 100) / 100:.2f}"


def max_candidate_blocks(config: ModelConfig, num_chunks: int) -> int:
  """The most blocks one (query group, head) can select from in a run of `num_chunks` chunks (omnimem
  mode): chunk c's candidates are the stored chunks 0..c - exclude_window_chunks (0..c while c <
  exclude_window_chunks with progressive exclusion: `select.candidate_blocks`), and the store holds
  only the last capacity_chunks chunks. A larger top_k only pads the selection (and costs time)."""
  memory = config.memory
  most = 0
  for chunk in range(num_chunks):
    last = chunk - memory.exclude_window_chunks
    if memory.progressive_exclude and chunk < memory.exclude_window_chunks:
      last = chunk
    oldest = max(0, chunk - memory.capacity_chunks + 1)
    most = max(most, last - oldest + 1)
  return most * config.blocks_per_chunk


def architecture(config: ModelConfig) -> dict[str, Any]:
  """The config without its memory settings (which a run may change)."""
  fields = config.to_dict()
  fields.pop("memory")
  return fields


# ---- single checks ---------------------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
  raise GenerateError(message)


def _existing_dir(path: str, flag: str) -> Path:
  directory = Path(path)
  if not directory.exists():
    _fail(f"{flag}={path} does not exist")
  if not directory.is_dir():
    _fail(f"{flag}={path} is not a directory")
  return directory


def _record(path: str, flag: str, kind: checkpoints.Kind) -> tuple[Path, checkpoints.CheckpointRecord]:
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


def _prompt_lines(path: str) -> list[str]:
  """The prompt file's lines, refusing a missing or unreadable file and one that is not UTF-8 text."""
  file = Path(path)
  if not file.is_file():
    _fail(f"--prompt_file={path} does not exist")
  try:
    return file.read_text(encoding="utf-8").splitlines()
  except UnicodeDecodeError as err:
    raise GenerateError(f"--prompt_file={path} is not UTF-8 text: byte {err.object[err.start]:#04x} at offset "
                        f"{err.start}; save it as UTF-8") from err
  except OSError as err:
    raise GenerateError(f"--prompt_file={path} cannot be read: {err.strerror}") from err


def read_prompt_file(path: str, frames_per_chunk: int) -> tuple[list[PromptSwitch], list[str]]:
  """Parses `latent_frame: prompt` lines (blank lines and '#' comments skipped); returns the switches
  and notes about frames rounded down to a chunk boundary."""
  switches: list[PromptSwitch] = []
  notes = []
  for number, line in enumerate(_prompt_lines(path), start=1):
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
  """Batch size of a text-embeddings .npy ([tokens, text_dim] or [B, tokens, text_dim]), refusing other
  shapes, non-float dtypes and NaN or inf values (which would give a black video, not an error)."""
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
  bad = ~np.isfinite(array)
  if bad.any():
    _fail(f"--text_embeddings={path} holds {int(bad.sum())} NaN or infinite values (the first at index "
          f"{np.argwhere(bad)[0].tolist()}); a text encoder's output is finite: recompute the embeddings")
  return 1 if len(shape) == 2 else shape[0]


def _requested_frames(options: GenerateOptions, config: ModelConfig) -> tuple[int, str]:
  """(video frames asked for, the flag as given): --num_frames, or --seconds (a finite number > 0) at
  the config's fps, rounded up to a whole frame."""
  if options.seconds is not None and options.num_frames is not None:
    _fail("give --seconds or --num_frames, not both")
  if options.num_frames is not None:
    if options.num_frames < 1:
      _fail(f"--num_frames must be >= 1, got {options.num_frames}")
    return options.num_frames, f"--num_frames={options.num_frames}"
  seconds = DEFAULT_SECONDS if options.seconds is None else options.seconds
  frames = seconds * config.fps
  if not (seconds > 0 and math.isfinite(frames)):
    _fail(f"--seconds must be a finite number > 0, got {seconds}")
  return math.ceil(frames - 1e-9), f"--seconds={seconds:g}"


def _length(options: GenerateOptions, config: ModelConfig) -> tuple[int, int]:
  """(requested video frames, chunks), refusing lengths past the RoPE table. The longest video is
  named as flags that are accepted (its seconds rounded down, so that they round up to its frames)."""
  frames, asked = _requested_frames(options, config)
  num_chunks = chunks_for_frames(frames, config)
  if num_chunks > config.max_chunks:
    longest = video_frames_of_chunks(config.max_chunks, config)
    _fail(f"{asked} needs {num_chunks} chunks ({num_chunks * config.memory.frames_per_chunk} latent frames), past "
          f"the RoPE horizon of {config.rope_max_frames} latent frames ({config.max_video_seconds:.1f} s); the "
          f"longest video is {config.max_chunks} chunks = {longest} frames: "
          f"{length_flag(config.max_chunks, config, frames=True)} or {length_flag(config.max_chunks, config)}")
  return frames, num_chunks


def _mesh(text: str, config: ModelConfig, batch_size: int) -> dict[str, int]:
  """--mesh parsed and checked against the visible devices, the heads and the batch."""
  from omnimem_jax import sharding  # noqa: PLC0415 (starts JAX's backends: only when a mesh is asked for)

  try:
    sizes = sharding.parse_mesh(text)
    sharding.make_mesh(sizes["data"], sizes["model"], config=config, batch_size=batch_size)
  except ValueError as err:
    _fail(f"--mesh={text}: {err}")
  return sizes


def _backends(text: str | None) -> Backends:
  """--backends parsed (`Backends.parse`): known ops and backend names only."""
  try:
    return Backends() if text is None else Backends.parse(text)
  except ValueError as err:
    raise GenerateError(f"--backends={text}: {err}") from err


# ---- the parts of a plan ---------------------------------------------------------------------------


def _model_paths(options: GenerateOptions) -> dict[str, str | None]:
  """The checkpoint, VAE, text encoder and tokenizer paths: the flags, filled from --model_dir."""
  fill = dict.fromkeys(MODEL_DIR_LAYOUT)
  if options.model_dir is not None:
    model_dir = _existing_dir(options.model_dir, "--model_dir")
    if not (model_dir / MODEL_DIR_LAYOUT["checkpoint"]).is_dir():
      _fail(f"--model_dir={options.model_dir} has no {MODEL_DIR_LAYOUT['checkpoint']}/ (the converted DiT); "
            f"expected subdirectories {', '.join(d + '/' for d in MODEL_DIR_LAYOUT.values())}")
    fill = {name: str(model_dir / sub) if (model_dir / sub).is_dir() else None
            for name, sub in MODEL_DIR_LAYOUT.items()}
  return {name: getattr(options, name) or fill[name] for name in MODEL_DIR_LAYOUT}


def _check_flags(options: GenerateOptions, paths: dict[str, str | None]) -> None:
  """Conflicting or incomplete flags."""
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
  if options.batch_size is not None and options.batch_size < 1:
    _fail(f"--batch_size must be >= 1, got {options.batch_size}")
  if not 0 <= options.seed <= MAX_SEED:
    _fail(f"--seed must be in 0..{MAX_SEED} (a 32-bit noise seed), got {options.seed}")


def _base_config(options: GenerateOptions, checkpoint: Path | None, record: checkpoints.CheckpointRecord | None
                 ) -> ModelConfig:
  """The checkpoint's config (refusing a different --preset), or the preset's for random weights."""
  if options.preset is not None and options.preset not in PRESETS:
    _fail(f"--preset={options.preset} is unknown; choose one of {sorted(PRESETS)}")
  if record is None:
    return ModelConfig.from_preset(options.preset or DEFAULT_PRESET)
  try:
    config = ModelConfig.from_dict(record.config)
  except (KeyError, TypeError, ValueError) as err:
    raise GenerateError(f"--checkpoint={checkpoint} holds an unreadable model config: {err}") from err
  if options.preset is not None:
    saved, wanted = architecture(config), architecture(ModelConfig.from_preset(options.preset))
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
    pooled = max(num_chunks, capacity) if memory.mode == "omnimem" else None  # the whole video's pooled K/V
    config = dataclasses.replace(config, memory=dataclasses.replace(memory, capacity_chunks=capacity,
                                                                    pooled_chunks=pooled))
  except ValueError as err:
    raise GenerateError(f"memory flags: {err}") from err
  if options.top_k is not None and config.memory.mode == "omnimem":
    _check_top_k(options.top_k, config, num_chunks)
  return config


def _check_top_k(top_k: int, config: ModelConfig, num_chunks: int) -> None:
  """Refuses a --top_k above the blocks a query group can select from in this run (`max_candidate_blocks`):
  the extra picks would be padding, at the cost of a larger top-k (a 1 s video once took 249 s)."""
  most = max_candidate_blocks(config, num_chunks)
  if top_k > most:
    memory = config.memory
    _fail(f"--top_k={top_k} exceeds the {most} blocks a query group can select from in this run "
          f"({most // config.blocks_per_chunk} chunks of {config.blocks_per_chunk} blocks at most: {num_chunks} "
          f"chunks, capacity_chunks {memory.capacity_chunks}, exclude_window_chunks "
          f"{memory.exclude_window_chunks}); the maximum is --top_k={most}")


def _dit(options: GenerateOptions, path: str | None
         ) -> tuple[Path | None, checkpoints.CheckpointRecord | None, ModelConfig, int, int]:
  """(checkpoint, its record, the config to run, requested frames, chunks): the DiT's record read, the
  length and the memory flags applied, the gates rule checked (untrained gates: restoring warns, and the
  run turns that warning into a note)."""
  checkpoint = record = None
  if path is not None:
    checkpoint, record = _record(path, "--checkpoint", checkpoints.Kind.DIT)
    try:
      wan_dit.check_checkpoint(checkpoint)  # weights present and of the config's shapes, before any work
    except checkpoints.CheckpointError as err:
      raise GenerateError(f"--checkpoint: {err}") from err
  base = _base_config(options, checkpoint, record)
  requested_frames, num_chunks = _length(options, base)
  config = _with_memory_flags(options, base, num_chunks)
  if record is not None:
    saved_mode = record.config["memory"]["mode"]
    try:
      wan_dit.gates_to_initialise(config.memory.mode, bool(record.has_gates), allow=options.init_missing_gates,
                                  source=f"--checkpoint={path}",
                                  remedy=f"it was converted for {saved_mode} mode: pass --attention={saved_mode}, "
                                         "or --init_missing_gates to start omnimem mode from untrained gates")
    except ValueError as err:
      raise GenerateError(str(err)) from err
  return checkpoint, record, config, requested_frames, num_chunks


def _training(record: checkpoints.CheckpointRecord | None) -> tuple[WorldConfig | None, int | None]:
  """(the synthetic world, chunks per training clip) a trained checkpoint records, each None if unknown."""
  training = (record.training if record is not None else None) or {}
  try:
    world = WorldConfig.from_dict(training["world"]) if "world" in training else None
  except (TypeError, ValueError) as err:
    raise GenerateError(f"--checkpoint: the training record's world is unreadable: {err}") from err
  chunks = training.get("num_chunks")
  return world, chunks if isinstance(chunks, int) and chunks > 0 else None


def _vae(path: str | None, config: ModelConfig) -> tuple[Path | None, VAEConfig | None, int]:
  """(VAE checkpoint, its config, video pixels per latent pixel); a VAE must decode the DiT's latent channels."""
  if path is None:
    return None, None, LATENT_PIXEL_SCALE
  vae, record = _record(path, "--vae", checkpoints.Kind.VAE)
  try:
    vae_config = VAEConfig.from_dict(record.config)
  except (KeyError, TypeError, ValueError) as err:
    raise GenerateError(f"--vae={path} holds an unreadable VAE config: {err}") from err
  if vae_config.z_dim != config.out_channels:
    _fail(f"--vae={path} has {vae_config.z_dim} latent channels but the DiT makes {config.out_channels}")
  return vae, vae_config, vae_config.spatial_compression


def _text(paths: dict[str, str | None], config: ModelConfig) -> tuple[Path, Path]:
  """(text encoder checkpoint, tokenizer directory), checked against the DiT's text input."""
  text_encoder, record = _record(paths["text_encoder"], "--text_encoder", checkpoints.Kind.TEXT_ENCODER)
  text_dim, text_len = record.config.get("dim"), record.config.get("text_len")
  if text_dim != config.text_dim or text_len is None or text_len > config.text_len:
    _fail(f"--text_encoder={paths['text_encoder']} gives [{text_len}, {text_dim}] embeddings; the DiT takes "
          f"up to {config.text_len} tokens of width {config.text_dim}")
  tokenizer = _existing_dir(paths["tokenizer"], "--tokenizer")
  if not ((tokenizer / "tokenizer.json").is_file() or (tokenizer / "spiece.model").is_file()):
    _fail(f"--tokenizer={paths['tokenizer']} holds neither tokenizer.json nor spiece.model")
  return text_encoder, tokenizer


def _conditioning(options: GenerateOptions, config: ModelConfig, num_chunks: int
                  ) -> tuple[str, list[PromptSwitch], int, list[str]]:
  """(conditioning kind, prompt switches, batch size, notes); the batch: --batch_size, else the
  embeddings' batch, else 1."""
  notes: list[str] = []
  batch_size = 1
  if options.prompt_file is not None:
    prompts, notes = read_prompt_file(options.prompt_file, config.memory.frames_per_chunk)
    if prompts[-1].chunk >= num_chunks:
      _fail(f"--prompt_file={options.prompt_file}: the prompt at latent frame {prompts[-1].latent_frame} starts "
            f"after the video ends ({num_chunks} chunks = {num_chunks * config.memory.frames_per_chunk} latent "
            "frames)")
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
    if batch_size > 1 and options.batch_size != batch_size:
      _fail(f"--batch_size={options.batch_size} contradicts --text_embeddings, which holds a batch of {batch_size}")
    batch_size = options.batch_size
  return conditioning, prompts, batch_size, notes


def _outputs(options: GenerateOptions, smoke: bool) -> tuple[Path, Path, Path | None]:
  """(mp4, report, latents or None): writable, distinct files; the default mp4 of a smoke run is
  SMOKE_OUTPUT, so that it never replaces a model's video."""
  output = _writable_file(options.output or (SMOKE_OUTPUT if smoke else MODEL_OUTPUT), "--output", ".mp4")
  report = _writable_file(options.report or str(output.with_suffix(".json")), "--report", ".json")
  latents = None if options.save_latents is None else _writable_file(options.save_latents, "--save_latents", ".npy")
  named = [output, report] + ([latents] if latents else [])
  if len({path.resolve() for path in named}) < len(named):
    _fail(f"--output, --report and --save_latents must be different files, got {', '.join(map(str, named))}")
  return output, report, latents


def _notes(plan: Plan) -> tuple[str, ...]:
  """The plan's notes with what the run will round, drop or show instead (the smoke label first)."""
  config, notes = plan.config, list(plan.notes)
  if plan.frames != plan.requested_frames:
    notes.append(f"{plan.requested_frames} frames requested: rounded up to {plan.num_chunks} whole chunks = "
                 f"{plan.frames} frames ({plan.frames / config.fps:.2f} s; chunk 0 gives 9 frames, every later "
                 "chunk 12)")
  if config.memory.capacity_chunks < plan.num_chunks:
    notes.append(f"capacity {config.memory.capacity_chunks} chunks < {plan.num_chunks} chunks: the KV store reuses "
                 f"slots, dropping {plan.num_chunks - config.memory.capacity_chunks} chunks from memory")
  if plan.trained_chunks is not None and plan.num_chunks > plan.trained_chunks:
    trained = video_frames_of_chunks(plan.trained_chunks, config) / config.fps
    notes.append(f"the video is {plan.num_chunks} chunks ({plan.frames / config.fps:.1f} s) long, the model was "
                 f"trained on clips of {plan.trained_chunks} chunks ({trained:.1f} s): past that it extrapolates "
                 "and may drift")
  if plan.vae is None:
    notes.append("no VAE: the video shows latent channels 0-2 over [-3, 3], upsampled 8x in space and 4x in time")
  if plan.smoke:
    notes.insert(0, f"SMOKE RUN: random weights ({plan.options.preset or DEFAULT_PRESET} preset), no checkpoint: "
                    "this tests the pipeline; the pictures mean nothing")
  return tuple(notes)


def kv_format(requested: str | None, mode: str, compared: bool) -> tuple[str, list[str]]:
  """The KV store's full-resolution format for a model in `mode` (and notes): --kv_dtype, else bf16 (the
  compact kernels have not yet run on a GPU: fp8 becomes the GPU default once they have; `memory.store`). A
  compact format asked for a baseline is refused, or in a comparison (`compared`) kept for the omnimem models
  only, with a note."""
  if requested is not None and requested not in store.KV_FORMATS:
    _fail(f"--kv_dtype={requested} is unknown; choose one of {list(store.KV_FORMATS)}")
  if mode == "omnimem":
    return requested or "bf16", []
  if requested in (None, "bf16"):
    return "bf16", []
  if not compared:
    _fail(f"--kv_dtype={requested} compacts the K/V omnimem's selection reads; {mode} mode reads its whole history "
          "densely: use --kv_dtype=bf16")
  return "bf16", [f"--kv_dtype={requested} applies to the omnimem models; this {mode} model keeps a bf16 store"]


def _validated(options: GenerateOptions, compared: bool = False) -> Plan:
  """Every flag, file and combination checked, without loading weights (the plan has no memory plan yet);
  raises GenerateError. `compared`: one model of a side-by-side comparison."""
  paths = _model_paths(options)
  _check_flags(options, paths)
  backends = _backends(options.backends)
  checkpoint, record, config, requested_frames, num_chunks = _dit(options, paths["checkpoint"])
  world, trained_chunks = _training(record)
  vae, vae_config, pixel_scale = _vae(paths["vae"], config)
  wants_text = options.prompt is not None or options.prompt_file is not None
  text_encoder, tokenizer = _text(paths, config) if wants_text else (None, None)
  conditioning, prompts, batch_size, notes = _conditioning(options, config, num_chunks)
  mesh = None if options.mesh is None else _mesh(options.mesh, config, batch_size)
  output, report, latents = _outputs(options, smoke=checkpoint is None)
  dtype = options.dtype or ("float32" if jax.devices()[0].platform == "cpu" else "bfloat16")
  param_dtype = (record.param_dtype if record is not None else None) or "float32"
  store_format, format_notes = kv_format(options.kv_dtype, config.memory.mode, compared)
  notes = [*notes, *format_notes]
  validated = Plan(options=options, config=config, dtype=dtype, kv_format=store_format, param_dtype=param_dtype,
                   checkpoint=checkpoint,
                   vae=vae, vae_config=vae_config, text_encoder=text_encoder, tokenizer=tokenizer,
                   conditioning=conditioning, prompts=tuple(prompts), batch_size=batch_size, mesh=mesh,
                   backends=backends, num_chunks=num_chunks, requested_frames=requested_frames, output=output,
                   report=report, latents=latents, pixel_scale=pixel_scale, notes=tuple(notes), world=world,
                   trained_chunks=trained_chunks)
  return dataclasses.replace(validated, notes=_notes(validated))


# ---- the memory plan -------------------------------------------------------------------------------


def run_shape(plans: tuple[Plan, ...]) -> budget.RunShape:
  """What the bytes of these plans' run (one model, or a comparison) depend on (`budget.RunShape`)."""
  first = plans[0]
  return budget.RunShape(
      dits=tuple(budget.DiT(plan.config, plan.param_dtype, plan.retrieval, plan.kv_format) for plan in plans),
      batch_size=first.batch_size, dtype=first.dtype, prompts=max(1, len(first.prompts)),
      recache_chunks=first.recache_chunks, vae=first.vae_config,
      mesh=None if first.mesh is None else (first.mesh["data"], first.mesh["model"]), backends=first.backends)


def _fitting_settings(first: Plan, run: budget.RunShape, memory: budget.MemoryPlan) -> str:
  """The refusal's advice, "try A or B": at most two settings with which the run fits, a compact KV store, a
  shorter video (where the store holds the whole video, the default), fewer store slots (dropping the oldest
  chunks from memory), more devices; or that nothing does."""
  config, options, settings = first.config, first.options, []
  compact = budget.with_kv_format(run, "fp8")
  if compact != run and budget.plan_memory(compact, memory.capacity).fits():
    settings.append("--kv_dtype=fp8")
  if options.capacity_chunks is None:
    chunks = budget.capacity_that_fits(run, memory, shorter_video=True)
    if chunks is not None and chunks < config.memory.capacity_chunks:
      settings.append(length_flag(chunks, config, frames=options.num_frames is not None))
  slots = budget.capacity_that_fits(run, memory)
  if slots is not None and slots < config.memory.capacity_chunks:
    settings.append(f"--capacity_chunks={slots}")
  model = budget.model_axis_that_fits(run, memory)
  if model is not None:
    data = first.mesh["data"] if first.mesh else 1
    settings.append(f"--mesh=data={data},model={model} ({data * model} devices)")
  if not settings:
    return (f"not even the fewest store slots (--capacity_chunks={config.memory.min_capacity_chunks}) fit: it "
            "needs a device with more memory")
  return f"try {' or '.join(settings[:2])}"


def with_memory_plan(plans: tuple[Plan, ...]) -> tuple[Plan, ...]:
  """The plans of one run with its memory plan (`budget.plan_memory`: every part per device, against
  `budget.device_capacity`); DoesNotFit, naming the numbers and settings that would fit, when it does not."""
  run = run_shape(plans)
  try:
    capacity = budget.device_capacity(run.devices)
  except ValueError as err:
    raise GenerateError(str(err)) from err
  memory = budget.plan_memory(run, capacity)
  if not memory.fits():
    raise DoesNotFit(f"{memory.summary()}; {_fitting_settings(plans[0], run, memory)}", memory.table())
  return tuple(dataclasses.replace(plan, memory=memory) for plan in plans)


def plan(options: GenerateOptions) -> Plan:
  """Validates every flag, file and combination, then plans the run's memory, without loading weights;
  raises GenerateError (DoesNotFit for a run that cannot fit)."""
  return with_memory_plan((_validated(options),))[0]


def plan_runs(options: GenerateOptions) -> tuple[Plan, ...]:
  """The plans of one run: one, or one per checkpoint of a comma-separated --checkpoint, which generates
  the same video (seed, conditioning, length) with each model, side by side. The models of a comparison
  share their architecture and differ in attention mode; they share one memory plan (all of them at once).
  Raises GenerateError (DoesNotFit for a run that cannot fit)."""
  if options.checkpoint is None or "," not in options.checkpoint:
    return (plan(options),)
  paths = [path.strip() for path in options.checkpoint.split(",")]
  if not 2 <= len(paths) <= MAX_COMPARED or not all(paths):
    _fail(f"--checkpoint={options.checkpoint}: a comparison takes 2 to {MAX_COMPARED} checkpoints, comma-separated")
  for flag in ("attention", "save_latents", "mesh"):
    if getattr(options, flag) is not None:
      _fail(f"--{flag} does not apply to a comparison of several checkpoints (--checkpoint={options.checkpoint})")
  plans = tuple(_validated(dataclasses.replace(options, checkpoint=path), compared=True) for path in paths)
  first = plans[0]
  for other in plans[1:]:
    if architecture(other.config) != architecture(first.config) or other.batch_size != first.batch_size:
      _fail(f"--checkpoint: {other.checkpoint} and {first.checkpoint} differ in architecture; a comparison needs "
            "models of one architecture")
  modes = [p.config.memory.mode for p in plans]
  if len(set(modes)) < len(modes):
    _fail(f"--checkpoint: the compared models must differ in attention mode, got {modes}")
  return with_memory_plan(plans)
