"""One layer's self-attention over the teacher-forcing sequence [clean | noisy] (`masks.py`), the
differentiable XLA path that `CausalWanModel.forward_sequence` runs in training.

"dense" and "window" modes: masked dense attention under the visible / recent rule. "omnimem" mode: the
three branches of `model/attention.py` with the same visibility rule,

  cmp  dense over the mean-pooled blocks of every visible chunk;
  swa  dense over the full K/V of the visible chunks of the last `window_chunks` chunks;
  slc  each (query group, head) attends to its top-k blocks among the selection candidates
       (`masks.chunk_masks`), the selection expressed as a block mask (the top-k ids are not
       differentiable; every gathered key and value is);

gated by sigmoid(clip(x_sa Wg + bg)) (`model.attention.gate_branches`). With
`select_own_noisy_chunk=False` the noisy half equals, chunk by chunk, the rollout's causal calls
(tests/test_train.py checks outputs and gradients). See docs/architecture.md, 'Teacher forcing'.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from omnimem_jax.config import ModelConfig
from omnimem_jax.model.attention import gate_branches
from omnimem_jax.training.masks import ChunkMasks, expand

TEACHER_FORCING_MODES = ("omnimem", "window", "dense")


def _logits(q: Float[Array, "b m h d"], k: Float[Array, "b k h d"]) -> Float[Array, "b h m k"]:
  return jnp.einsum("bmhd,bkhd->bhmk", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(q.shape[-1])


def _softmax_apply(logits: Float[Array, "b h m k"], mask: Bool[Array, "*#bh m k"], v: Float[Array, "b k h d"]
                   ) -> Float[Array, "b m h d"]:
  logits = jnp.where(mask, logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1) * mask
  return jnp.einsum("bhmk,bkhd->bmhd", probs, v.astype(jnp.float32))


def masked_attention(q: Float[Array, "b m h d"], k: Float[Array, "b k h d"], v: Float[Array, "b k h d"],
                     mask: Bool[Array, "*#bh m k"]) -> Float[Array, "b m h d"]:
  """Softmax attention of q over k, v where `mask` (broadcast to [B, H, M, K]) holds, in float32; rows
  without a visible key give zeros (as the selection kernel)."""
  return _softmax_apply(_logits(q, k), mask, v)


def selected_blocks(q: Float[Array, "b m h d"], k_pooled: Float[Array, "b j h d"], candidates: Bool[Array, "g j"],
                    config: ModelConfig) -> Bool[Array, "b h g j"]:
  """Which pooled blocks each (query group, head) selects.

  Query-shared scores (group-mean query . pooled key / sqrt(d), fp32), candidates only, top_k of them
  (fewer when fewer candidates exist), as `memory.select.select_blocks`.
  """
  memory = config.memory
  batch, tokens, heads, head_dim = q.shape
  groups = tokens // memory.group_size
  q_bar = q.astype(jnp.float32).reshape(batch, groups, memory.group_size, heads, head_dim).mean(axis=2)
  scores = jnp.einsum("bghd,bjhd->bhgj", q_bar, k_pooled.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) / jnp.sqrt(jnp.float32(head_dim))
  scores = jnp.where(candidates[None, None], scores, -jnp.inf)
  top_k = min(memory.top_k, k_pooled.shape[1])
  values, ids = jax.lax.top_k(jax.lax.stop_gradient(scores), top_k)
  chosen = jax.nn.one_hot(ids, k_pooled.shape[1], dtype=jnp.bool_) & jnp.isfinite(values)[..., None]
  return jnp.any(chosen, axis=3)


def omnimem_attention(q: Float[Array, "b m h d"], k: Float[Array, "b m h d"], v: Float[Array, "b m h d"],
                      gate_logits: Float[Array, "b m h 3"], masks: ChunkMasks, config: ModelConfig
                      ) -> tuple[Float[Array, "b m h d"], Float[Array, "b h m m"], Bool[Array, "b h m m"]]:
  """The gated cmp / slc / swa branches over the sequence (module docstring).

  Returns (output [B, M, H, D] in q's dtype, the full-resolution logits, the selected keys as a token
  mask), the last two for `selection_recall`.
  """
  memory = config.memory
  batch, _, heads, head_dim = q.shape
  per_chunk, blocks_per_chunk = config.tokens_per_chunk, config.blocks_per_chunk
  k_pooled, v_pooled = (x.astype(jnp.float32).reshape(batch, -1, memory.block_tokens, heads, head_dim).mean(axis=2)
                        for x in (k, v))
  o_cmp = masked_attention(q, k_pooled, v_pooled, jnp.asarray(expand(masks.visible, per_chunk, blocks_per_chunk)))

  logits = _logits(q, k)
  o_swa = _softmax_apply(logits, jnp.asarray(expand(masks.recent, per_chunk, per_chunk)), v)
  candidates = jnp.asarray(expand(masks.candidates, config.groups_per_chunk, blocks_per_chunk))
  chosen = selected_blocks(q, k_pooled, candidates, config)
  token_mask = jnp.repeat(jnp.repeat(chosen, memory.group_size, axis=2), memory.block_tokens, axis=3)
  o_slc = _softmax_apply(logits, token_mask, v)
  return gate_branches(gate_logits, o_cmp, o_slc, o_swa).astype(q.dtype), logits, token_mask


def selection_recall(logits: Float[Array, "b h m m"], token_mask: Bool[Array, "b h m m"], masks: ChunkMasks,
                     config: ModelConfig) -> Float[Array, ""]:
  """The share of the dense attention mass over the selection candidates that the selected blocks hold,
  averaged over the queries of chunks >= exclude_window_chunks (statistics only: no gradient)."""
  per_chunk = config.tokens_per_chunk
  batch, heads = logits.shape[:2]
  candidate_tokens = jnp.asarray(expand(masks.candidates, per_chunk, per_chunk))
  oracle = jax.nn.softmax(jnp.where(candidate_tokens, jax.lax.stop_gradient(logits), -1e30), axis=-1)
  recall = jnp.sum(oracle * token_mask, axis=-1)  # [B, H, M]
  index = np.arange(2 * masks.num_chunks) % masks.num_chunks
  beyond = np.repeat(index >= config.memory.exclude_window_chunks, per_chunk)
  return jnp.sum(recall * beyond) / max(1, batch * heads * int(beyond.sum()))


def sequence_attention(q: Float[Array, "b m h d"], k: Float[Array, "b m h d"], v: Float[Array, "b m h d"],
                       gate_logits: Float[Array, "b m h 3"] | None, *, masks: ChunkMasks, config: ModelConfig,
                       with_recall: bool = False) -> tuple[Float[Array, "b m h d"], dict[str, jax.Array]]:
  """One layer's self-attention over the teacher-forcing sequence (tokens in block order, chunk-major,
  post-RoPE): a `model.wan.SequenceAttention` once `masks`, `config` and `with_recall` are bound.

  Returns the attention output [B, M, H, D] before the output projection, and per-layer statistics
  {"recall": `selection_recall`} (with `with_recall` in omnimem mode; otherwise NaN).
  """
  memory = config.memory
  no_recall = {"recall": jnp.float32(jnp.nan)}
  if memory.mode in ("dense", "window"):
    rule = masks.visible if memory.mode == "dense" else masks.recent
    mask = jnp.asarray(expand(rule, config.tokens_per_chunk, config.tokens_per_chunk))
    return masked_attention(q, k, v, mask), no_recall
  if memory.mode != "omnimem":
    raise ValueError(f"teacher forcing supports modes {TEACHER_FORCING_MODES}, not {memory.mode!r}")
  out, logits, token_mask = omnimem_attention(q, k, v, gate_logits, masks, config)
  if not with_recall:
    return out, no_recall
  return out, {"recall": selection_recall(logits, token_mask, masks, config)}
