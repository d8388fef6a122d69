r"""Benchmarks the OmniMem attention layer and its branches at the real shape, against floors.

One layer call at 480x832 (B=1, 12 heads, d=128, 4680 queries in 312 groups of 15, top-16 of 30-token
blocks) with 10 / 40 / 80 / 160 chunks of history in the store (bf16). For each history it times:
scoring + top-k (and its parts, plus `lax.approx_max_k`), the selection branch (Pallas Triton and
Mosaic GPU kernels, the XLA gather reference), the compressed and sliding branches (the Mosaic GPU
segment kernel, cuDNN and XLA), the whole layer (write + 3 branches + gates; with `--backends`, and
with cuDNN dense branches, the XLA top-k, or XLA everywhere) and dense cuDNN attention over the full
history. With `--kv_formats` (default fp8, int4) the selection branch and the whole layer are timed
again over a compact store (`memory.store`: the full-resolution tier quantised, a plain recent ring),
with the layer's and the selection branch's relative error against the bf16 store. Every branch is
timed through the model's public functions (`model.attention`, `memory.select`) with the backend named per entry, compiled (never in Pallas interpret mode); an
entry whose backend cannot run here (another platform) is recorded as unavailable, with the reason.
Beside them, in the same run: measured copy bandwidth and bf16 matmul throughput, and the selection
branch's no-reuse HBM floor (bytes it must read / measured bandwidth).

Times are medians over `--reps` repetitions of `--inner` back-to-back calls (wall clock around
device-synchronised batches), with min / max as the spread (`omnimem_jax.benchmarking`).

  python experiments/bench_attention.py --out benchmarks/results/bench_attention_h100
  python experiments/bench_attention.py --chunks 80 --sweep_chunks 80   # + Triton launch parameters, segment-kernel splits
  python experiments/bench_attention.py --preset=tiny --chunks=4 --reps=1 --inner=1 --out=/tmp/attention   # smoke run
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from omnimem_kernels import dispatch
from omnimem_kernels import kv_quant
from omnimem_kernels.backends import Backends
from omnimem_kernels.block_topk import pallas_triton as block_topk_triton
from omnimem_kernels.masked_attention import masked_attention
from omnimem_kernels.segment_attention import pallas_mosaic_gpu as segment_mosaic_gpu
from omnimem_kernels.selection_attention import pallas_triton, selection_attention
from omnimem_jax import benchmarking, io
from omnimem_jax.config import ModelConfig
from omnimem_jax.memory import select, store
from omnimem_jax.model import attention

_CHUNKS = flags.DEFINE_list("chunks", ["10", "40", "80", "160"], "Chunks of history to benchmark.")
_PRESET = flags.DEFINE_string("preset", "wan2.1-t2v-1.3b", "Model preset (its attention geometry).")
_REPS = flags.DEFINE_integer("reps", 7, "Repetitions (median and spread over these).", lower_bound=1)
_INNER = flags.DEFINE_integer("inner", 10, "Back-to-back calls per repetition.", lower_bound=1)
_OUT = flags.DEFINE_string("out", "benchmarks/results/bench_attention", "Output path prefix (.json, .png).")
_SWEEP = flags.DEFINE_list("sweep_chunks", [], "Histories at which to also sweep the Triton kernels' launch "
                           "parameters and the segment kernel's key splits.")
_SKIP_XLA_ABOVE = flags.DEFINE_integer("skip_xla_above", 80, "Skip the all-XLA layer above this many chunks.")
_KV_FORMATS = flags.DEFINE_multi_enum("kv_formats", ["fp8", "int4"], ["fp8", "int4"],
                                      "Compact store formats to time and compare with bf16.")
_BACKENDS = flags.DEFINE_string("backends", "", "Backend per op of the 'layer' entry, e.g. 'selection=triton,"
                                "dense=mosaic_gpu' (omnimem_kernels.backends.Backends.parse; default: per platform).")

DENSE_BACKENDS = ("mosaic_gpu", "cudnn", "xla")
SELECTION_BACKENDS = ("triton", "mosaic_gpu", "xla")
TOPK_BACKENDS = ("triton", "xla")


@dataclasses.dataclass
class Inputs:
  """One layer's full store of `chunks` chunks and the current chunk's q / k / v / gates."""

  config: ModelConfig
  layer: store.LayerKV
  tables: store.SlotTables  # before the call (chunk c not yet assigned)
  assigned: store.SlotTables  # after `store.assign` of chunk c
  chunk_index: jax.Array
  q: jax.Array  # [b, n, h, d]
  k: jax.Array
  v: jax.Array
  gate_logits: jax.Array

  @property
  def q_heads(self) -> jax.Array:
    return self.q.transpose(0, 2, 1, 3)


def make_inputs(preset: str, chunks: int, seed: int = 0) -> Inputs:
  """A full store of `chunks` chunks of random bf16 K/V (pooled K/V = block means) and one chunk's q/k/v."""
  base = ModelConfig.from_preset(preset)
  config = dataclasses.replace(base, memory=dataclasses.replace(base.memory, capacity_chunks=chunks))
  keys = jax.random.split(jax.random.key(seed), 6)
  shape = (1, config.num_heads, chunks, config.tokens_per_chunk, config.head_dim)
  k_store = jax.random.normal(keys[0], shape, jnp.bfloat16)
  v_store = jax.random.normal(keys[1], shape, jnp.bfloat16)
  block_view = (1, config.num_heads, chunks * config.blocks_per_chunk, config.memory.block_tokens, config.head_dim)
  pooled = lambda x: x.reshape(block_view).astype(jnp.float32).mean(axis=3).astype(jnp.bfloat16)  # noqa: E731
  empty = store.layer_kv(store.init_store(config, 1, num_layers=1).layers, 0)
  layer = dataclasses.replace(empty, k=k_store, v=v_store, k_pooled=pooled(k_store), v_pooled=pooled(v_store))
  token_shape = (1, config.tokens_per_chunk, config.num_heads, config.head_dim)
  q, k, v = (jax.random.normal(key, token_shape, jnp.bfloat16) for key in keys[2:5])
  gates = jax.random.normal(keys[5], (*token_shape[:3], 3), jnp.float32)
  chunk_index = jnp.int32(chunks - 1)
  tables = store.written_tables(config.memory, chunks - 1)  # chunk c's slots are assigned by the call
  return Inputs(config, layer, tables, store.assign(tables, chunk_index, config.memory), chunk_index, q, k, v, gates)


