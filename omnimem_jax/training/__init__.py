"""OmniMem stage-1 teacher-forcing causal training (official code section 7), one job per module:

  config.py     TrainConfig (what a run depends on), demo_model_config (the demo's small DiT);
  data.py       make_batch (the batch of each step, deterministic), noised (per-chunk noising);
  masks.py      the chunk-level visibility rules of the [clean | noisy] sequence;
  attention.py  one layer's self-attention over that sequence (dense, window, or OmniMem's gated
                branches with the selection as a block mask), differentiable, in XLA;
  loss.py       teacher_forcing_forward (the model's own `forward_sequence` over [clean | noisy]) and
                the flow-matching loss;
  optim.py      AdamW with warm-up and clipping, the EMA;
  trainer.py    TrainState, the compiled step, Trainer (Orbax checkpoints, resume, export).

The names below are the package's public interface. See docs/architecture.md, 'Teacher forcing'.
"""

from omnimem_jax.training.attention import sequence_attention
from omnimem_jax.training.config import TrainConfig, demo_model_config
from omnimem_jax.training.data import make_batch, noised
from omnimem_jax.training.loss import loss_fn, teacher_forcing_forward
from omnimem_jax.training.masks import ChunkMasks, chunk_masks
from omnimem_jax.training.optim import ema_update, optimizer
from omnimem_jax.training.trainer import Trainer, TrainState, compiled_step, default_mesh, train_step

__all__ = ["ChunkMasks", "TrainConfig", "TrainState", "Trainer", "chunk_masks", "compiled_step", "default_mesh",
           "demo_model_config", "ema_update", "loss_fn", "make_batch", "noised", "optimizer", "sequence_attention",
           "teacher_forcing_forward", "train_step"]
