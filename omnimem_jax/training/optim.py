"""Optimisation: AdamW with linear warm-up and global-norm clipping, and the EMA of the parameters."""

from __future__ import annotations

from typing import Protocol, TypeVar

import jax
import optax

Tree = TypeVar("Tree")


class OptimizerSettings(Protocol):
  """The fields `optimizer` reads (TrainConfig and the codec's CodecConfig have them)."""

  learning_rate: float
  warmup_steps: int
  weight_decay: float
  beta1: float
  beta2: float
  grad_clip: float


def optimizer(config: OptimizerSettings) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW whose learning rate rises linearly over `warmup_steps`."""
  schedule = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
  return optax.chain(optax.clip_by_global_norm(config.grad_clip),
                     optax.adamw(schedule, b1=config.beta1, b2=config.beta2, weight_decay=config.weight_decay))


def ema_update(ema: Tree, params: Tree, decay: float) -> Tree:
  """decay ema + (1 - decay) params, leaf by leaf."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