def compact_inputs(inp: Inputs, kv_format: str) -> Inputs:
  """The same history in a compact store: the full-resolution tier quantised per block and head, the
  last window_chunks chunks plain in the recent ring (at slot chunk mod window), pooled K/V as is."""
  config = inp.config
  chunks = inp.tables.full.shape[0]
  blocks = (1, config.num_heads, -1, config.memory.block_tokens, config.head_dim)
  empty = store.layer_kv(store.init_store(config, 1, num_layers=1, kv_format=kv_format).layers, 0)
  tables = store.written_tables(config.memory, chunks - 1, kv_format)
  assigned = store.assign(tables, inp.chunk_index, config.memory)
  fields = {}
  for name in ("k", "v"):
    plain = getattr(inp.layer, name)  # slot s holds chunk s
    data, scale = kv_quant.quantize(plain.reshape(blocks), kv_format)
    fields.update({name: data.reshape(getattr(empty, name).shape), f"{name}_scale": scale.reshape(empty.k_scale.shape),
                   f"{name}_recent": plain[:, :, assigned.recent], f"{name}_pooled": getattr(inp.layer, f"{name}_pooled")})
  return dataclasses.replace(inp, layer=dataclasses.replace(empty, **fields), tables=tables, assigned=assigned)


class Recorder:
  """Times named entries into `results`; an entry whose backend refuses to run here is recorded as
  unavailable (`NotImplementedError` from the op's dispatch), with the reason."""

  def __init__(self, chunks: int, reps: int, inner: int):
    self.chunks, self.reps, self.inner = chunks, reps, inner
    self.results: dict[str, dict] = {}

  def __call__(self, name: str, fn: Callable[[], object]) -> bool:
    try:
      with dispatch.recording() as ran:  # what the entry's first (traced) call dispatched
        timing = benchmarking.time_call(fn, reps=self.reps, inner=self.inner)
    except NotImplementedError as err:
      self.results[name] = {"unavailable": " ".join(str(err).split())}
      print(f"  {self.chunks:4d} chunks  {name:34s} unavailable here", flush=True)
      return False
    self.results[name] = {**timing.to_dict(), "backends_ran": benchmarking.backends_ran(ran)}
    print(f"  {self.chunks:4d} chunks  {name:34s} {timing.median_ms:9.3f} ms", flush=True)
    return True


