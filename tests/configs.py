"""Configs and device requirements shared by the tests."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from omnimem_kernels.backends import Backends

from omnimem_jax.config import ModelConfig
from omnimem_jax.memory.store import SlotTables

# Every op on XLA: for comparisons that must not depend on the kernels a platform picks (a hand-written loop
# against the rollout: an H100's defaults put them 4.6e-4 apart, CPU's 2e-7), and for differentiating the
# inference path, whose GPU kernels (Triton selection, Mosaic GPU / cuDNN segment attention) have no VJP.
ALL_XLA = Backends(selection="xla", topk="xla", dense="xla")


def tiny(**memory) -> ModelConfig:
  """The tiny preset with MemoryConfig fields replaced (validated again)."""
  base = ModelConfig.from_preset("tiny")
  return dataclasses.replace(base, memory=dataclasses.replace(base.memory, **memory))


def require_devices(count: int) -> None:
  """Skips the calling test (from where it is called) unless `count` devices are visible.

  CI runs on 4 fake CPU devices (tests/conftest.py); a machine with fewer accelerators has fewer.
  """
  __tracebackhide__ = True  # pytest reports the skip at the calling test's line
  visible = jax.device_count()
  if visible < count:
    pytest.skip(f"needs {count} devices (CI's fake CPU devices); {visible} visible")


def plain_tables(held: list[int]) -> SlotTables:
  """Slot tables of a plain store whose full-resolution and pooled tiers hold the chunks `held` (slot by
  slot; -1 empty): the layout of a store without pinned slots and with pooled_chunks = capacity_chunks."""
  table = jnp.asarray(held, jnp.int32)
  return SlotTables(full=table, recent=jnp.zeros((0,), jnp.int32), pooled=table)
