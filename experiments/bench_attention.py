r"""Benchmarks the OmniMem attention layer and its branches at the real shape, against floors.

One layer call at 480x832 (B=1, 12 heads, d=128, 4680 queries in 312 groups of 15, top-16 of 30-token
blocks) with 10 / 40 / 80 / 160 chunks of history in the store (bf16). For each history it times:
scoring + top-k (and its parts, plus `lax.approx_max_k`), the selection branch (Pallas Triton and
Mosaic GPU kernels, the XLA gather reference), the compressed and sliding branches (the Mosaic GPU
segment kernel, cuDNN and XLA), the whole layer (write + 3 branches + gates; default kernels, and
with cuDNN dense branches) and dense cuDNN attention over the full history.
Beside them, in the same run: measured copy bandwidth and bf16 matmul throughput, and the selection
branch's no-reuse HBM floor (bytes it must read / measured bandwidth).

Times are medians over `--reps` repetitions of `--inner` back-to-back calls (wall clock around
device-synchronised batches), with min / max as the spread.

  python experiments/bench_attention.py --out benchmarks/results/bench_attention_h100
  python experiments/bench_attention.py --chunks 80 --sweep_chunks 80   # + Triton launch parameters, segment-kernel splits
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from omnimem_kernels.block_topk import pallas_triton as block_topk_triton
from omnimem_kernels.segment_attention import pallas_mosaic_gpu as segment_mosaic_gpu
from omnimem_kernels.selection_attention import api as selection_api
from omnimem_kernels.selection_attention import pallas_triton
from omnimem_jax.config import ModelConfig
from omnimem_jax.memory import select, store
from omnimem_jax.model import attention

_CHUNKS = flags.DEFINE_list("chunks", ["10", "40", "80", "160"], "Chunks of history to benchmark.")
_REPS = flags.DEFINE_integer("reps", 7, "Repetitions (median and spread over these).", lower_bound=1)
_INNER = flags.DEFINE_integer("inner", 10, "Back-to-back calls per repetition.", lower_bound=1)
_OUT = flags.DEFINE_string("out", "benchmarks/results/bench_attention", "Output path prefix (.json, .png).")
_SWEEP = flags.DEFINE_list("sweep_chunks", [], "Histories at which to also sweep the Triton kernels' launch "
                           "parameters and the segment kernel's key splits.")
_SKIP_XLA_ABOVE = flags.DEFINE_integer("skip_xla_above", 80, "Skip the all-XLA layer above this many chunks.")


def timeit(fn: Callable[[], object], reps: int, inner: int) -> dict[str, float]:
  """Median / min / max milliseconds per call of `fn` (already compiled by one warm-up call)."""
  jax.block_until_ready(fn())
  samples = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(inner):
      out = fn()
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / inner * 1e3)
  return {"median_ms": float(np.median(samples)), "min_ms": float(np.min(samples)), "max_ms": float(np.max(samples))}


def ceilings(reps: int) -> dict[str, float]:
  """Measured device-to-device copy bandwidth (read + write bytes) and bf16 matmul throughput."""
  x = jax.random.normal(jax.random.key(0), (512, 1024, 1024), jnp.bfloat16)  # 1 GiB
  copy = jax.jit(lambda a: a + jnp.bfloat16(1))
  t = timeit(lambda: copy(x), reps, 5)
  bandwidth = 2 * x.size * x.dtype.itemsize / (t["median_ms"] * 1e-3)
  del x
  a, b = (jax.random.normal(jax.random.key(i), (8192, 8192), jnp.bfloat16) for i in (1, 2))
  matmul = jax.jit(lambda p, q: p @ q)
  t_mm = timeit(lambda: matmul(a, b), reps, 5)
  return {"copy_bandwidth_bytes_per_s": bandwidth, "copy_ms": t["median_ms"],
          "matmul_tflops": 2 * 8192**3 / (t_mm["median_ms"] * 1e-3) / 1e12}


@dataclasses.dataclass
class Inputs:
  config: ModelConfig
  layer: store.LayerKV
  slot_chunk: jax.Array
  chunk_index: jax.Array
  q: jax.Array  # [b, n, h, d]
  k: jax.Array
  v: jax.Array
  gate_logits: jax.Array


def make_inputs(chunks: int, seed: int = 0) -> Inputs:
  """A full store of `chunks` chunks of random bf16 K/V (pooled K/V = block means) and one chunk's q/k/v."""
  base = ModelConfig()
  config = dataclasses.replace(base, memory=dataclasses.replace(base.memory, capacity_chunks=chunks))
  keys = jax.random.split(jax.random.key(seed), 6)
  shape = (1, config.num_heads, chunks, config.tokens_per_chunk, config.head_dim)
  k_store = jax.random.normal(keys[0], shape, jnp.bfloat16)
  v_store = jax.random.normal(keys[1], shape, jnp.bfloat16)
  block_view = (1, config.num_heads, chunks * config.blocks_per_chunk, config.memory.block_tokens, config.head_dim)
  pooled = lambda x: x.reshape(block_view).astype(jnp.float32).mean(axis=3).astype(jnp.bfloat16)  # noqa: E731
  layer = store.LayerKV(k_store, v_store, pooled(k_store), pooled(v_store))
  token_shape = (1, config.tokens_per_chunk, config.num_heads, config.head_dim)
  q, k, v = (jax.random.normal(key, token_shape, jnp.bfloat16) for key in keys[2:5])
  gates = jax.random.normal(keys[5], (*token_shape[:3], 3), jnp.float32)
  return Inputs(config, layer, jnp.arange(chunks, dtype=jnp.int32), jnp.int32(chunks - 1), q, k, v, gates)