def bench_topk(inp: Inputs, record: Recorder, sweep: bool) -> dict:
  """Scoring + top-k (with AWE) per backend, and its parts; returns the agreement statistics."""
  config, pooled = inp.config, inp.layer.k_pooled
  top_k = config.memory.top_k
  select_fns = {name: jax.jit(lambda q, kp, sc, c, name=name: select.select_blocks(
      q, kp, sc, c, config, implementation=name, interpret=False)) for name in TOPK_BACKENDS}
  ran = {name: record(f"score_topk_{name}", lambda fn=fn: fn(inp.q_heads, pooled, inp.assigned, inp.chunk_index))
         for name, fn in select_fns.items()}
  scores_fn = jax.jit(lambda q, kp: select.block_scores(q, kp, config.memory.group_size))
  scores = scores_fn(inp.q_heads, pooled)
  record("scores_only", lambda: scores_fn(inp.q_heads, pooled))
  topk_fn = jax.jit(lambda s: jax.lax.top_k(s, top_k)[1])
  approx_fn = jax.jit(lambda s: jax.lax.approx_max_k(s, top_k, recall_target=0.95)[1])
  record("top_k_only", lambda: topk_fn(scores))
  chunks, blocks_per_chunk = inp.tables.full.shape[0], config.blocks_per_chunk

  def two_stage(s):  # per-chunk top-k, then top-k of the chunk winners (same set as one top_k)
    per_chunk = s.reshape(*s.shape[:-1], chunks, blocks_per_chunk)
    values, ids = jax.lax.top_k(per_chunk, min(top_k, blocks_per_chunk))
    ids = ids + blocks_per_chunk * jnp.arange(chunks, dtype=jnp.int32)[:, None]
    _, pick = jax.lax.top_k(values.reshape(*s.shape[:-1], -1), top_k)
    return jnp.take_along_axis(ids.reshape(*s.shape[:-1], -1), pick, axis=-1)

  two_stage_fn = jax.jit(two_stage)
  record("two_stage_top_k_only", lambda: two_stage_fn(scores))
  record("approx_max_k_only", lambda: approx_fn(scores))
  exact, approx = np.asarray(topk_fn(scores)).reshape(-1, top_k), np.asarray(approx_fn(scores)).reshape(-1, top_k)
  recall = float(np.mean([np.isin(a, e).mean() for a, e in zip(approx[:4096], exact[:4096], strict=True)]))
  if sweep:
    qbar = select.group_mean_queries(inp.q_heads, config.memory.group_size)
    candidates = select.candidate_blocks(inp.assigned, inp.chunk_index, config)
    for rows, tile, score_warps, select_warps in ((64, 128, 4, 1), (64, 128, 4, 2), (64, 64, 4, 1), (128, 128, 8, 1),
                                                  (32, 128, 4, 1)):
      fn = jax.jit(lambda qb, kp, cd, r=rows, t=tile, sw=score_warps, lw=select_warps: block_topk_triton.block_top_k(
          qb, kp, cd, top_k=top_k, divisor=select.score_divisor(config.head_dim), rows=r, tile=t, score_warps=sw,
          select_warps=lw))
      record(f"topk_triton_r{rows}_t{tile}_sw{score_warps}_lw{select_warps}", lambda fn=fn: fn(qbar, pooled, candidates))
  ids = {name: np.asarray(fn(inp.q_heads, pooled, inp.assigned, inp.chunk_index))
         for name, fn in select_fns.items() if ran[name]}
  agreement = float(np.mean(ids["triton"] == ids["xla"])) if "triton" in ids else None
  return {"approx_max_k_recall": recall, "triton_topk_id_agreement": agreement}


