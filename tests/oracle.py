"""Float64 NumPy oracle of one layer's OmniMem self-attention, written from docs/architecture.md,
'Branches and gates' and 'Selection and Adaptive Window Exclusion'.

Independent of the library: nothing here imports `omnimem_jax` or `omnimem_kernels`. The store is simulated
as a plain mapping, per batch element, slot -> (absolute chunk id, k [H, T, D], v [H, T, D]); every
attention branch is built from explicit lists of key indices (slot, token) and a dense softmax.

Semantics (the contract the JAX core is tested against):
  ring       chunk c goes to slot c if c < P else P + (c - P) % (S - P); a write replaces the slot.
  stored     at chunk c: the chunks some slot holds, with chunk id <= c.
  pooled     kbar_j = mean of tokens j*BT .. j*BT+BT-1 of a chunk (same for vbar); id = slot*NB + j.
  omnimem    o = s(g0) o_cmp + s(g1) o_slc + s(g2) o_swa, s = sigmoid(clip(., -10, 10));
             o_cmp over every pooled entry of the stored chunks,
             o_swa over every token of the stored chunks in [c - window_chunks + 1, c],
             o_slc per (head, group of group_size queries): top_k candidate blocks by
             mean(q) . kbar / sqrt(D) (ties -> lower id), dense over the union of their tokens,
             0 when there is no candidate. Candidates: stored chunks <= c, and <= c - E as well
             when E = exclude_window_chunks > 0 and not (progressive_exclude and c < E).
  window     dense over the stored chunks in [c - local_attn_frames / fpc + 1, c].
  sink_window  dense over the stored chunks in {0 .. P-1} union [c - (local - sink) / fpc + 1, c].
  dense      dense over every stored chunk.

One deliberate hook: `attend(..., near_tie_ids=...)` lets the implementation's ids decide a top-k
boundary only where two float64 scores lie within tie_tol without being exactly equal (float32 may
order them either way) and only if those ids are admissible (see select_group). Exact ties always go
to the lower id.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

MODES = ("omnimem", "window", "sink_window", "dense")
GATE_CLIP = 10.0


@dataclasses.dataclass(frozen=True)
class OracleConfig:
  """Everything the oracle needs, as plain numbers (filled from raw config fields by the tests)."""

  mode: str
  num_heads: int
  head_dim: int
  tokens_per_chunk: int
  block_tokens: int
  group_size: int
  top_k: int
  window_chunks: int
  exclude_window_chunks: int
  progressive_exclude: bool
  frames_per_chunk: int
  capacity_chunks: int
  local_attn_frames: int
  sink_frames: int

  def __post_init__(self):
    assert self.mode in MODES, self.mode
    assert self.tokens_per_chunk % self.block_tokens == 0
    assert self.tokens_per_chunk % self.group_size == 0
    assert self.local_attn_frames % self.frames_per_chunk == 0
    assert self.sink_frames % self.frames_per_chunk == 0

  @property
  def pinned(self) -> int:
    return self.sink_frames // self.frames_per_chunk if self.mode == "sink_window" else 0

  @property
  def blocks_per_chunk(self) -> int:
    return self.tokens_per_chunk // self.block_tokens

  @property
  def groups_per_chunk(self) -> int:
    return self.tokens_per_chunk // self.group_size


def slot_of_chunk(c: int, cfg: OracleConfig) -> int:
  p, s = cfg.pinned, cfg.capacity_chunks
  return c if c < p else p + (c - p) % (s - p)


class OracleStore:
  """Per batch element: slot -> (chunk id, k [H, T, D] float64, v [H, T, D] float64)."""

  def __init__(self, cfg: OracleConfig, batch: int):
    self.cfg = cfg
    self.batch = batch
    self.slots: list[dict[int, tuple[int, np.ndarray, np.ndarray]]] = [{} for _ in range(batch)]
    self._pooled: list[dict[int, tuple[np.ndarray, np.ndarray]]] = [{} for _ in range(batch)]

  def write(self, c: int, k: np.ndarray, v: np.ndarray) -> None:
    """k, v: [B, N, H, D] (block order). Replaces whatever the slot of chunk c held."""
    slot = slot_of_chunk(c, self.cfg)
    for b in range(self.batch):
      kb = np.array(k[b], dtype=np.float64).transpose(1, 0, 2).copy()  # [H, T, D]
      vb = np.array(v[b], dtype=np.float64).transpose(1, 0, 2).copy()
      self.slots[b][slot] = (int(c), kb, vb)
      self._pooled[b][slot] = self._pool(kb, vb)

  def slot_table(self) -> np.ndarray:
    """[S] int32: chunk held by each slot, -1 = empty (identical for every batch element)."""
    table = np.full((self.cfg.capacity_chunks,), -1, np.int32)
    for slot, (chunk, _, _) in self.slots[0].items():
      table[slot] = chunk
    return table

  def stored(self, b: int, c: int) -> list[tuple[int, int]]:
    """(slot, chunk) of every chunk held with chunk id <= c, in slot order."""
    return sorted((slot, chunk) for slot, (chunk, _, _) in self.slots[b].items() if chunk <= c)

  def slot_holding(self, b: int, chunk: int) -> int | None:
    for slot, (held, _, _) in self.slots[b].items():
      if held == chunk:
        return slot
    return None

  def pooled(self, b: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
    """kbar, vbar [H, NB, D] of the chunk held by `slot` (computed when it was written)."""
    return self._pooled[b][slot]

  def _pool(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Explicit mean over the block_tokens tokens j*BT .. j*BT+BT-1 of each block j."""
    bt, nb = self.cfg.block_tokens, self.cfg.blocks_per_chunk
    kbar = np.zeros((k.shape[0], nb, k.shape[2]))
    vbar = np.zeros_like(kbar)
    for j in range(nb):
      tokens = list(range(j * bt, j * bt + bt))
      kbar[:, j] = k[:, tokens].mean(axis=1)
      vbar[:, j] = v[:, tokens].mean(axis=1)
    return kbar, vbar


