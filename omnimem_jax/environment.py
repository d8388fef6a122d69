"""Where a run happened: the device, the package versions, the git commit and the peak device
memory, recorded by the run report of `generate.py` and by every benchmark's JSON; and how XLA
compiles tiny programs."""

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
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def compile_without_llvm_optimisations() -> None:
  """Has XLA compile without LLVM's optimisations, for programs so small that compiling them costs more
  than running them: the demo's models on a CPU (the three-model comparison at 14 chunks: 110 s -> 47 s on 2 cores)
  and the tests' tiny ones. Floating-point semantics do not change. A level already in XLA_FLAGS wins.
  Takes effect only before JAX creates its backends (the first device query or array)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE_FLAG}".strip()


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
