"""The teacher-forcing objective (OmniMem stage 1, official code section 7): one pass of the model over
[clean chunks | noisy chunks] and the flow-matching v-loss on the noisy half.

Every noisy chunk has its own sigma (`data.make_batch`), `x_i = (1 - sigma_i) x0_i + sigma_i eps_i` at
timestep 1000 sigma_i; clean chunks run at timestep 0, as the rollout's context pass that writes clean
K/V. The model's own forward runs the pass (`CausalWanModel.forward_sequence`, one modulation per
chunk) with the sequence attention of `attention.py`; the noisy chunks take their clean twins' RoPE
frame positions. See docs/architecture.md, 'Teacher forcing'.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from omnimem_jax.model.wan import CausalWanModel
from omnimem_jax.training.attention import TEACHER_FORCING_MODES, sequence_attention
from omnimem_jax.training.data import noised
from omnimem_jax.training.masks import chunk_masks


def teacher_forcing_forward(model: CausalWanModel, clean: Float[Array, "b c f h w"], noisy: Float[Array, "b c f h w"],
                            noisy_timestep: Float[Array, "b n"], text: jax.Array, *,
                            select_own_noisy_chunk: bool = True, with_recall: bool = False
                            ) -> tuple[Float[Array, "b c f h w"], dict[str, jax.Array]]:
  """Velocity of every noisy chunk given the clean clip, in one pass over [clean | noisy].

  Args:
    model: the causal DiT (omnimem, window or dense mode).
    clean, noisy: latents [B, C, 3N, H, W]: the clean clip and its per-chunk noised version.
    noisy_timestep: [B, N] flow-matching time (1000 sigma) of each noisy chunk; clean chunks use 0.
    text: text-encoder output [B, text_len, text_dim].
    select_own_noisy_chunk: see `TrainConfig`.
    with_recall: also measure each layer's retrieval recall (`attention.selection_recall`; one more softmax).

  Returns:
    (velocity of the noisy chunks [B, C, 3N, H, W] float32, per-layer statistics {"recall": [L]}).
  """
  memory = model.config.memory
  frames_per_chunk = memory.frames_per_chunk
  model.check_latents(clean)
  if noisy.shape != clean.shape or clean.shape[2] % frames_per_chunk:
    raise ValueError(f"clean and noisy latents must share a shape with whole chunks of {frames_per_chunk} frames, "
                     f"got {tuple(clean.shape)} and {tuple(noisy.shape)}")
  batch, frames = clean.shape[0], clean.shape[2]
  num_chunks = frames // frames_per_chunk
  if noisy_timestep.shape != (batch, num_chunks):
    raise ValueError(f"noisy_timestep must be [batch, chunks] = [{batch}, {num_chunks}], got "
                     f"{tuple(noisy_timestep.shape)}")
  if memory.mode not in TEACHER_FORCING_MODES:
    raise ValueError(f"teacher forcing supports modes {TEACHER_FORCING_MODES}, not {memory.mode!r}")
  attention = functools.partial(sequence_attention, masks=chunk_masks(memory, num_chunks, select_own_noisy_chunk),
                                config=model.config, with_recall=with_recall)
  timestep = jnp.concatenate([jnp.zeros((batch, num_chunks), jnp.float32), noisy_timestep.astype(jnp.float32)], 1)
  return model.forward_sequence(jnp.concatenate([clean, noisy], axis=2), timestep, text, attention,
                                frame_positions=np.tile(np.arange(frames), 2), first_output_frame=frames)


def loss_fn(model: CausalWanModel, batch: dict[str, jax.Array], select_own_noisy_chunk: bool = True
            ) -> tuple[Float[Array, ""], dict[str, jax.Array]]:
  """Flow-matching v-loss (MSE against eps - x0 on the noisy half) of a `make_batch` batch, and per-layer
  statistics."""
  noisy, timesteps, target = noised(batch, model.config.memory.frames_per_chunk)
  velocity, stats = teacher_forcing_forward(model, batch["latents"], noisy, timesteps, batch["text"],
                                            select_own_noisy_chunk=select_own_noisy_chunk)
  return jnp.mean(jnp.square(velocity - target)), stats