# ---------------------------------------------------------------------------------------------
# Dense softmax over an explicit key list.

def dense_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
  """softmax(q keys^T / sqrt(D)) values for q [n, D], keys/values [m, D]; zeros when m == 0."""
  q = np.asarray(q, np.float64)
  if keys.shape[0] == 0:
    return np.zeros((q.shape[0], values.shape[1]))
  logits = q @ keys.T / math.sqrt(q.shape[1])
  logits = logits - logits.max(axis=1, keepdims=True)
  weights = np.exp(logits)
  weights = weights / weights.sum(axis=1, keepdims=True)
  return weights @ values


def token_index_set(store: OracleStore, b: int, chunks: list[int]) -> list[tuple[int, int]]:
  """Explicit (slot, token) key indices of every token of the listed chunks that are stored."""
  index = []
  for chunk in chunks:
    slot = store.slot_holding(b, chunk)
    if slot is None:
      continue
    index.extend((slot, t) for t in range(store.cfg.tokens_per_chunk))
  return index


def gather_tokens(store: OracleStore, b: int, h: int, index: list[tuple[int, int]]):
  keys = np.array([store.slots[b][slot][1][h, t] for slot, t in index]).reshape(len(index), store.cfg.head_dim)
  values = np.array([store.slots[b][slot][2][h, t] for slot, t in index]).reshape(len(index), store.cfg.head_dim)
  return keys, values


# ---------------------------------------------------------------------------------------------
# Which chunks each branch / mode reads at chunk c.

def stored_chunk_ids(store: OracleStore, b: int, c: int) -> list[int]:
  return [chunk for _, chunk in store.stored(b, c)]