def bench_selection(inp: Inputs, record: Recorder, sweep: bool) -> None:
  """The selection attention per backend, over the XLA top-k's ids, reading the store's block view."""
  config = inp.config
  ids = select.select_blocks(inp.q_heads, inp.layer.k_pooled, inp.assigned, inp.chunk_index, config,
                             implementation="xla")
  block_view = (1, config.num_heads, -1, config.memory.block_tokens, config.head_dim)
  k_blocks, v_blocks = inp.layer.k.reshape(block_view), inp.layer.v.reshape(block_view)
  for name in SELECTION_BACKENDS:
    fn = jax.jit(lambda q, kb, vb, i, name=name: selection_attention(q, kb, vb, i, implementation=name,
                                                                     interpret=False))
    record(f"selection_{name}", lambda fn=fn: fn(inp.q_heads, k_blocks, v_blocks, ids))
  if sweep:
    scale = 1.0 / math.sqrt(config.head_dim)
    for keys_per_step in (64, 128, 256):
      for warps in (2, 4):
        for stages in (1, 2, 3):
          fn = jax.jit(lambda q, kb, vb, i, a=keys_per_step, w=warps, s=stages: pallas_triton.selection_attention(
              q, kb, vb, i, scale=scale, keys_per_step=a, num_warps=w, num_stages=s))
          record(f"selection_triton_k{keys_per_step}_w{warps}_s{stages}",
                 lambda fn=fn: fn(inp.q_heads, k_blocks, v_blocks, ids))


def bench_dense(inp: Inputs, record: Recorder, sweep: bool) -> dict:
  """The compressed and sliding branches per dense backend (`model.attention`'s public branch
  functions); returns each backend's largest difference from the XLA branch."""
  config, layer = inp.config, inp.layer
  recent = attention.attended_chunks(inp.chunk_index, config.memory)
  branches = {
      "compressed": jax.jit(lambda q, lay, sc, c, backends: attention.compressed_attention(
          q, lay, sc, c, backends=backends), static_argnums=4),
      "sliding": jax.jit(lambda q, lay, sc, c, backends: attention.chunk_attention(
          q, lay, sc, c, recent, config.memory, backends=backends), static_argnums=4),
  }
  agreement: dict[str, dict[str, float]] = {}
  for branch, fn in branches.items():
    outputs = {}
    for name in DENSE_BACKENDS:
      call = functools.partial(fn, inp.q, layer, inp.assigned, inp.chunk_index, Backends(dense=name))
      if record(f"{branch}_{name}", call):
        outputs[name] = call().astype(jnp.float32)
    agreement[branch] = {name: float(jnp.max(jnp.abs(out - outputs["xla"]))) for name, out in outputs.items()
                         if name != "xla"}
  print(f"  max |backend - xla| per dense branch: {agreement}", flush=True)
  if sweep:
    bench_segment_splits(inp, recent, record)
  return agreement


def bench_segment_splits(inp: Inputs, recent: jax.Array, record: Recorder) -> None:
  """The Mosaic GPU segment kernel's key splits per query tile (wave filling), per dense branch, on
  the segments `model.attention` gives each branch."""
  config, layer = inp.config, inp.layer
  rows = lambda x: x.reshape(*x.shape[:2], -1, x.shape[-1])  # noqa: E731  (a store viewed as rows: free)
  tokens = config.tokens_per_chunk
  sliding = (rows(layer.k), rows(layer.v),
             *attention.chunk_segments(inp.assigned.full, inp.chunk_index, recent,
                                       lambda c: store.slot_of_chunk(c, config.memory), tokens), tokens)
  compressed = (layer.k_pooled, layer.v_pooled,
                *attention.compressed_segments(inp.assigned.pooled, inp.chunk_index, config.blocks_per_chunk))
  scale = 1.0 / math.sqrt(config.head_dim)
  for splits in (1, 2, 3, 4):
    fn = jax.jit(functools.partial(segment_mosaic_gpu.segment_attention, scale=scale, splits=splits))
    record(f"sliding_mosaic_gpu_splits{splits}", lambda fn=fn: fn(inp.q, *sliding))
    record(f"compressed_mosaic_gpu_splits{splits}", lambda fn=fn: fn(inp.q, *compressed))


