"""Configs shared by the tests."""

import dataclasses

from omnimem_jax.config import ModelConfig


def tiny(**memory) -> ModelConfig:
  """The tiny preset with MemoryConfig fields replaced (validated again)."""
  base = ModelConfig.from_preset("tiny")
  return dataclasses.replace(base, memory=dataclasses.replace(base.memory, **memory))