def selection_floor_bytes(config: ModelConfig, batch: int = 1) -> int:
  """K+V bytes the selection branch must read if no block is reused: every (group, head) reads its own."""
  m = config.memory
  return batch * config.num_heads * config.groups_per_chunk * m.top_k * m.block_tokens * config.head_dim * 2 * 2


def bench_history(chunks: int, reps: int, inner: int, sweep: bool, skip_xla_above: int) -> dict:
  """Every timed entry for one history length, in ms per layer call."""
  inp = make_inputs(chunks)
  config, layer = inp.config, inp.layer
  heads, head_dim, tokens = config.num_heads, config.head_dim, config.tokens_per_chunk
  q_heads = inp.q.transpose(0, 2, 1, 3)
  slot_chunk = store.assign_slot(inp.slot_chunk, inp.chunk_index, config.memory)
  results: dict[str, dict] = {}

  def record(name, fn):
    results[name] = timeit(fn, reps, inner)
    print(f"  {chunks:4d} chunks  {name:34s} {results[name]['median_ms']:9.3f} ms", flush=True)

  # Scoring + top-k (with AWE).
  scores_fn = jax.jit(lambda q, kp: select.block_scores(q, kp, config.memory.group_size))
  select_fns = {impl: jax.jit(lambda q, kp, sc, c, impl=impl: select.select_blocks(q, kp, sc, c, config,
                                                                                   implementation=impl))
                for impl in ("triton", "xla")}
  scores = scores_fn(q_heads, layer.k_pooled)
  top_k = config.memory.top_k
  for impl, fn in select_fns.items():
    record(f"score_topk_{impl}", lambda fn=fn: fn(q_heads, layer.k_pooled, slot_chunk, inp.chunk_index))
  record("scores_only", lambda: scores_fn(q_heads, layer.k_pooled))
  topk_fn = jax.jit(lambda s: jax.lax.top_k(s, top_k)[1])
  approx_fn = jax.jit(lambda s: jax.lax.approx_max_k(s, top_k, recall_target=0.95)[1])
  record("top_k_only", lambda: topk_fn(scores))

  def two_stage(s):  # per-chunk top-k, then top-k of the chunk winners (same set as one top_k)
    per_chunk = s.reshape(*s.shape[:-1], chunks, config.blocks_per_chunk)
    values, ids = jax.lax.top_k(per_chunk, top_k)
    ids = ids + config.blocks_per_chunk * jnp.arange(chunks, dtype=jnp.int32)[:, None]
    _, pick = jax.lax.top_k(values.reshape(*s.shape[:-1], -1), top_k)
    return jnp.take_along_axis(ids.reshape(*s.shape[:-1], -1), pick, axis=-1)

  two_stage_fn = jax.jit(two_stage)
  record("two_stage_top_k_only", lambda: two_stage_fn(scores))
  record("approx_max_k_only", lambda: approx_fn(scores))
  exact, approx = np.asarray(topk_fn(scores)), np.asarray(approx_fn(scores))
  recall = float(np.mean([np.isin(a, e).mean() for a, e in zip(approx.reshape(-1, top_k)[:4096],
                                                             exact.reshape(-1, top_k)[:4096], strict=True)]))
  if sweep:
    qbar = select.group_mean_queries(q_heads, config.memory.group_size)
    cand = select.candidate_blocks(slot_chunk, inp.chunk_index, config)
    for rows, tile, score_warps, select_warps in ((64, 128, 4, 1), (64, 128, 4, 2), (64, 64, 4, 1), (128, 128, 8, 1),
                                                  (32, 128, 4, 1)):
      fn = jax.jit(lambda qb, kp, cd, r=rows, t=tile, sw=score_warps, lw=select_warps: block_topk_triton.block_top_k(
          qb, kp, cd, top_k=top_k, divisor=math.sqrt(head_dim), rows=r, tile=t, score_warps=sw, select_warps=lw))
      record(f"topk_triton_r{rows}_t{tile}_sw{score_warps}_lw{select_warps}",
             lambda fn=fn: fn(qbar, layer.k_pooled, cand))
  ids = select_fns["xla"](q_heads, layer.k_pooled, slot_chunk, inp.chunk_index)
  triton_ids = np.asarray(select_fns["triton"](q_heads, layer.k_pooled, slot_chunk, inp.chunk_index))
  triton_agreement = float(np.mean(triton_ids == np.asarray(ids)))

  # Selection branch.
  block_view = (1, heads, chunks * config.blocks_per_chunk, config.memory.block_tokens, head_dim)
  k_blocks, v_blocks = layer.k.reshape(block_view), layer.v.reshape(block_view)
  for name in ("triton", "mosaic_gpu", "xla"):
    fn = jax.jit(lambda q, kb, vb, i, name=name: selection_api.selection_attention(q, kb, vb, i, implementation=name))
    record(f"selection_{name}", lambda fn=fn: fn(q_heads, k_blocks, v_blocks, ids))
  if sweep:
    scale = 1.0 / math.sqrt(head_dim)
    for keys_per_step in (64, 128, 256):
      for warps in (2, 4):
        for stages in (1, 2, 3):
          fn = jax.jit(lambda q, kb, vb, i, a=keys_per_step, w=warps, s=stages: pallas_triton.selection_attention(
              q, kb, vb, i, scale=scale, keys_per_step=a, num_warps=w, num_stages=s))
          record(f"selection_triton_k{keys_per_step}_w{warps}_s{stages}",
                 lambda fn=fn: fn(q_heads, k_blocks, v_blocks, ids))
  # Dense branches.
  recent = attention.attended_chunks(inp.chunk_index, config.memory)
  for impl in ("cudnn", "xla"):
    cmp_fn = jax.jit(lambda q, lay, sc, c, impl=impl: attention.compressed_attention(q, lay, sc, c, impl))
    swa_fn = jax.jit(lambda q, lay, sc, c, r, impl=impl: attention.chunk_attention(q, lay, sc, c, r, config.memory,
                                                                                  impl))
    record(f"compressed_{impl}", lambda f=cmp_fn: f(inp.q, layer, slot_chunk, inp.chunk_index))
    record(f"sliding_{impl}", lambda f=swa_fn: f(inp.q, layer, slot_chunk, inp.chunk_index, recent))

  # The dense branches through the Mosaic GPU segment kernel, reading the store in place.
  sliding_mosaic = jax.jit(lambda q, lay, sc, c, r: attention.chunk_attention(q, lay, sc, c, r, config.memory,
                                                                              "mosaic_gpu"))
  compressed_mosaic = jax.jit(lambda q, lay, sc, c: attention.compressed_attention(q, lay, sc, c, "mosaic_gpu"))
  record("sliding_mosaic_gpu", lambda: sliding_mosaic(inp.q, layer, slot_chunk, inp.chunk_index, recent))
  record("compressed_mosaic_gpu", lambda: compressed_mosaic(inp.q, layer, slot_chunk, inp.chunk_index))
  dense_agreement = {name: float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
                     for name, got, want in (
                         ("compressed", compressed_mosaic(inp.q, layer, slot_chunk, inp.chunk_index),
                          attention.compressed_attention(inp.q, layer, slot_chunk, inp.chunk_index, "cudnn")),
                         ("sliding", sliding_mosaic(inp.q, layer, slot_chunk, inp.chunk_index, recent),
                          attention.chunk_attention(inp.q, layer, slot_chunk, inp.chunk_index, recent, config.memory,
                                                    "cudnn")))}
  print(f"  max |mosaic - cudnn| per dense branch: {dense_agreement}", flush=True)
  if sweep:  # the segment kernel's key splits per query tile (wave filling), per dense branch
    scale = 1.0 / math.sqrt(head_dim)
    sliding_args = (attention._rows(layer.k), attention._rows(layer.v),
                    *attention._chunk_segments(layer, slot_chunk, inp.chunk_index, recent, config.memory))
    compressed_args = (layer.k_pooled, layer.v_pooled,
                       *attention._compressed_segments(layer, slot_chunk, inp.chunk_index))
    for splits in (1, 2, 3, 4):
      fn = jax.jit(functools.partial(segment_mosaic_gpu.segment_attention, scale=scale, splits=splits))
      record(f"sliding_mosaic_gpu_splits{splits}", lambda fn=fn: fn(inp.q, *sliding_args))
      record(f"compressed_mosaic_gpu_splits{splits}", lambda fn=fn: fn(inp.q, *compressed_args))

  # Whole layer (write + scores + top-k + three branches + gates); the store is donated and carried.
  def layer_entry(name, implementation, dense, topk):
    step = jax.jit(lambda q, k, v, lay, sc, c, g: attention.chunk_self_attention(
        q, k, v, lay, sc, c, g, config, implementation=implementation, dense_implementation=dense,
        topk_implementation=topk),
        donate_argnums=(3,))
    state = {"layer": jax.tree.map(jnp.copy, layer)}

    def call():
      out, state["layer"] = step(inp.q, inp.k, inp.v, state["layer"], inp.slot_chunk, inp.chunk_index,
                                 inp.gate_logits)
      return out

    record(name, call)
    del state

  layer_entry("layer", None, None, None)
  layer_entry("layer_cudnn_dense", None, "cudnn", None)
  layer_entry("layer_xla_topk", None, None, "xla")
  if chunks <= skip_xla_above:
    layer_entry("layer_all_xla", "xla", "xla", "xla")

  # Dense cuDNN attention over the full history (keys in cuDNN's [b, m, h, d] layout, prepared once).
  full_k = layer.k.reshape(1, heads, chunks * tokens, head_dim).transpose(0, 2, 1, 3)
  full_v = layer.v.reshape(1, heads, chunks * tokens, head_dim).transpose(0, 2, 1, 3)
  dense_fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
  record("dense_full_history_cudnn", lambda: dense_fn(inp.q, full_k, full_v))
  del full_k, full_v

  sel_bytes = selection_floor_bytes(config)
  return {"chunks": chunks, "times": results, "approx_max_k_recall": recall, "dense_mosaic_vs_cudnn_max_abs": dense_agreement, "triton_topk_id_agreement": triton_agreement, "selection_floor_bytes": sel_bytes,
          "flops": {"selection": 4 * heads * tokens * config.memory.top_k * config.memory.block_tokens * head_dim,
                    "compressed": 4 * heads * tokens * chunks * config.blocks_per_chunk * head_dim,
                    "sliding": 4 * heads * tokens * config.memory.window_chunks * tokens * head_dim,
                    "dense_full_history": 4 * heads * tokens * chunks * tokens * head_dim}}


