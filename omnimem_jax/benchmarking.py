"""What every benchmark under `experiments/` shares: the device's measured ceilings, the timing of
calls, and the JSON record each one writes.

A benchmark times its calls with `time_call` (warm-up calls first, then the median, min and max over
repetitions of device-synchronised, back-to-back calls), compares them with `device_ceilings`
(device-to-device copy bandwidth and bf16 matmul rate, measured in the same process, so ratios to a
floor hold whatever the machine) and writes its results with `write_report`: the results plus the
device, the package versions, the git commit (and whether the tree had uncommitted changes), the
benchmark's absl flags and the kernel backends it asked for, written atomically
(`omnimem_jax.io.write_json`).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags

from omnimem_jax.environment import device, git_state, versions
from omnimem_jax.io import write_json
from omnimem_kernels.backends import Backends



@dataclasses.dataclass(frozen=True)
class Timing:
  """Milliseconds per call: median, min and max over `reps` repetitions of `inner` back-to-back calls."""

  median_ms: float
  min_ms: float
  max_ms: float
  reps: int
  inner: int

  def to_dict(self) -> dict[str, float | int]:
    return dataclasses.asdict(self)


def time_call(fn: Callable[..., Any], *, reps: int = 7, inner: int = 1, warmup: int = 1,
              prepare: Callable[[], tuple[Any, ...]] | None = None) -> Timing:
  """Times `fn`: `warmup` untimed calls (compilation), then `reps` repetitions of `inner` calls.

  Each repetition's wall time runs from its first call to the moment the last call's outputs are
  ready on the device (`jax.block_until_ready`), divided by `inner`: back-to-back calls overlap their
  dispatch with the device work, as in a rollout. `prepare`, when given, makes the arguments of one
  repetition outside the timed region (e.g. a fresh cache that `fn` donates); its outputs are made
  ready before the clock starts. Without it `fn` takes no arguments.
  """
  if reps < 1 or inner < 1 or warmup < 0:
    raise ValueError(f"time_call needs reps >= 1, inner >= 1 and warmup >= 0, got {reps}, {inner}, {warmup}")

  def arguments() -> tuple[Any, ...]:
    return () if prepare is None else jax.block_until_ready(prepare())

  for _ in range(warmup):
    jax.block_until_ready(fn(*arguments()))
  samples = []
  for _ in range(reps):
    args = arguments()
    start = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / inner * 1e3)
  return Timing(statistics.median(samples), min(samples), max(samples), reps, inner)


def device_ceilings(*, reps: int = 7, inner: int = 5, copy_bytes: int | None = None,
                    matmul_size: int | None = None) -> dict[str, float | int]:
  """The device's measured device-to-device copy bandwidth and bf16 matmul rate.

  Copy: `x + 1` over a bf16 array of `copy_bytes`, counted as bytes read plus bytes written. Matmul:
  a square bf16 product of side `matmul_size`. Defaults: 1 GiB and 8192 on accelerators, 4 MiB and
  512 on CPUs (small enough for a smoke run; a CPU's figures are only indicative).
  """
  accelerator = jax.default_backend() != "cpu"
  copy_bytes = (2**30 if accelerator else 2**22) if copy_bytes is None else copy_bytes
  size = (8192 if accelerator else 512) if matmul_size is None else matmul_size
  x = jax.random.normal(jax.random.key(0), (copy_bytes // 2,), jnp.bfloat16)
  copy = jax.jit(lambda a: a + jnp.bfloat16(1))
  copy_ms = time_call(lambda: copy(x), reps=reps, inner=inner).median_ms
  del x
  a, b = (jax.random.normal(jax.random.key(i), (size, size), jnp.bfloat16) for i in (1, 2))
  matmul = jax.jit(lambda p, q: p @ q)
  matmul_ms = time_call(lambda: matmul(a, b), reps=reps, inner=inner).median_ms
  return {"copy_bandwidth_bytes_per_s": 2 * copy_bytes / (copy_ms * 1e-3), "copy_ms": copy_ms,
          "copy_bytes": copy_bytes, "matmul_tflops": 2 * size**3 / (matmul_ms * 1e-3) / 1e12,
          "matmul_ms": matmul_ms, "matmul_size": size}


# ---- the record --------------------------------------------------------------------------------


def flag_values(values: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
  """Every flag the benchmark defines, with its value, plus absl's own flags where given explicitly."""
  recorded = {}
  for module, module_flags in values.flags_by_module_dict().items():
    for flag in module_flags:
      if not module.startswith("absl.") or flag.present:
        recorded[flag.name] = flag.value
  return dict(sorted(recorded.items()))


def backends_ran(record: Mapping[str, set[str]]) -> dict[str, list[str]]:
  """A `omnimem_kernels.dispatch.recording()` record (op -> backends that ran) as JSON-ready lists."""
  return {op: sorted(names) for op, names in sorted(record.items())}


def backends_record(backends: Backends | None, ran: Mapping[str, set[str]] | None = None) -> dict[str, Any] | None:
  """The backends asked for (None fields: the platform's defaults), each op's preference list here and,
  when recorded, the backends that ran."""
  if backends is None:
    return None
  entry = {"requested": backends.to_dict(),
           "preferences": {op: list(names) for op, names in backends.preferences().items()}}
  return entry if ran is None else {**entry, "ran": backends_ran(ran)}


def write_report(path: str | os.PathLike, results: Mapping[str, Any], *, backends: Backends | None,
                 ran: Mapping[str, set[str]] | None = None, flags_used: flags.FlagValues = flags.FLAGS) -> Path:
  """Writes `results` as JSON (atomically) under the header every benchmark record carries.

  Header keys: `device` (kind), `platform`, `device_count`, `versions`, `git` (commit, dirty),
  `flags` (the benchmark's absl flags) and `backends` (what was asked for, the preference lists and,
  given `ran` from `omnimem_kernels.dispatch.recording()`, what ran; None for a benchmark without
  kernel ops).
  """
  header = {**device(), "versions": versions(), "git": git_state(), "flags": flag_values(flags_used),
            "backends": backends_record(backends, ran)}
  clash = sorted(set(header) & set(results))
  if clash:
    raise ValueError(f"benchmark results may not use the header's keys {clash}")
  return write_json(path, {**header, **results})
