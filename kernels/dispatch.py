"""Backend dispatch shared by the kernel ops: preference lists per platform, fall-through on
`NotImplementedError` (the tokamax pattern)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax


def _is_hopper() -> bool:
  return getattr(jax.devices()[0], "compute_capability", "") == "9.0"


def platform_name() -> str:
  """JAX's default backend, with "gpu" on a Hopper GPU reported as "gpu_hopper"."""
  platform = jax.default_backend()
  return "gpu_hopper" if platform == "gpu" and _is_hopper() else platform


def preference_list(preferences: Mapping[str, tuple[str, ...]], platform: str | None = None) -> tuple[str, ...]:
  """The backends tried, in order, on `platform` (default: `platform_name()`); XLA where unlisted."""
  return preferences.get(platform_name() if platform is None else platform, ("xla",))


def dispatch(op: str, implementations: Mapping[str, Callable], names: Sequence[str], *args, **kwargs):
  """Calls the first of `names` that accepts the inputs; a backend refuses by raising NotImplementedError."""
  unknown = [name for name in names if name not in implementations]
  if unknown:
    raise ValueError(f"unknown {op} implementation(s) {unknown}; known: {sorted(implementations)}")
  reasons = []
  for name in names:
    try:
      return implementations[name](*args, **kwargs)
    except NotImplementedError as err:
      reasons.append(f"{name}: {err}")
  raise NotImplementedError(f"no {op} implementation accepted these inputs: " + "; ".join(reasons))