def dense_branch_chunks(store: OracleStore, b: int, c: int) -> list[int]:
  """Chunks (stored, <= c) read by the full-resolution dense branch of the configured mode."""
  cfg = store.cfg
  stored = set(stored_chunk_ids(store, b, c))
  if cfg.mode == "omnimem":
    wanted = set(range(c - cfg.window_chunks + 1, c + 1))
  elif cfg.mode == "window":
    wanted = set(range(c - cfg.local_attn_frames // cfg.frames_per_chunk + 1, c + 1))
  elif cfg.mode == "sink_window":
    recent = (cfg.local_attn_frames - cfg.sink_frames) // cfg.frames_per_chunk
    wanted = set(range(cfg.pinned)) | set(range(c - recent + 1, c + 1))
  else:  # dense
    wanted = stored
  return sorted(chunk for chunk in wanted if chunk in stored and chunk <= c)


def candidate_chunks(store: OracleStore, b: int, c: int) -> list[int]:
  """Chunks whose blocks chunk c may select (Adaptive Window Exclusion)."""
  cfg = store.cfg
  e = cfg.exclude_window_chunks
  last = c
  if e > 0 and not (cfg.progressive_exclude and c < e):
    last = c - e
  return [chunk for chunk in stored_chunk_ids(store, b, c) if chunk <= last]


# ---------------------------------------------------------------------------------------------
# Branches.

def compressed_branch(store: OracleStore, b: int, h: int, q_bh: np.ndarray, c: int) -> np.ndarray:
  """o_cmp [N, D]: dense softmax over the pooled entries of every stored chunk."""
  keys, values = [], []
  for slot, _ in store.stored(b, c):
    kbar, vbar = store.pooled(b, slot)
    for j in range(store.cfg.blocks_per_chunk):
      keys.append(kbar[h, j])
      values.append(vbar[h, j])
  d = store.cfg.head_dim
  return dense_attention(q_bh, np.array(keys).reshape(-1, d), np.array(values).reshape(-1, d))


def full_branch(store: OracleStore, b: int, h: int, q_bh: np.ndarray, chunks: list[int]) -> np.ndarray:
  keys, values = gather_tokens(store, b, h, token_index_set(store, b, chunks))
  return dense_attention(q_bh, keys, values)


@dataclasses.dataclass
class Selection:
  ids: tuple[int, ...]  # selected slot-major ids, best first
  num_candidates: int
  gap: float  # score of the k-th selected minus the best rejected (inf when nothing was rejected)
  near_tie: bool = False  # the top-k boundary is within tie_tol without being an exact tie
  took_alternative: bool = False  # a near tie resolved the way the implementation did (select_group)


def select_group(store: OracleStore, b: int, h: int, qbar: np.ndarray, c: int, *,
                 alternative: set[int] | None = None, tie_tol: float = 0.0) -> Selection:
  """Top-k candidate blocks of one (head, query group) by qbar . kbar / sqrt(D); ties -> lower id.

  Float32 scores may order two candidates whose float64 scores differ by less than rounding noise
  either way. Only when the top-k boundary is such a near tie (scores within tie_tol of the k-th
  score that are not all exactly equal to it) is `alternative` (the implementation's set) taken
  instead, and only if it is admissible: top_k ids, holding every candidate scoring more than tie_tol
  above the k-th score and only candidates at most tie_tol below it. Exact ties are never relaxed.
  """
  cfg = store.cfg
  allowed = set(candidate_chunks(store, b, c))
  ids, keys = [], []  # explicit candidate list: slot-major id and its pooled key
  for slot, chunk in store.stored(b, c):
    if chunk not in allowed:
      continue
    kbar, _ = store.pooled(b, slot)
    for j in range(cfg.blocks_per_chunk):
      ids.append(slot * cfg.blocks_per_chunk + j)
      keys.append(kbar[h, j])
  scores = np.array(keys).reshape(len(ids), cfg.head_dim) @ qbar / math.sqrt(cfg.head_dim)
  ranked = sorted(zip((-scores).tolist(), ids))  # (-score, id): score descending, then lower id
  chosen = ranked[:cfg.top_k]
  gap = math.inf
  if len(ranked) > cfg.top_k:
    gap = ranked[cfg.top_k][0] - chosen[-1][0]  # >= 0; exactly 0 is a true tie (lower id wins)
  selected = tuple(i for _, i in chosen)
  near_tie = took = False
  if gap <= tie_tol:
    kth = -chosen[-1][0]
    near_tie = any(-neg != kth for neg, _ in ranked if abs(-neg - kth) <= tie_tol)
    if near_tie and alternative is not None and alternative != set(selected):
      sure = {i for neg, i in ranked if -neg > kth + tie_tol}
      possible = {i for neg, i in ranked if -neg >= kth - tie_tol}
      if len(alternative) == len(selected) and sure <= alternative <= possible:
        selected = tuple(i for _, i in ranked if i in alternative)
        took = True
  return Selection(selected, len(ranked), gap, near_tie, took)


def selection_branch(store: OracleStore, b: int, h: int, q_bh: np.ndarray, c: int, selections: dict,
                     alternatives: np.ndarray | None = None, tie_tol: float = 0.0) -> np.ndarray:
  """o_slc [N, D]; records each group's Selection in selections[(b, h, g)].

  alternatives: optional implementation ids [B, H, G, K] (-1 padded), used only for near ties.
  """
  cfg = store.cfg
  gs, nb, bt = cfg.group_size, cfg.blocks_per_chunk, cfg.block_tokens
  out = np.zeros((cfg.tokens_per_chunk, cfg.head_dim))
  for g in range(cfg.groups_per_chunk):
    rows = list(range(g * gs, g * gs + gs))
    qbar = q_bh[rows].mean(axis=0)
    alternative = None
    if alternatives is not None:
      alternative = {int(i) for i in alternatives[b, h, g] if i >= 0}
    sel = select_group(store, b, h, qbar, c, alternative=alternative, tie_tol=tie_tol)
    selections[(b, h, g)] = sel
    if not sel.ids:
      continue  # no candidate: the group's output is exactly 0
    index = []
    for block_id in sel.ids:
      slot, j = block_id // nb, block_id % nb
      index.extend((slot, t) for t in range(j * bt, j * bt + bt))
    assert len(set(index)) == len(index)  # a union: no duplicate keys
    keys, values = gather_tokens(store, b, h, index)
    out[rows] = dense_attention(q_bh[rows], keys, values)
  return out


def sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


@dataclasses.dataclass
class OracleResult:
  out: np.ndarray  # [B, N, H, D]
  branches: dict  # omnimem: name -> [B, N, H, D] for "cmp", "slc", "swa"
  selections: dict  # (b, h, g) -> Selection (omnimem only)
  dense_chunks: list  # per batch element: chunks read by the full-resolution dense branch
  slot_table_before: np.ndarray
  slot_table_after: np.ndarray

  def selected_sets(self) -> dict:
    return {key: set(sel.ids) for key, sel in self.selections.items()}

  def near_ties(self) -> int:
    return sum(sel.near_tie for sel in self.selections.values())

  def alternatives_taken(self) -> int:
    return sum(sel.took_alternative for sel in self.selections.values())


def chunk_self_attention(store: OracleStore, q: np.ndarray, k: np.ndarray, v: np.ndarray, c: int,
                         gate_logits: np.ndarray | None, clip: bool = True) -> OracleResult:
  """Writes chunk c's k, v [B, N, H, D] into the store, then returns the layer output [B, N, H, D].

  clip=False is only for the tests' sensitivity checks (the contract clips the gate logits).
  """
  before = store.slot_table()
  store.write(int(c), k, v)
  return attend(store, q, c, gate_logits, clip=clip, slot_table_before=before)


def attend(store: OracleStore, q: np.ndarray, c: int, gate_logits: np.ndarray | None, *, clip: bool = True,
           slot_table_before: np.ndarray | None = None, near_tie_ids: np.ndarray | None = None,
           tie_tol: float = 1e-5) -> OracleResult:
  """The layer output [B, N, H, D] of chunk c, whose K/V are already written into the store.

  near_tie_ids: optional implementation ids [B, H, G, K]; only near ties use them (select_group).
  """
  cfg = store.cfg
  c = int(c)
  q = np.asarray(q, np.float64)
  batch, n, heads, d = q.shape
  assert (n, heads, d) == (cfg.tokens_per_chunk, cfg.num_heads, cfg.head_dim)
  assert store.slot_holding(0, c) is not None, f"chunk {c} must be written before attend()"
  if cfg.mode == "omnimem":
    assert gate_logits is not None and gate_logits.shape == (batch, n, heads, 3)
  out = np.zeros((batch, n, heads, d))
  branches = {name: np.zeros_like(out) for name in ("cmp", "slc", "swa")} if cfg.mode == "omnimem" else {}
  selections: dict = {}
  dense_chunks = []
  for b in range(batch):
    chunks = dense_branch_chunks(store, b, c)
    dense_chunks.append(chunks)
    for h in range(heads):
      q_bh = q[b, :, h, :]
      o_full = full_branch(store, b, h, q_bh, chunks)
      if cfg.mode != "omnimem":
        out[b, :, h] = o_full
        continue
      o_cmp = compressed_branch(store, b, h, q_bh, c)
      o_slc = selection_branch(store, b, h, q_bh, c, selections, near_tie_ids, tie_tol)
      logits = np.asarray(gate_logits[b, :, h, :], np.float64)
      if clip:
        logits = np.clip(logits, -GATE_CLIP, GATE_CLIP)
      gates = sigmoid(logits)  # [N, 3] order (cmp, slc, swa)
      out[b, :, h] = gates[:, 0:1] * o_cmp + gates[:, 1:2] * o_slc + gates[:, 2:3] * o_full
      branches["cmp"][b, :, h], branches["slc"][b, :, h], branches["swa"][b, :, h] = o_cmp, o_slc, o_full
  before = slot_table_before if slot_table_before is not None else np.full(cfg.capacity_chunks, -2, np.int32)
  return OracleResult(out, branches, selections, dense_chunks, before, store.slot_table())