def floors(entry: dict, ceiling: dict) -> dict[str, float]:
  """Per-branch lower bounds (ms): max(bytes / bandwidth, flops / matmul rate), and their sum."""
  bw, peak = ceiling["copy_bandwidth_bytes_per_s"], ceiling["matmul_tflops"] * 1e12
  chunks, tokens, heads, d, bpc = entry["chunks"], 4680, 12, 128, 156
  kv_bytes = 2 * 2 * heads * d  # K and V, bf16, per token
  out = {
      "selection_ms": max(entry["selection_floor_bytes"] / bw, entry["flops"]["selection"] / peak) * 1e3,
      "compressed_ms": max(chunks * bpc * kv_bytes / bw, entry["flops"]["compressed"] / peak) * 1e3,
      "sliding_ms": max(3 * tokens * kv_bytes / bw, entry["flops"]["sliding"] / peak) * 1e3,
      "score_topk_ms": chunks * bpc * heads * d * 2 / bw * 1e3,  # read the pooled keys once
      "dense_full_history_ms": max(chunks * tokens * kv_bytes / bw, entry["flops"]["dense_full_history"] / peak) * 1e3,
  }
  out["layer_ms"] = out["selection_ms"] + out["compressed_ms"] + out["sliding_ms"] + out["score_topk_ms"]
  return out