def time_layer(inp: Inputs, record: Recorder, name: str, backends: Backends) -> None:
  """The whole layer (write + scores + top-k + three branches + gates); the store is donated and
  carried from call to call, as in the DiT."""
  step = jax.jit(lambda q, k, v, lay, sc, c, g: attention.chunk_self_attention(
      q, k, v, lay, sc, c, g, inp.config, backends=backends), donate_argnums=(3,))
  state = {"layer": jax.tree.map(jnp.copy, inp.layer)}

  def call():
    out, state["layer"], _ = step(inp.q, inp.k, inp.v, state["layer"], inp.tables, inp.chunk_index, inp.gate_logits)
    return out

  record(name, call)


def bench_layer(inp: Inputs, record: Recorder, backends: Backends, all_xla: bool) -> None:
  """The whole layer per backend choice (`time_layer`)."""
  time_layer(inp, record, "layer", backends)
  time_layer(inp, record, "layer_cudnn_dense", dataclasses.replace(backends, dense="cudnn"))
  time_layer(inp, record, "layer_xla_topk", dataclasses.replace(backends, topk="xla"))
  if all_xla:
    time_layer(inp, record, "layer_all_xla", Backends(selection="xla", topk="xla", dense="xla"))


def bench_compact(inp: Inputs, record: Recorder, backends: Backends, kv_format: str) -> dict[str, float]:
  """The selection branch (per backend) and the whole layer over a compact store; returns the relative
  error of the selection branch and of the layer output against the bf16 store's (same ids)."""
  config, compact = inp.config, compact_inputs(inp, kv_format)
  ids = select.select_blocks(inp.q_heads, inp.layer.k_pooled, inp.assigned, inp.chunk_index, config,
                             implementation="xla")
  ids = select.full_resolution_ids(ids, inp.assigned, config)
  view = lambda x: x.reshape(1, config.num_heads, -1, config.memory.block_tokens, x.shape[-1])  # noqa: E731
  blocks = {fmt: (view(x.layer.k), view(x.layer.v)) for fmt, x in (("bf16", inp), (kv_format, compact))}
  scales = {"bf16": {}, kv_format: dict(k_scale=compact.layer.k_scale.reshape(1, config.num_heads, -1),
                                        v_scale=compact.layer.v_scale.reshape(1, config.num_heads, -1))}
  selections = {fmt: jax.jit(lambda q, i, fmt=fmt: selection_attention(q, *blocks[fmt], i, **scales[fmt],
                                                                      implementation="xla")[0]) for fmt in blocks}
  for name in SELECTION_BACKENDS:
    fn = jax.jit(lambda q, i, name=name: selection_attention(q, *blocks[kv_format], i, **scales[kv_format],
                                                              implementation=name, interpret=False)[0])
    record(f"selection_{name}_{kv_format}", lambda fn=fn: fn(inp.q_heads, ids))
  time_layer(compact, record, f"layer_{kv_format}", backends)
  step = jax.jit(lambda *args: attention.chunk_self_attention(*args, config, backends=backends)[0])
  layer = lambda x: step(x.q, x.k, x.v, x.layer, x.tables, x.chunk_index, x.gate_logits)  # noqa: E731
  error = lambda got, want: float(jnp.linalg.norm((got - want).astype(jnp.float32))  # noqa: E731
                                  / jnp.linalg.norm(want.astype(jnp.float32)))
  return {"selection_rel_err": error(selections[kv_format](inp.q_heads, ids), selections["bf16"](inp.q_heads, ids)),
          "layer_rel_err": error(layer(compact), layer(inp))}


def bench_dense_full_history(inp: Inputs, record: Recorder) -> None:
  """Dense cuDNN attention of the chunk over the whole history (keys tokens-major, prepared once)."""
  config, chunks = inp.config, inp.tables.full.shape[0]
  full = lambda x: x.reshape(1, config.num_heads, chunks * config.tokens_per_chunk, config.head_dim  # noqa: E731
                             ).transpose(0, 2, 1, 3)
  full_k, full_v = full(inp.layer.k), full(inp.layer.v)
  dense_fn = jax.jit(lambda q, k, v: masked_attention(q, k, v, implementation="cudnn"))
  record("dense_full_history_cudnn", lambda: dense_fn(inp.q, full_k, full_v))


