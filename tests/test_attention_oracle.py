"""The attention core (jit, traced chunk index, float32) against the float64 NumPy oracle (tests/oracle.py).

Every test runs chunks in sequence through `chunk_self_attention` (carrying the returned layer store and
the slot table) and through the oracle's simulated store, and checks after each chunk:
  - the output, norm-wise: ||jax - oracle|| / ||oracle|| < 1e-5;
  - the store: full-resolution K/V of every held slot and their pooled means;
  - in "omnimem" mode, the ids the core returns against the oracle's selected block sets per (b, h, g),
    with -1 padding only at the end and exactly min(top_k, candidates) valid ids; they must equal
    `select_blocks` ids computed apart.
The slot table handed to the core is the oracle's (before the write), and the one handed to
`select_blocks` is the oracle's after the write, so the ring bookkeeping is checked independently.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimem_jax.config import MemoryConfig, ModelConfig
from omnimem_jax.memory import store as store_lib
from omnimem_jax.memory.select import select_blocks
from omnimem_jax.model.attention import chunk_self_attention
from tests import oracle
from tests.configs import plain_tables, tiny

REL_TOL = 1e-5
TIE_TOL = 1e-5  # score gaps below this may order either way in float32
NUM_CHUNKS = 7  # AWE switches on at chunk 3


# ---------------------------------------------------------------------------------------------
# Configs.

def wan12(**memory) -> ModelConfig:
  """12 heads x 128 head_dim (the real attention geometry) on a 4 x 4 token grid (48 tokens a chunk)."""
  memory = {"block_h": 2, "block_w": 2, "group_size": 2, "top_k": 16, **memory}
  return ModelConfig.from_preset("wan2.1-t2v-1.3b", latent_height=8, latent_width=8, memory=MemoryConfig(**memory))


PRESETS = {"tiny": tiny, "wan12": wan12}


def oracle_config(config: ModelConfig) -> oracle.OracleConfig:
  """The oracle's config from raw fields only (no derived properties of the implementation)."""
  m = config.memory
  grid = (config.latent_height // config.patch_size[1]) * (config.latent_width // config.patch_size[2])
  return oracle.OracleConfig(
      mode=m.mode, num_heads=config.num_heads, head_dim=config.dim // config.num_heads,
      tokens_per_chunk=m.frames_per_chunk * grid, block_tokens=m.block_h * m.block_w,
      group_size=m.group_size, top_k=m.top_k, window_chunks=m.window_chunks,
      exclude_window_chunks=m.exclude_window_chunks, progressive_exclude=m.progressive_exclude,
      frames_per_chunk=m.frames_per_chunk, capacity_chunks=m.capacity_chunks,
      local_attn_frames=m.local_attn_frames, sink_frames=m.sink_frames)


# ---------------------------------------------------------------------------------------------
# Inputs.

def random_chunk(ocfg: oracle.OracleConfig, rng: np.random.Generator, batch: int, gates: str = "mixed"):
  """q, k, v [B, N, H, D] standard normal float32; gate logits [B, N, H, 3] (None outside omnimem).

  gates: "mixed" (N(0, 5) with ~15% of entries pushed to +-[10.5, 40], beyond the clip),
  "beyond" (every entry in +-[10.5, 40]), "below" (every entry in [-40, -10.5]), or a branch name ("cmp", "slc", "swa") for a one-hot
  +40 / -40 pattern that isolates that branch.
  """
  shape = (batch, ocfg.tokens_per_chunk, ocfg.num_heads, ocfg.head_dim)
  q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
  if ocfg.mode != "omnimem":
    return q, k, v, None
  gshape = (*shape[:3], 3)
  far = rng.choice([-1.0, 1.0], size=gshape) * rng.uniform(10.5, 40.0, size=gshape)
  if gates == "mixed":
    g = rng.normal(0.0, 5.0, size=gshape)
    g = np.where(rng.random(gshape) < 0.15, far, g)
  elif gates == "beyond":
    g = far
  elif gates == "below":
    g = -np.abs(far)
  else:
    g = np.full(gshape, -40.0)
    g[..., ("cmp", "slc", "swa").index(gates)] = 40.0
  return q, k, v, g.astype(np.float32)


def dyadic_chunk(ocfg: oracle.OracleConfig, rng: np.random.Generator, batch: int):
  """q, k, v with entries in {-1, -0.5, 0, 0.5, 1}: every pooled mean and block score is exact in
  float32, so equal scores are exact ties and the lower-id rule decides the selected sets."""
  shape = (batch, ocfg.tokens_per_chunk, ocfg.num_heads, ocfg.head_dim)
  q, k, v = (rng.integers(-2, 3, size=shape).astype(np.float32) / 2 for _ in range(3))
  g = rng.normal(0.0, 3.0, size=(*shape[:3], 3)).astype(np.float32)
  return q, k, v, g


# ---------------------------------------------------------------------------------------------
# The JAX side: one jit per config, reused across chunks and tests.

@functools.lru_cache(maxsize=None)
def jitted_step(config: ModelConfig):
  omnimem = config.memory.mode == "omnimem"

  def step(q, k, v, layer, tables_before, tables_after, chunk_index, gates):
    out, layer, ids = chunk_self_attention(q, k, v, layer, tables_before, chunk_index, gates if omnimem else None,
                                           config)
    apart = None
    if omnimem:
      apart = select_blocks(q.transpose(0, 2, 1, 3), layer.k_pooled, tables_after, chunk_index, config)
    return out, layer, ids, apart

  return jax.jit(step)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
  return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


class Rollout:
  """Runs chunks through the JAX core and the oracle side by side and checks each step."""

  def __init__(self, config: ModelConfig, batch: int):
    self.config = config
    self.ocfg = oracle_config(config)
    self.batch = batch
    self.store = oracle.OracleStore(self.ocfg, batch)
    kv = store_lib.init_store(config, batch, jnp.float32, num_layers=1)
    self.layer = store_lib.layer_kv(kv.layers, 0)
    self.step_fn = jitted_step(config)

  def step(self, c: int, q, k, v, gates) -> oracle.OracleResult:
    before = self.store.slot_table()
    self.store.write(c, k, v)
    after = self.store.slot_table()
    out, self.layer, ids, apart = self.step_fn(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), self.layer, plain_tables(before), plain_tables(after),
        jnp.int32(c), None if gates is None else jnp.asarray(gates))
    assert (ids is None) == (apart is None) == (self.ocfg.mode != "omnimem")
    ids = None if ids is None else np.asarray(ids)
    if ids is not None:
      np.testing.assert_array_equal(ids, np.asarray(apart))
    # The implementation's ids only decide near ties (float64 scores within 1e-5, not exactly equal).
    want = oracle.attend(self.store, q, c, gates, slot_table_before=before, near_tie_ids=ids, tie_tol=TIE_TOL)
    where = f"mode={self.ocfg.mode} chunk={c} slots={after.tolist()}"
    if ids is not None:
      self.check_ids(ids, want, where)
    err = rel_err(out, want.out)
    assert err < REL_TOL, f"{where}: output rel. err {err:.3e} (max abs {np.abs(np.asarray(out) - want.out).max():.3e})"
    self.check_store(where)
    return want

  def check_store(self, where: str) -> None:
    k, v = np.asarray(self.layer.k), np.asarray(self.layer.v)
    kp, vp = np.asarray(self.layer.k_pooled), np.asarray(self.layer.v_pooled)
    nb = self.ocfg.blocks_per_chunk
    for b in range(self.batch):
      for slot, (chunk, ok, ov) in self.store.slots[b].items():
        np.testing.assert_array_equal(k[b, :, slot], ok, err_msg=f"{where}: k of slot {slot} (chunk {chunk})")
        np.testing.assert_array_equal(v[b, :, slot], ov, err_msg=f"{where}: v of slot {slot} (chunk {chunk})")
        kbar, vbar = self.store.pooled(b, slot)
        np.testing.assert_allclose(kp[b, :, slot * nb:(slot + 1) * nb], kbar, rtol=1e-5, atol=1e-6,
                                   err_msg=f"{where}: pooled k of slot {slot}")
        np.testing.assert_allclose(vp[b, :, slot * nb:(slot + 1) * nb], vbar, rtol=1e-5, atol=1e-6,
                                   err_msg=f"{where}: pooled v of slot {slot}")

  def check_ids(self, ids: np.ndarray, want: oracle.OracleResult, where: str) -> None:
    top_k = self.ocfg.top_k
    assert ids.shape == (self.batch, self.ocfg.num_heads, self.ocfg.groups_per_chunk, top_k), ids.shape
    # Near ties resolved the implementation's way must stay rare (each one is float32 noise).
    assert want.alternatives_taken() <= max(2, len(want.selections) // 100), (where, want.alternatives_taken())
    selected = want.selected_sets()
    for (b, h, g), sel in want.selections.items():
      row = ids[b, h, g]
      n_valid = min(top_k, sel.num_candidates)
      assert (row[:n_valid] >= 0).all() and (row[n_valid:] == -1).all(), \
          f"{where} b={b} h={h} g={g}: ids {row.tolist()}, expected {n_valid} valid ids then -1"
      assert set(row[:n_valid].tolist()) == selected[(b, h, g)], \
          f"{where} b={b} h={h} g={g}: ids {sorted(row[:n_valid].tolist())} != oracle {sorted(sel.ids)}"


def run_sequence(config: ModelConfig, chunks, *, batch: int = 2, seed: int = 0, gates: str = "mixed",
                 make_chunk=None) -> list[oracle.OracleResult]:
  """Chunks `chunks` in order, each with fresh inputs from make_chunk(ocfg, rng, batch)."""
  make_chunk = make_chunk or functools.partial(random_chunk, gates=gates)
  rollout = Rollout(config, batch)
  rng = np.random.default_rng(seed)
  return [rollout.step(c, *make_chunk(rollout.ocfg, rng, batch)) for c in chunks]


# ---------------------------------------------------------------------------------------------
# The main sweep: every mode, both geometries, with and without ring reuse, chunks 0..6.

SWEEP = {
    # (preset, mode, ring): memory overrides. Ring configs hold fewer than 7 chunks.
    ("tiny", "omnimem", True): dict(capacity_chunks=4),
    ("tiny", "omnimem", False): dict(capacity_chunks=8),
    ("tiny", "window", True): dict(local_attn_frames=6, capacity_chunks=4),
    ("tiny", "window", False): dict(local_attn_frames=6, capacity_chunks=8),
    ("tiny", "sink_window", True): dict(sink_frames=3, local_attn_frames=9, capacity_chunks=4),
    ("tiny", "sink_window", False): dict(sink_frames=3, local_attn_frames=9, capacity_chunks=8),
    ("tiny", "dense", True): dict(capacity_chunks=4),
    ("tiny", "dense", False): dict(capacity_chunks=8),
    ("wan12", "omnimem", True): dict(capacity_chunks=5),
    ("wan12", "omnimem", False): dict(capacity_chunks=8),
    ("wan12", "window", True): dict(local_attn_frames=9, capacity_chunks=4),
    ("wan12", "window", False): dict(local_attn_frames=9, capacity_chunks=8),
    ("wan12", "sink_window", True): dict(sink_frames=3, local_attn_frames=12, capacity_chunks=5),
    ("wan12", "sink_window", False): dict(sink_frames=3, local_attn_frames=12, capacity_chunks=8),
    ("wan12", "dense", True): dict(capacity_chunks=5),
    ("wan12", "dense", False): dict(capacity_chunks=8),
}


@pytest.mark.parametrize("preset, mode, ring", list(SWEEP), ids=lambda x: str(x))
def test_core_matches_oracle(preset, mode, ring):
  config = PRESETS[preset](mode=mode, **SWEEP[(preset, mode, ring)])
  results = run_sequence(config, range(NUM_CHUNKS), batch=2, seed=list(SWEEP).index((preset, mode, ring)))
  # The windows slide and (with ring reuse) old chunks drop out of the stored set.
  ocfg = oracle_config(config)
  if mode in ("window", "sink_window"):
    assert results[-1].dense_chunks[0][0 if mode == "window" else 1] > 1, results[-1].dense_chunks
  if ring:
    assert 0 not in results[-1].slot_table_after.tolist() or ocfg.pinned > 0
    assert len(set(results[-1].slot_table_after.tolist())) == ocfg.capacity_chunks  # every slot in use


# ---------------------------------------------------------------------------------------------
# Edge cases through the full core.

@pytest.mark.parametrize("capacity", [8, 4])
def test_rewriting_a_chunk_five_times_last_write_wins(capacity):
  """The 4 denoising calls and the context pass all write the same chunk; only the last stays."""
  config = tiny(capacity_chunks=capacity)
  rollout = Rollout(config, batch=2)
  rng = np.random.default_rng(11)
  repeated = 4  # with capacity 4 it is also the first chunk that evicts (chunk 0)
  for c in range(repeated):
    rollout.step(c, *random_chunk(rollout.ocfg, rng, 2))
  writes = []
  for _ in range(5):
    q, k, v, g = random_chunk(rollout.ocfg, rng, 2)
    rollout.step(repeated, q, k, v, g)
    writes.append(k)
  slot = oracle.slot_of_chunk(repeated, rollout.ocfg)
  np.testing.assert_array_equal(np.asarray(rollout.layer.k)[:, :, slot], writes[-1].transpose(0, 2, 1, 3))
  for c in range(repeated + 1, NUM_CHUNKS):
    rollout.step(c, *random_chunk(rollout.ocfg, rng, 2))


@pytest.mark.parametrize("top_k, capacity", [(30, 8), (100, 4)])
def test_top_k_larger_than_candidates_pads_with_minus_one(top_k, capacity):
  # 24 blocks a chunk: top_k=30 pads at chunks 0 and 3 (one candidate chunk); top_k=100 exceeds
  # even the whole store (4 slots x 24 blocks) and pads at every chunk.
  results = run_sequence(tiny(top_k=top_k, capacity_chunks=capacity), range(NUM_CHUNKS), seed=12)
  assert any(sel.num_candidates < top_k for r in results for sel in r.selections.values())


@pytest.mark.parametrize("memory", [
    dict(exclude_window_chunks=0),  # AWE off: candidates 0..c at every chunk
    dict(progressive_exclude=False),  # chunks 0..2 have no candidate: o_slc = 0
    dict(exclude_window_chunks=4, capacity_chunks=4),  # chunk 4: the only candidate (0) was evicted
])
def test_adaptive_window_exclusion_variants(memory):
  results = run_sequence(tiny(**memory), range(NUM_CHUNKS), seed=13)
  empty = [c for c, r in enumerate(results) if all(s.num_candidates == 0 for s in r.selections.values())]
  if memory.get("progressive_exclude") is False:
    assert empty == [0, 1, 2]
    for r in results[:3]:
      assert not r.branches["slc"].any()
  elif memory.get("exclude_window_chunks") == 4:
    assert empty == [4, 5, 6]  # with E = capacity every candidate chunk is already evicted
  else:
    assert empty == []


def test_empty_selection_branch_is_exactly_zero_when_isolated():
  """Gates one-hot on slc with no candidate: the output is just sigmoid(-10) (o_cmp + o_swa)."""
  run_sequence(tiny(progressive_exclude=False), range(4), seed=14, gates="slc")


def test_group_size_one_no_query_sharing():
  run_sequence(tiny(group_size=1), range(NUM_CHUNKS), seed=15)


@pytest.mark.parametrize("mode, memory", [
    ("omnimem", dict(capacity_chunks=4)),
    ("window", dict(local_attn_frames=9, capacity_chunks=3)),
    ("sink_window", dict(sink_frames=3, local_attn_frames=9, capacity_chunks=3)),
    ("dense", dict(capacity_chunks=3)),
])
def test_chunks_past_capacity_evict_but_never_the_window(mode, memory):
  config = tiny(mode=mode, **memory)
  ocfg = oracle_config(config)
  results = run_sequence(config, range(12), seed=16)
  for c, r in enumerate(results):
    stored = set(r.slot_table_after.tolist()) - {-1}
    evicted = set(range(c + 1)) - stored
    if c >= ocfg.capacity_chunks:
      assert evicted, (c, stored)
    # The dense branch reads exactly its window (sink chunks included), all still resident.
    if mode == "omnimem":
      window = set(range(max(0, c - ocfg.window_chunks + 1), c + 1))
    elif mode == "window":
      window = set(range(max(0, c - 2), c + 1))
    elif mode == "sink_window":
      window = {0} | set(range(max(0, c - 1), c + 1))
    else:
      window = stored
    assert set(r.dense_chunks[0]) == window and not window & evicted, (c, r.dense_chunks[0], evicted)
    if mode == "omnimem":  # no evicted chunk is selectable
      owners = {r.slot_table_after[i // ocfg.blocks_per_chunk] for s in r.selections.values() for i in s.ids}
      assert not owners & evicted


def test_exact_score_ties_go_to_the_lower_block_id():
  results = run_sequence(tiny(capacity_chunks=4), range(NUM_CHUNKS), seed=17, make_chunk=dyadic_chunk)
  ties = sum(s.gap == 0 for r in results for s in r.selections.values())
  assert ties > 50, ties  # many top-k boundaries fall inside a run of equal scores


@pytest.mark.parametrize("branch", ["cmp", "slc", "swa"])
def test_each_branch_isolated_by_its_gate(branch):
  run_sequence(tiny(capacity_chunks=4), range(NUM_CHUNKS), seed=18, gates=branch)


@pytest.mark.parametrize("gates, sensitivity", [("beyond", 2 * REL_TOL), ("below", 0.5)])
def test_gate_logits_are_clipped(gates, sensitivity):
  """Every gate logit lies beyond +-10. "below": all three gates sit at sigmoid(-10) after the clip, so
  the output is 4.5e-5 (o_cmp + o_slc + o_swa) and an unclipped gate changes it completely."""
  config = tiny(capacity_chunks=4)
  results = run_sequence(config, range(5), seed=19, gates=gates)
  # The check is sensitive: without the clip the oracle's output moves beyond the tolerance.
  ocfg = oracle_config(config)
  rng = np.random.default_rng(19)
  clipped_store, raw_store = oracle.OracleStore(ocfg, 2), oracle.OracleStore(ocfg, 2)
  for c in range(5):
    data = random_chunk(ocfg, rng, 2, gates=gates)
    clipped = oracle.chunk_self_attention(clipped_store, *data[:3], c, data[3])
    raw = oracle.chunk_self_attention(raw_store, *data[:3], c, data[3], clip=False)
    np.testing.assert_array_equal(clipped.out, results[c].out)
    assert rel_err(raw.out, clipped.out) > sensitivity


@pytest.mark.parametrize("capacity", [8, 4])
@pytest.mark.parametrize("mode, memory", [
    ("omnimem", dict()),
    ("sink_window", dict(sink_frames=3, local_attn_frames=9)),
    ("dense", dict()),
])
def test_chunks_newer_than_c_in_the_store_are_ignored(mode, memory, capacity):
  """Contract: at chunk c only stored chunks with id <= c count (here: going back to chunk 2 after 6).

  With capacity 4 the window of the revisited chunk 2 also names chunks 0 and 1 whose slots now hold
  chunks 4 and 5: they are not stored any more and must not be read.
  """
  results = run_sequence(tiny(mode=mode, capacity_chunks=capacity, **memory), [0, 1, 2, 3, 4, 5, 6, 2, 3], seed=20)
  if capacity == 4 and mode == "omnimem":
    assert results[7].dense_chunks[0] == [2] and results[7].slot_table_after.tolist() == [4, 5, 2, 3]


# ---------------------------------------------------------------------------------------------
# The oracle on its own (hand-checkable cases).

def test_oracle_softmax_over_one_key_returns_its_value():
  rng = np.random.default_rng(0)
  q, key, value = rng.standard_normal((5, 8)), rng.standard_normal((1, 8)), rng.standard_normal((1, 8))
  np.testing.assert_array_equal(oracle.dense_attention(q, key, value), np.repeat(value, 5, axis=0))
  two_equal = oracle.dense_attention(q, np.repeat(key, 2, axis=0), np.array([[1.0] * 8, [3.0] * 8]))
  np.testing.assert_allclose(two_equal, 2.0)
  assert not oracle.dense_attention(q, np.zeros((0, 8)), np.zeros((0, 8))).any()


def test_oracle_ring_and_windows_by_hand():
  ocfg = oracle_config(tiny(mode="sink_window", sink_frames=3, local_attn_frames=9, capacity_chunks=4))
  assert ocfg.pinned == 1
  assert [oracle.slot_of_chunk(c, ocfg) for c in range(9)] == [0, 1, 2, 3, 1, 2, 3, 1, 2]
  ocfg = oracle_config(tiny(capacity_chunks=4))
  assert [oracle.slot_of_chunk(c, ocfg) for c in range(9)] == [0, 1, 2, 3, 0, 1, 2, 3, 0]
  store = oracle.OracleStore(oracle_config(tiny(mode="sink_window", sink_frames=3, local_attn_frames=9,
                                                capacity_chunks=4)), 1)
  n, h, d = store.cfg.tokens_per_chunk, store.cfg.num_heads, store.cfg.head_dim
  for c in range(6):
    store.write(c, np.full((1, n, h, d), c, np.float32), np.full((1, n, h, d), c, np.float32))
  assert store.slot_table().tolist() == [0, 4, 5, 3]
  assert oracle.dense_branch_chunks(store, 0, 5) == [0, 4, 5]
  assert oracle.dense_branch_chunks(store, 0, 3) == [0, 3]  # chunk 2 was evicted by chunk 5
  q = np.ones((1, n, h, d))
  store0 = oracle.OracleStore(store.cfg, 1)
  res = oracle.chunk_self_attention(store0, q, np.full((1, n, h, d), 2.0), np.full((1, n, h, d), 7.0), 0, None)
  np.testing.assert_allclose(res.out, 7.0)
  assert res.dense_chunks == [[0]]


def test_oracle_pooling_selection_and_empty_group_by_hand():
  ocfg = oracle_config(tiny(progressive_exclude=False, top_k=2))
  store = oracle.OracleStore(ocfg, 1)
  n, h, d = ocfg.tokens_per_chunk, ocfg.num_heads, ocfg.head_dim
  k = np.zeros((1, n, h, d))
  for t in range(n):
    k[0, t, :, 0] = t  # block j holds tokens 4j..4j+3 -> kbar_j[0] = 4j + 1.5
  v = np.ones((1, n, h, d))
  gates = np.zeros((1, n, h, 3))
  res = oracle.chunk_self_attention(store, np.ones((1, n, h, d)), k, v, 0, gates)
  kbar, vbar = store.pooled(0, 0)
  np.testing.assert_allclose(kbar[:, :, 0], np.broadcast_to(4 * np.arange(24) + 1.5, (h, 24)))
  np.testing.assert_allclose(vbar, 1.0)
  assert not res.branches["slc"].any() and all(s.num_candidates == 0 for s in res.selections.values())
  np.testing.assert_allclose(res.out, 0.5 * 1.0 + 0.5 * 0.0 + 0.5 * 1.0)  # sigmoid(0) (1 + 0 + 1)
  # Past the exclusion (chunk 3), the top-2 of chunk 0 for a positive query are its last two blocks.
  for c in (1, 2, 3):
    res = oracle.chunk_self_attention(store, np.ones((1, n, h, d)), k, v, c, gates)
  assert {s.ids for s in res.selections.values()} == {(23, 22)}
  assert all(s.num_candidates == 24 for s in res.selections.values())
