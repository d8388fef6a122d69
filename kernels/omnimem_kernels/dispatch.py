"""Backend dispatch shared by the kernel ops: preference lists per platform, fall-through on
`NotImplementedError` (the tokamax pattern)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax

_RECORDS = threading.local()  # the open `recording()` dicts of this thread, innermost last


def _is_hopper() -> bool:
  return getattr(jax.devices()[0], "compute_capability", "") == "9.0"


def platform_name() -> str:
  """JAX's default backend, with "gpu" on a Hopper GPU reported as "gpu_hopper"."""
  platform = jax.default_backend()
  return "gpu_hopper" if platform == "gpu" and _is_hopper() else platform


def preference_list(preferences: Mapping[str, tuple[str, ...]], platform: str | None = None) -> tuple[str, ...]:
  """The backends tried, in order, on `platform` (default: `platform_name()`); XLA where unlisted."""
  return preferences.get(platform_name() if platform is None else platform, ("xla",))


def resolve(choice: str | Sequence[str] | None, defaults: tuple[str, ...]) -> tuple[str, ...]:
  """The backends to try, in order: `choice` (one name or a preference list), or `defaults` when None."""
  if choice is None:
    return defaults
  return (choice,) if isinstance(choice, str) else tuple(choice)


def interpret_mode(interpret: bool | None) -> bool:
  """Whether Pallas backends run in interpret mode: as asked, else on CPU (no Pallas hardware there)."""
  return jax.default_backend() == "cpu" if interpret is None else interpret


def dispatch(op: str, implementations: Mapping[str, Callable], names: Sequence[str], *args, **kwargs):
  """Calls the first of `names` that accepts the inputs; a backend refuses by raising NotImplementedError."""
  unknown = [name for name in names if name not in implementations]
  if unknown:
    raise ValueError(f"unknown {op} implementation(s) {unknown}; known: {sorted(implementations)}")
  reasons = []
  for name in names:
    try:
      result = implementations[name](*args, **kwargs)
    except NotImplementedError as err:
      reasons.append(f"{name}: {err}")
      continue
    for record in getattr(_RECORDS, "stack", ()):
      record.setdefault(op, set()).add(name)
    return result
  raise NotImplementedError(f"no {op} implementation accepted these inputs: " + "; ".join(reasons))


@contextlib.contextmanager
def recording() -> Iterator[dict[str, set[str]]]:
  """Collects, per op, the backends `dispatch` ran while the context is open (in this thread).

  Dispatch happens when a function is traced, so wrap the first call of a jitted function (or its
  `.lower(...)`) to learn what its compiled program runs.
  """
  stack = _RECORDS.__dict__.setdefault("stack", [])
  record: dict[str, set[str]] = {}
  stack.append(record)
  try:
    yield record
  finally:
    stack.remove(record)