def plot(report: dict, path: str) -> bool:
  """Time vs history per entry (log scale); False when matplotlib is missing."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  names = ["layer", "layer_cudnn_dense", "dense_full_history_cudnn", "selection_triton", "selection_mosaic_gpu",
           "selection_xla", "score_topk_triton", "score_topk_xla", "compressed_mosaic_gpu", "compressed_cudnn",
           "sliding_mosaic_gpu", "sliding_cudnn", "layer_all_xla"]
  chunks = [e["chunks"] for e in report["histories"]]
  fig, ax = plt.subplots(figsize=(8, 5))
  for name in names:
    pts = [(e["chunks"], e["times"][name]["median_ms"]) for e in report["histories"]
           if "median_ms" in e["times"].get(name, {})]
    if pts:
      ax.plot(*zip(*pts, strict=True), marker="o", label=name)
  ax.plot(chunks, [e["floors"]["selection_ms"] for e in report["histories"]], "k--", label="selection HBM floor")
  ax.set_xlabel("chunks of history (0.75 s each)")
  ax.set_ylabel("ms per layer call")
  ax.set_yscale("log")
  ax.set_title(f"OmniMem attention, one layer, {report['device']}")
  ax.legend(fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


def main(argv):
  del argv
  device = jax.devices()[0]
  print(f"device: {device.device_kind}, jax {jax.__version__}", flush=True)
  ceiling = ceilings(_REPS.value)
  print(f"copy bandwidth {ceiling['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, matmul "
        f"{ceiling['matmul_tflops']:.0f} TFLOP/s", flush=True)
  histories = []
  for chunks in map(int, _CHUNKS.value):
    entry = bench_history(chunks, _REPS.value, _INNER.value, str(chunks) in _SWEEP.value, _SKIP_XLA_ABOVE.value)
    entry["floors"] = floors(entry, ceiling)
    histories.append(entry)
  config = ModelConfig()
  report = {
      "device": device.device_kind, "platform": device.platform, "jax_version": jax.__version__,
      "python": platform.python_version(), "dtype": "bfloat16", "reps": _REPS.value, "inner": _INNER.value,
      "timing": "median (min, max) over reps of wall-clock per call, averaged over inner back-to-back calls",
      "shapes": {"batch": 1, "heads": config.num_heads, "head_dim": config.head_dim,
                 "queries": config.tokens_per_chunk, "groups": config.groups_per_chunk,
                 "top_k": config.memory.top_k, "block_tokens": config.memory.block_tokens,
                 "blocks_per_chunk": config.blocks_per_chunk, "window_chunks": config.memory.window_chunks},
      "default_selection_implementations": list(selection_api.default_implementations()),
      "default_dense_implementation": attention.default_dense_implementation(jnp.bfloat16),
      "ceilings": ceiling, "histories": histories,
  }
  with open(_OUT.value + ".json", "w") as f:
    json.dump(report, f, indent=1)
  plotted = plot(report, _OUT.value + ".png")
  print(f"wrote {_OUT.value}.json" + (f" and {_OUT.value}.png" if plotted else " (no matplotlib: no PNG)"))
  columns = {"layer": "layer", "layer_cudnn_dense": "lay_cudnn", "dense_full_history_cudnn": "dense",
             "selection_triton": "sel_tri", "selection_mosaic_gpu": "sel_mgpu", "selection_xla": "sel_xla",
             "score_topk_triton": "topk", "score_topk_xla": "topk_xla", "compressed_mosaic_gpu": "cmp_mgpu",
             "compressed_cudnn": "cmp_cudnn", "sliding_mosaic_gpu": "swa_mgpu", "sliding_cudnn": "swa_cudnn"}
  print(f"{'chunks':>6} " + " ".join(f"{c:>9}" for c in columns.values()) + f" {'x dense':>8} {'sel_floor':>9}")
  for e in histories:
    t = {k: v.get("median_ms", float("nan")) for k, v in e["times"].items()}
    print(f"{e['chunks']:6d} " + " ".join(f"{t.get(k, float('nan')):9.3f}" for k in columns)
          + f" {t['dense_full_history_cudnn'] / t['layer']:8.1f} {e['floors']['selection_ms']:9.3f}")


if __name__ == "__main__":
  app.run(main)
