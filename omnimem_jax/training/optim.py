"""Optimisation: AdamW with linear warm-up and global-norm clipping, and the EMA of the parameters."""

from __future__ import annotations

from typing import TypeVar

import jax
import optax

from omnimem_jax.training.config import TrainConfig

Tree = TypeVar("Tree")


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW whose learning rate rises linearly over `warmup_steps`."""
  schedule = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
  return optax.chain(optax.clip_by_global_norm(config.grad_clip),
                     optax.adamw(schedule, b1=config.beta1, b2=config.beta2, weight_decay=config.weight_decay))


def ema_update(ema: Tree, params: Tree, decay: float) -> Tree:
  """decay ema + (1 - decay) params, leaf by leaf."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
