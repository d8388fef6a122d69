"""Which backend runs each op: one frozen value, threaded from the rollout, the CLI and the
benchmarks down to the ops.

Each field is a backend name, a preference tuple (tried in order; a backend that cannot take the
inputs raises `NotImplementedError` and the next is tried), or None: the op's own per-platform
preference list (`<op>.api.default_implementations`). The ops are

  selection:  `omnimem_kernels.selection_attention` (each (group, head) over its top-k blocks)
  topk:       `omnimem_kernels.block_topk` (query-shared block scoring + exact top-k)
  dense:      `omnimem_kernels.segment_attention` (the sliding and compressed branches, and the
              dense baselines: dense attention over row segments of the store)

The model's cross-attention runs `omnimem_kernels.masked_attention` with that op's own defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from omnimem_kernels import dispatch

OPS = ("selection", "topk", "dense")

Choice = str | tuple[str, ...] | None


def _normalise(value: str | Sequence[str] | None) -> Choice:
  if value is None or isinstance(value, str):
    return value
  return tuple(value)


@dataclasses.dataclass(frozen=True)
class Backends:
  """The backend (or preference list) of each op; None fields use the op's per-platform defaults."""

  selection: Choice = None
  topk: Choice = None
  dense: Choice = None

  def __post_init__(self) -> None:
    known = implementations()
    for op in OPS:
      value = _normalise(getattr(self, op))
      object.__setattr__(self, op, value)
      names = () if value is None else (value,) if isinstance(value, str) else value
      if value is not None and not names:
        raise ValueError(f"the {op} backend preference list is empty; give a name or leave it unset")
      unknown = [name for name in names if name not in known[op]]
      if unknown:
        raise ValueError(f"unknown {op} backend(s) {unknown}; known: {sorted(known[op])}")

  @classmethod
  def parse(cls, text: str) -> Backends:
    """`"selection=triton,dense=mosaic_gpu+xla"` (a `+` separates a preference list); "" is the default."""
    fields: dict[str, Choice] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
      op, sep, value = item.partition("=")
      if not sep or op.strip() not in OPS or not value.strip():
        raise ValueError(f"backends must be op=name[+name...] pairs separated by commas, ops {OPS}; got {item!r}")
      names = tuple(name.strip() for name in value.split("+"))
      fields[op.strip()] = names[0] if len(names) == 1 else names
    return cls(**fields)

  def preferences(self, platform: str | None = None) -> dict[str, tuple[str, ...]]:
    """Each op's preference list on `platform` (default: this process's), defaults filled in."""
    defaults = default_implementations(platform)
    return {op: dispatch.resolve(getattr(self, op), defaults[op]) for op in OPS}

  def to_dict(self) -> dict[str, Choice]:
    return {op: getattr(self, op) for op in OPS}


def implementations() -> dict[str, tuple[str, ...]]:
  """The backend names each op knows."""
  from omnimem_kernels.block_topk import api as topk_api
  from omnimem_kernels.segment_attention import api as segment_api
  from omnimem_kernels.selection_attention import api as selection_api
  return {"selection": tuple(selection_api.IMPLEMENTATIONS), "topk": tuple(topk_api.IMPLEMENTATIONS),
          "dense": tuple(segment_api.IMPLEMENTATIONS)}


def default_implementations(platform: str | None = None) -> dict[str, tuple[str, ...]]:
  """Each op's default preference list on `platform` (default: this process's)."""
  from omnimem_kernels.block_topk import api as topk_api
  from omnimem_kernels.segment_attention import api as segment_api
  from omnimem_kernels.selection_attention import api as selection_api
  return {"selection": selection_api.default_implementations(platform),
          "topk": topk_api.default_implementations(platform),
          "dense": segment_api.default_implementations(platform)}
