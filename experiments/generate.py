r"""Generates a long video: prompt(s) in, mp4 and a JSON run report out (logic: omnimem_jax/generation/).

  python experiments/generate.py            # the committed demo model (assets/demo_checkpoint), ~10 s on a
                                            # CPU: outputs/demo.mp4 and outputs/demo.json
  python experiments/generate.py --checkpoint=runs/omnimem/export,runs/window/export --vae=assets/demo/vae
                                            # any models of one architecture side by side, labelled
  python experiments/generate.py --preset=tiny   # smoke run: random weights, tests the pipeline;
                                                 # outputs/smoke.mp4 (other models: outputs/video.mp4)
  python experiments/generate.py --model_dir=models/omnimem --prompt="a corgi surfing" --seconds=60 \
      --output=outputs/corgi.mp4
  python experiments/generate.py --model_dir=models/longlive --attention=sink_window \
      --prompt_file=prompts.txt --seconds=30          # lines `latent_frame: prompt`, KV recache at switches
  python experiments/generate.py --checkpoint=checkpoints/omnimem --text_embeddings=prompt.npy --num_frames=165
  python experiments/generate.py --model_dir=models/omnimem --prompt="a corgi surfing" --seconds=120 \
      --mesh=data=2,model=2 --batch_size=2     # 4 GPUs: 2 videos, each on 2 GPUs holding 6 heads apiece
  python experiments/generate.py --preset=tiny --backends=selection=triton+xla,dense=mosaic_gpu+xla
                                               # kernel backend per op; the report records what ran

Bad input (missing or mismatched checkpoints, wrong shapes, NaN or inf embeddings, lengths past the
RoPE horizon, a --top_k beyond the blocks there are to select, unwritable outputs, conflicting flags;
docs/bad_inputs.md lists them) gives one line `error: ...` on stderr and exit code 2, before any weights
are loaded. So does a run that cannot fit in device memory: its memory plan (weights, each KV-store tier,
VAE, the compiled steps' working sets; omnimem_jax/budget.py) goes to stdout, then the line with the
numbers and settings that would fit (a shorter video, fewer store slots, more devices). A run that fits
prints its plan first. On a GPU, JAX's memory pool takes 97% of the memory unless the user sets
XLA_PYTHON_CLIENT_MEM_FRACTION or another pool setting (environment.use_most_device_memory). A model that
makes NaN or inf latents stops the run the same way, naming the chunk. On an error, Ctrl-C or SIGTERM, no
partial file is left and existing outputs are untouched.
"""

import dataclasses
import signal
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from absl import app, flags
from omnimem_kernels.backends import OPS

from omnimem_jax import cli, environment, sharding
from omnimem_jax.config import ATTENTION_MODES, PRESETS
from omnimem_jax.generation import options, plan, run
from omnimem_jax.rollout import NonFiniteLatentsError

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Orbax DiT checkpoint (experiments/convert_checkpoint.py), or "
                                  "2-4 comma-separated ones of one architecture to compare side by side; none: the "
                                  "demo (assets/demo_checkpoint), or with --preset random weights (a smoke run).")
_PRESET = flags.DEFINE_string("preset", None, f"Architecture for random weights, one of {sorted(PRESETS)} "
                              f"(default {options.DEFAULT_PRESET}); with --checkpoint it must match it.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text prompt (needs --text_encoder and --tokenizer, or --model_dir).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "Prompt schedule: lines `latent_frame: prompt`; a prompt "
                                   "starts at chunk latent_frame // 3, after a KV recache of --recache_frames.")
_TEXT_EMBEDDINGS = flags.DEFINE_string("text_embeddings", None, "Precomputed umT5 output, .npy [tokens, text_dim] "
                                       "or [batch, tokens, text_dim] (a batch is tiled side by side).")
_SECONDS = flags.DEFINE_float("seconds", None, f"Video length in seconds at 16 fps (default "
                              f"{options.DEFAULT_SECONDS:g}); rounded up to whole chunks.")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", None, "Video length in frames (chunk 0 gives 9, later chunks 12); "
                                   "rounded up to whole chunks.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed (also of random weights and of a random embedding).")
_ATTENTION = flags.DEFINE_enum("attention", None, list(ATTENTION_MODES),
                               "Attention mode (default: the checkpoint's, or omnimem).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Blocks selected per (query group, head) (omnimem).")