def selection_floor_bytes(config: ModelConfig, batch: int = 1, kv_format: str = "bf16") -> int:
  """K+V bytes the selection branch must read if no block is reused: every (group, head) reads its own
  blocks (and, from a compact store, their two f32 scales)."""
  m = config.memory
  reads = batch * config.num_heads * config.groups_per_chunk * m.top_k
  element_bits = {"bf16": 16, "fp8": 8, "int4": 4}[kv_format]
  scale_bytes = 0 if kv_format == "bf16" else 2 * 4
  return reads * (2 * m.block_tokens * config.head_dim * element_bits // 8 + scale_bytes)


def branch_flops(config: ModelConfig, chunks: int) -> dict[str, int]:
  """Matmul FLOPs of each branch (and of dense attention over the whole history) for one layer call."""
  heads, tokens, head_dim, m = config.num_heads, config.tokens_per_chunk, config.head_dim, config.memory
  per_key = 4 * heads * tokens * head_dim
  return {"selection": per_key * m.top_k * m.block_tokens, "compressed": per_key * chunks * config.blocks_per_chunk,
          "sliding": per_key * m.window_chunks * tokens, "dense_full_history": per_key * chunks * tokens}


def bench_history(preset: str, chunks: int, reps: int, inner: int, sweep: bool, skip_xla_above: int,
                  backends: Backends, kv_formats: list[str]) -> dict:
  """Every timed entry for one history length, in ms per layer call."""
  inp = make_inputs(preset, chunks)
  record = Recorder(chunks, reps, inner)
  stats = bench_topk(inp, record, sweep)
  bench_selection(inp, record, sweep)
  dense_agreement = bench_dense(inp, record, sweep)
  bench_layer(inp, record, backends, all_xla=chunks <= skip_xla_above)
  compact = {fmt: bench_compact(inp, record, backends, fmt) for fmt in kv_formats}
  print(f"  compact store vs bf16 (relative error): {compact}", flush=True)
  bench_dense_full_history(inp, record)
  return {"chunks": chunks, "times": record.results, **stats, "dense_max_abs_vs_xla": dense_agreement,
          "compact_vs_bf16": compact,
          "selection_floor_bytes": {fmt: selection_floor_bytes(inp.config, kv_format=fmt)
                                    for fmt in ("bf16", *kv_formats)},
          "flops": branch_flops(inp.config, chunks)}


def floors(entry: dict, ceiling: dict, config: ModelConfig) -> dict[str, float]:
  """Per-branch lower bounds (ms): max(bytes / bandwidth, flops / matmul rate), and their sum."""
  bw, peak = ceiling["copy_bandwidth_bytes_per_s"], ceiling["matmul_tflops"] * 1e12
  chunks, tokens, blocks = entry["chunks"], config.tokens_per_chunk, config.blocks_per_chunk
  kv_bytes = 2 * 2 * config.num_heads * config.head_dim  # K and V, bf16, per token
  flops = entry["flops"]
  out = {
      "selection_ms": max(entry["selection_floor_bytes"]["bf16"] / bw, flops["selection"] / peak) * 1e3,
      **{f"selection_{fmt}_ms": max(floor / bw, flops["selection"] / peak) * 1e3
         for fmt, floor in entry["selection_floor_bytes"].items() if fmt != "bf16"},
      "compressed_ms": max(chunks * blocks * kv_bytes / bw, flops["compressed"] / peak) * 1e3,
      "sliding_ms": max(config.memory.window_chunks * tokens * kv_bytes / bw, flops["sliding"] / peak) * 1e3,
      "score_topk_ms": chunks * blocks * kv_bytes / 2 / bw * 1e3,  # read the pooled keys once
      "dense_full_history_ms": max(chunks * tokens * kv_bytes / bw, flops["dense_full_history"] / peak) * 1e3,
  }
  out["layer_ms"] = out["selection_ms"] + out["compressed_ms"] + out["sliding_ms"] + out["score_topk_ms"]
  return out


PLOTTED = ("layer", "layer_cudnn_dense", "dense_full_history_cudnn", "selection_triton", "selection_mosaic_gpu",
           "selection_xla", "score_topk_triton", "score_topk_xla", "compressed_mosaic_gpu", "compressed_cudnn",
           "sliding_mosaic_gpu", "sliding_cudnn", "layer_all_xla")


def plot(report: dict, path: str) -> bool:
  """Time vs history per entry (log scale), written atomically; False when matplotlib is missing."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  chunks = [e["chunks"] for e in report["histories"]]
  fig, ax = plt.subplots(figsize=(8, 5))
  for name in PLOTTED:
    pts = [(e["chunks"], e["times"][name]["median_ms"]) for e in report["histories"]
           if "median_ms" in e["times"].get(name, {})]
    if pts:
      ax.plot(*zip(*pts, strict=True), marker="o", label=name)
  ax.plot(chunks, [e["floors"]["selection_ms"] for e in report["histories"]], "k--", label="selection HBM floor")
  ax.set_xlabel("chunks of history (0.75 s each)")
  ax.set_ylabel("ms per layer call")
  ax.set_yscale("log")
  ax.set_title(f"OmniMem attention, one layer, {jax.devices()[0].device_kind}")
  ax.legend(fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  with io.atomic_file(path) as partial:
    fig.savefig(partial, dpi=120, format="png")
  return True


def print_table(histories: list[dict]) -> None:
  """The main entries' medians per history (nan where unavailable), and the dense / layer ratio."""
  columns = {"layer": "layer", "layer_cudnn_dense": "lay_cudnn", "dense_full_history_cudnn": "dense",
             "selection_triton": "sel_tri", "selection_mosaic_gpu": "sel_mgpu", "selection_xla": "sel_xla",
             "score_topk_triton": "topk", "score_topk_xla": "topk_xla", "compressed_mosaic_gpu": "cmp_mgpu",
             "compressed_cudnn": "cmp_cudnn", "sliding_mosaic_gpu": "swa_mgpu", "sliding_cudnn": "swa_cudnn",
             "selection_triton_fp8": "sel_fp8", "selection_triton_int4": "sel_int4", "layer_fp8": "lay_fp8"}
  print(f"{'chunks':>6} " + " ".join(f"{c:>9}" for c in columns.values()) + f" {'x dense':>8} {'sel_floor':>9}")
  for e in histories:
    t = {k: v.get("median_ms", float("nan")) for k, v in e["times"].items()}
    print(f"{e['chunks']:6d} " + " ".join(f"{t.get(k, float('nan')):9.3f}" for k in columns)
          + f" {t['dense_full_history_cudnn'] / t['layer']:8.1f} {e['floors']['selection_ms']:9.3f}")


def main(argv):
  del argv
  backends = Backends.parse(_BACKENDS.value)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  ceiling = benchmarking.device_ceilings(reps=_REPS.value)
  print(f"copy bandwidth {ceiling['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, matmul "
        f"{ceiling['matmul_tflops']:.0f} TFLOP/s", flush=True)
  config = ModelConfig.from_preset(_PRESET.value)
  histories = []
  for chunks in map(int, _CHUNKS.value):
    entry = bench_history(_PRESET.value, chunks, _REPS.value, _INNER.value, str(chunks) in _SWEEP.value,
                          _SKIP_XLA_ABOVE.value, backends, _KV_FORMATS.value)
    entry["floors"] = floors(entry, ceiling, config)
    histories.append(entry)
  report = {
      "dtype": "bfloat16", "reps": _REPS.value, "inner": _INNER.value,
      "timing": "median (min, max) over reps of wall-clock per call, averaged over inner back-to-back calls",
      "shapes": {"batch": 1, "heads": config.num_heads, "head_dim": config.head_dim,
                 "queries": config.tokens_per_chunk, "groups": config.groups_per_chunk,
                 "top_k": config.memory.top_k, "block_tokens": config.memory.block_tokens,
                 "blocks_per_chunk": config.blocks_per_chunk, "window_chunks": config.memory.window_chunks},
      "ceilings": ceiling, "histories": histories,
  }
  benchmarking.write_report(_OUT.value + ".json", report, backends=backends)
  plotted = plot(report, _OUT.value + ".png")
  print(f"wrote {_OUT.value}.json" + (f" and {_OUT.value}.png" if plotted else " (no matplotlib: no PNG)"))
  print_table(histories)


if __name__ == "__main__":
  app.run(main)
