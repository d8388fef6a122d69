"""Chunk-level visibility rules of the teacher-forcing sequence [clean chunks | noisy chunks] (2N chunks):

  clean -> clean   block-causal (chunk c sees clean chunks <= c);
  noisy -> clean   strictly causal (noisy chunk i sees clean chunks < i);
  noisy -> noisy   its own chunk only;  clean -> noisy: never.

See docs/architecture.md, 'Teacher forcing'.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from omnimem_jax.config import MemoryConfig


@dataclasses.dataclass(frozen=True)
class ChunkMasks:
  """Chunk-level rules over the 2N-chunk teacher-forcing sequence ([2N, 2N] bool, query x key)."""

  visible: np.ndarray  # the causal teacher-forcing rule (dense mode, compressed branch)
  recent: np.ndarray  # visible and within the dense window (window mode, sliding branch)
  candidates: np.ndarray  # selection candidates (AWE)

  @property
  def num_chunks(self) -> int:
    """N: chunks of the clip (the sequence holds 2N)."""
    return self.visible.shape[0] // 2


def chunk_masks(memory: MemoryConfig, num_chunks: int, select_own_noisy_chunk: bool) -> ChunkMasks:
  """The teacher-forcing masks for `memory`'s mode. Selection candidates are the visible clean chunks up
  to c - exclude_window_chunks (Adaptive Window Exclusion; all visible chunks while c < exclude_window_chunks
  with `progressive_exclude`), plus, with `select_own_noisy_chunk` (as the official code), a noisy
  query's own noisy chunk."""
  total = 2 * num_chunks
  chunk = np.arange(total)
  noisy, index = chunk >= num_chunks, chunk % num_chunks
  q_noisy, k_noisy = noisy[:, None], noisy[None, :]
  q_index, k_index = index[:, None], index[None, :]
  visible = np.where(q_noisy, np.where(k_noisy, k_index == q_index, k_index < q_index),
                     ~k_noisy & (k_index <= q_index))
  window = memory.recent_chunks if memory.mode != "dense" else total
  recent = visible & (q_index - k_index < window)
  exclude = memory.exclude_window_chunks
  last = q_index - exclude
  if memory.progressive_exclude:
    last = np.where(q_index < exclude, q_index, last)
  own = k_noisy & (k_index == q_index)
  candidates = visible & (k_index <= last)
  if select_own_noisy_chunk:
    candidates = candidates | (visible & own)
  return ChunkMasks(visible=visible, recent=recent, candidates=candidates)


def expand(rule: np.ndarray, rows: int, cols: int) -> np.ndarray:
  """A chunk-level rule [Q, K] repeated to [Q rows, K cols] (tokens, query groups or blocks per chunk)."""
  return np.kron(rule, np.ones((rows, cols), bool))