_WINDOW_CHUNKS = flags.DEFINE_integer("window_chunks", None, "Sliding-window chunks, current included (omnimem).")
_EXCLUDE = flags.DEFINE_integer("exclude_window_chunks", None, "Adaptive Window Exclusion span; 0 turns it off.")
_GROUP_SIZE = flags.DEFINE_integer("group_size", None, "Queries sharing one selection (omnimem).")
_CAPACITY = flags.DEFINE_integer("capacity_chunks", None, "KV store slots (default: every chunk of the video, "
                                 "full history); fewer reuse slots and drop the oldest chunks.")
_RECACHE = flags.DEFINE_integer("recache_frames", 21, "Latent frames re-encoded under a new prompt at a switch.")
_OUTPUT = flags.DEFINE_string("output", None, f"mp4 to write (default: {options.DEMO_OUTPUT} for the demo model, "
                              f"{options.SMOKE_OUTPUT} for random weights, else {options.MODEL_OUTPUT}).")
_REPORT = flags.DEFINE_string("report", None, "JSON run report (default: --output with .json).")
_SAVE_LATENTS = flags.DEFINE_string("save_latents", None, "Also save the latents [B, C, frames, H, W] to this .npy.")
_VAE = flags.DEFINE_string("vae", None, "Converted Wan VAE checkpoint; none: a latent visualisation.")
_TEXT_ENCODER = flags.DEFINE_string("text_encoder", None, "Converted umT5 encoder checkpoint.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer directory (tokenizer.json or spiece.model).")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Directory with dit/, and optionally vae/, text_encoder/, "
                                 "tokenizer/ (explicit flags win).")
_INIT_MISSING_GATES = flags.DEFINE_bool("init_missing_gates", False, "omnimem mode from a checkpoint without "
                                        "gates: start them untrained (output not meaningful).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute and KV-store dtype (default: float32 "
                           "on CPU, else bfloat16).")
_KV_DTYPE = flags.DEFINE_enum("kv_dtype", None, ["bf16", "fp8", "int4"], "omnimem: the KV store's full-resolution "
                              "K/V, plain (bf16) or compact (fp8, int4: half, a quarter of the bytes; read only by "
                              "the selection); default bf16.")
_MESH = flags.DEFINE_string("mesh", None, "Devices as 'data=D,model=M': the batch over D, heads (weights and KV "
                            "store) over M (a divisor of the heads); default one device.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Videos side by side, each its own noise (default: the "
                                   "--text_embeddings batch, or 1); spread over the mesh's data axis.")
_RETRIEVAL_STATS = flags.DEFINE_bool("retrieval_stats", True, "omnimem: record per-layer retrieval histograms "
                                     "(from the ids the selection chose).")
_BACKENDS = flags.DEFINE_string("backends", None, f"Kernel backend per op ({', '.join(OPS)}), e.g. "
                                "'selection=triton,dense=mosaic_gpu+xla' ('+': a preference list); default: each "
                                "op's per-platform choice. The report records what was asked and what ran.")


DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "demo_checkpoint"


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
  """SIGTERM and SIGINT (Ctrl-C) end the run without a traceback: the exception unwinds through the atomic
  writers, which remove their partial files (exit code 128 + the signal's number, the shell's convention)."""
  del frame
  raise SystemExit(128 + signum)


def main(argv: Sequence[str]) -> None:
  environment.use_most_device_memory()  # before JAX starts its backends
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  fields = [field.name for field in dataclasses.fields(options.GenerateOptions)]
  asked = options.GenerateOptions(**{name: flags.FLAGS[name].value for name in fields})
  if asked.checkpoint is None and asked.model_dir is None and asked.preset is None and DEMO_CHECKPOINT.is_dir():
    # No model named: the demo model trained on the synthetic orbiting-camera world (README, "Training"),
    # so small that compiling it costs more than running it.
    asked = dataclasses.replace(asked, checkpoint=str(DEMO_CHECKPOINT), output=asked.output or options.DEMO_OUTPUT)
    environment.compile_without_llvm_optimisations()
  sharding.initialize_distributed()  # multi-host jobs: when the environment describes one
  try:
    plans = plan.plan_runs(asked)
  except options.GenerateError as err:
    if isinstance(err, options.DoesNotFit):
      print(err.table, flush=True)  # what the run would hold where, before the one-line refusal
    cli.fail(err)
  for stop in (signal.SIGTERM, signal.SIGINT):
    signal.signal(stop, _exit_on_signal)
  try:
    run.run(plans)
  except NonFiniteLatentsError as err:
    cli.fail(f"{err}; {plans[0].output} was not written (an existing file is untouched)")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
