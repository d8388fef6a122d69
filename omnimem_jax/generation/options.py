"""What a generation run is asked to do: the options (one per `experiments/generate.py` flag), a prompt
switch of a prompt schedule, and the error every piece of bad input raises."""

from __future__ import annotations

import dataclasses

DEFAULT_SECONDS = 10.0  # video length when neither --seconds nor --num_frames is given
# The default --output: the demo model (experiments/generate.py without model flags), a smoke run (random
# weights), or any other model; so a smoke run never replaces the demo's video.
DEMO_OUTPUT = "outputs/demo.mp4"
SMOKE_OUTPUT = "outputs/smoke.mp4"
MODEL_OUTPUT = "outputs/video.mp4"
DEFAULT_PRESET = "tiny"
MAX_SEED = 2**32 - 1  # noise seeds are uint32
# --model_dir layout: component -> subdirectory.
MODEL_DIR_LAYOUT = {"checkpoint": "dit", "vae": "vae", "text_encoder": "text_encoder", "tokenizer": "tokenizer"}


class GenerateError(ValueError):
  """Bad input: the message says what is wrong and what to do (one line)."""


class DoesNotFit(GenerateError):
  """The run needs more device memory than there is. The message is the one-line refusal (the numbers and the
  settings that would fit); `table` is the memory plan (`omnimem_jax.budget.MemoryPlan.table`), which
  the command line prints before it."""

  def __init__(self, message: str, table: str):
    super().__init__(message)
    self.table = table


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
  """Everything `experiments/generate.py` takes as flags (None: the default that the rule names).

  Attributes:
    checkpoint: Orbax DiT checkpoint (experiments/convert_checkpoint.py); None: random weights.
    preset: architecture of the random weights (default "tiny"); with a checkpoint, it must match it.
    prompt / prompt_file / text_embeddings: conditioning, at most one. The prompt file has lines
      `latent_frame: prompt`; None of them: a random embedding from the seed.
    seconds / num_frames: video length (16 fps), at most one; default DEFAULT_SECONDS.
    seed: noise seed (and seed of random weights and of a random embedding), 0 .. MAX_SEED.
    attention: "omnimem", "window", "sink_window" or "dense" (default: the checkpoint's mode, or omnimem).
    top_k, window_chunks, exclude_window_chunks, group_size: MemoryConfig overrides.
    capacity_chunks: KV store slots (default: every requested chunk, i.e. full history).
    recache_frames: latent frames re-encoded under a new prompt at a switch (rounded down to chunks).
    output: mp4 path (default: SMOKE_OUTPUT for random weights, else MODEL_OUTPUT); report: JSON path
      (default: output with .json); save_latents: optional .npy path.
    vae, text_encoder, tokenizer: converted VAE / umT5 checkpoints and the tokenizer directory.
    model_dir: a directory laid out as MODEL_DIR_LAYOUT; fills the four paths above that are not given.
    init_missing_gates: omnimem mode from a checkpoint without gates (untrained gates).
    dtype: compute and KV-store dtype: "float32", "bfloat16", or None (float32 on CPU, else bfloat16).
    kv_dtype: the KV store's full-resolution tier in omnimem mode: "bf16" (plain, at dtype), or compact "fp8" /
      "int4" (`omnimem_jax.memory.store`); None: bf16. Other modes keep bf16.
    retrieval_stats: record per-layer retrieval histograms in omnimem mode (from the selected ids).
    mesh: e.g. "data=2,model=2": shard the batch over "data" and the heads (weights, KV store) over
      "model" (`omnimem_jax.sharding`); None runs on one device.
    batch_size: videos generated side by side (each its own noise); default: the embeddings' batch, or 1.
    backends: the kernel backend of each op, e.g. "selection=triton,dense=mosaic_gpu+xla"
      (`omnimem_kernels.backends.Backends.parse`); None: every op's per-platform default.
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
  output: str | None = None
  report: str | None = None
  save_latents: str | None = None
  vae: str | None = None
  text_encoder: str | None = None
  tokenizer: str | None = None
  model_dir: str | None = None
  init_missing_gates: bool = False
  dtype: str | None = None
  kv_dtype: str | None = None
  retrieval_stats: bool = True
  mesh: str | None = None
  batch_size: int | None = None
  backends: str | None = None


@dataclasses.dataclass(frozen=True)
class PromptSwitch:
  """A prompt and where it starts: latent frame as written, and the chunk it takes effect at."""

  latent_frame: int
  chunk: int
  text: str
