"""Where a run happened: the device, the package versions, the git commit and the peak device
memory, recorded by the run report of `generate.py` and by every benchmark's JSON; how XLA
compiles tiny programs; and how much of a GPU JAX's memory pool may take."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path

import jax

REPO_ROOT = Path(__file__).resolve().parents[1]
VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "numpy", "orbax-checkpoint")
# XLA's compiler option for compiling without LLVM's optimisations, and the same as an XLA_FLAGS flag.
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
# JAX's GPU memory pool as a fraction of each GPU's memory (JAX's default: 75%), and the settings by which a user
# chooses it or the allocator (https://docs.jax.dev/en/latest/gpu_memory_allocation.html). XLA_CLIENT_MEM_FRACTION is
# the name newer JAX reads first; it refuses both fraction variables at once, and older JAX reads only the other.
MEMORY_FRACTION = 0.97
MEMORY_FRACTION_VARIABLE = "XLA_PYTHON_CLIENT_MEM_FRACTION"
MEMORY_POOL_VARIABLES = ("XLA_CLIENT_MEM_FRACTION", MEMORY_FRACTION_VARIABLE, "XLA_PYTHON_CLIENT_PREALLOCATE",
                         "XLA_PYTHON_CLIENT_ALLOCATOR")
MEMORY_POLICY_FLAG = "xla_gpu_memory_fraction_policy"


def compile_without_llvm_optimisations() -> None:
  """Has XLA compile without LLVM's optimisations, for programs so small that compiling them costs more
  than running them: the demo's models on a CPU (the three-model comparison at 14 chunks: 110 s -> 47 s on 2 cores)
  and the tests' tiny ones. Floating-point semantics do not change. A level already in XLA_FLAGS wins.
  Takes effect only before JAX creates its backends (the first device query or array)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE_FLAG}".strip()


def use_most_device_memory() -> None:
  """Lets JAX's GPU memory pool take MEMORY_FRACTION (97%) of each GPU instead of JAX's default 75%, so a
  long video's KV store fits (an 80-chunk 1.3B run on an 80 GB H100 needs more than 75%). A user's own
  choice wins: nothing changes when any of MEMORY_POOL_VARIABLES is set, or XLA_FLAGS names a memory
  fraction policy. The command-line tools that run a rollout call it first thing; it takes effect only
  before JAX creates its backends (the first device query or array). CPUs ignore it."""
  if any(name in os.environ for name in MEMORY_POOL_VARIABLES) or MEMORY_POLICY_FLAG in os.environ.get(
      "XLA_FLAGS", ""):
    return
  os.environ[MEMORY_FRACTION_VARIABLE] = str(MEMORY_FRACTION)


def memory_pool_setting() -> str:
  """The settings that size JAX's GPU memory pool, as set, e.g. "XLA_PYTHON_CLIENT_MEM_FRACTION=0.97", or
  "JAX's default pool" when none is."""
  chosen = [f"{name}={os.environ[name]}" for name in MEMORY_POOL_VARIABLES if name in os.environ]
  chosen += [flag for flag in os.environ.get("XLA_FLAGS", "").split() if MEMORY_POLICY_FLAG in flag]
  return ", ".join(chosen) or "JAX's default pool"


def peak_device_bytes() -> int | None:
  """Peak bytes in use on the first device so far, or None where the backend keeps no statistics (CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else int(peak)


def _command_output(*command: str) -> str | None:
  """stdout of `command` (stripped), or None when it is missing or fails."""
  if shutil.which(command[0]) is None:
    return None
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True, cwd=REPO_ROOT)
  except (OSError, subprocess.SubprocessError):
    return None
  return result.stdout.strip()


def nvidia_driver() -> str | None:
  """The NVIDIA driver version, where `nvidia-smi` is available."""
  output = _command_output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
  return output.splitlines()[0].strip() if output else None


def versions() -> dict[str, str | None]:
  """Python, JAX, jaxlib, Flax and NumPy versions, and the NVIDIA driver where there is one."""
  found: dict[str, str | None] = {"python": platform.python_version()}
  for package in VERSIONED_PACKAGES:
    try:
      found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      found[package] = None
  found["nvidia_driver"] = nvidia_driver()
  return found


def git_state() -> dict[str, str | bool | None]:
  """The checkout's commit and whether tracked files differ from it (None outside a git checkout)."""
  commit = _command_output("git", "rev-parse", "HEAD")
  changes = None if commit is None else _command_output("git", "status", "--porcelain", "--untracked-files=no")
  return {"commit": commit, "dirty": None if changes is None else bool(changes)}


def device() -> dict[str, str | int]:
  """The first device's kind and platform, and how many devices the process sees."""
  first = jax.devices()[0]
  return {"device": first.device_kind, "platform": first.platform, "device_count": jax.device_count()}
