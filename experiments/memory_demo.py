r"""Runs the OmniMem attention core over a long rollout of a world that comes back to old places.

This is the smallest end-to-end job the library can do today (the DiT, sampler and VAE land in later
issues): one self-attention layer, jitted once, steps chunk by chunk through a preallocated KV store.
A camera loops over `--places` scenes; each chunk's keys and queries are that scene's features plus
fresh noise. When the camera returns to a scene last seen far outside the 3-chunk sliding window,
top-k retrieval (with Adaptive Window Exclusion) should fetch the blocks of the earlier visits.
The table shows per chunk: latency, how far back the selected blocks reach, the share beyond the
sliding window, and the share of (group, head) pairs whose best block comes from an earlier visit of
the same scene.

  python experiments/memory_demo.py                      # tiny preset, 16 chunks, CPU in seconds
  python experiments/memory_demo.py --chunks 40 --places 8 --report /tmp/demo.json
  python experiments/memory_demo.py --preset wan2.1-t2v-1.3b --chunks 12   # real shapes (GPU)
  python experiments/memory_demo.py --chunks 24 --capacity_chunks 8 --kv_format fp8   # eviction, compact store

With `--capacity_chunks` below `--chunks` the full-resolution ring evicts old chunks while the pooled
tier keeps the whole rollout: evicted blocks are never selected, and the `evicted` column gives the
share of the unrestricted top-k (every pooled chunk a candidate) that fell on them: what eviction costs.
"""

from __future__ import annotations

import dataclasses
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from omnimem_jax import io
from omnimem_jax.config import ATTENTION_MODES, ModelConfig, store_bytes
from omnimem_jax.memory import select, store
from omnimem_jax.model.attention import chunk_self_attention

_PRESET = flags.DEFINE_string("preset", "tiny", "Model preset (geometry of a chunk).")
_MODE = flags.DEFINE_enum("mode", "omnimem", list(ATTENTION_MODES), "Attention mode.")
_CHUNKS = flags.DEFINE_integer("chunks", 16, "Chunks to roll out.", lower_bound=1)
_PLACES = flags.DEFINE_integer("places", 5, "Scenes the camera loops over (revisit period).", lower_bound=1)
_NOISE = flags.DEFINE_float("noise", 0.5, "Per-visit noise on the scene features.", lower_bound=0.0)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Store and activation dtype.")
_CAPACITY = flags.DEFINE_integer("capacity_chunks", None, "Full-resolution chunk slots (default: every chunk); the "
                                 "pooled tier always keeps every chunk.", lower_bound=1)
_KV_FORMAT = flags.DEFINE_enum("kv_format", "bf16", list(store.KV_FORMATS),
                               "Full-resolution K/V format (compact: omnimem mode).")
_REPORT = flags.DEFINE_string("report", None, "Optional JSON report path.")


def scene_features(config: ModelConfig, places: int, seed: int) -> np.ndarray:
  """Per scene, token and head, a feature that its keys and queries share; smooth within a block."""
  rng = np.random.default_rng(seed)
  per_block = rng.standard_normal((places, config.blocks_per_chunk, 1, config.num_heads, config.head_dim))
  per_token = 0.3 * rng.standard_normal((places, config.blocks_per_chunk, config.memory.block_tokens,
                                         config.num_heads, config.head_dim))
  return (per_block + per_token).reshape(places, config.tokens_per_chunk, config.num_heads,
                                         config.head_dim).astype(np.float32)


def _cell(row: dict, key: str, width: int) -> str:
  return format(row[key], f"{width}.2f") if key in row else "-".rjust(width)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  base = ModelConfig.from_preset(_PRESET.value)
  capacity = max(_CHUNKS.value if _CAPACITY.value is None else _CAPACITY.value, base.memory.min_capacity_chunks)
  memory = dataclasses.replace(base.memory, mode=_MODE.value, capacity_chunks=capacity,
                               pooled_chunks=max(_CHUNKS.value, capacity))
  config = dataclasses.replace(base, memory=memory, num_layers=1)
  if _CHUNKS.value > config.max_chunks:
    raise app.UsageError(f"--chunks={_CHUNKS.value} exceeds the RoPE table ({config.max_chunks} chunks, "
                         f"{config.max_video_seconds:.1f} s of video)")
  dtype = jnp.dtype(_DTYPE.value)
  print(f"memory demo: preset={_PRESET.value} mode={memory.mode} chunks={_CHUNKS.value} places={_PLACES.value} "
        f"device={jax.devices()[0].device_kind} store={store_bytes(config, 1, dtype.itemsize) / 2**20:.1f} MiB")

  scenes = scene_features(config, _PLACES.value, _SEED.value)
  rng = np.random.default_rng(_SEED.value + 1)
  kv = store.init_store(config, batch_size=1, dtype=dtype, kv_format=_KV_FORMAT.value)
  layer, tables = store.layer_kv(kv.layers, 0), kv.tables
  use_gates = memory.mode == "omnimem"

  traces = []

  @jax.jit
  def step(layer, tables, chunk_index, q, k, v, gates):
    traces.append(None)  # Python side effect: runs once per trace, not per call
    out, layer, ids = chunk_self_attention(q, k, v, layer, tables, chunk_index, gates if use_gates else None,
                                           config)
    tables = store.assign(tables, chunk_index, memory)
    if ids is None:  # no retrieval outside omnimem mode
      return out, layer, tables, jnp.full((1,), -1, jnp.int32), jnp.float32(jnp.nan)
    unrestricted = select.select_blocks(q.transpose(0, 2, 1, 3), layer.k_pooled, tables, chunk_index, config,
                                        resident_only=False)
    picked = unrestricted >= 0
    evicted = picked & ~store.resident(tables, select.chunks_of_ids(unrestricted, tables, config), memory)
    evicted_share = jnp.sum(evicted) / jnp.maximum(jnp.sum(picked), 1)
    return out, layer, tables, select.retrieval_distances(ids, tables, chunk_index, config), evicted_share

  print(f"{'chunk':>5} {'scene':>5} {'ms':>8} {'mean dist':>9} {'beyond win':>10} {'best same scene':>15} "
        f"{'evicted':>7}")
  rows = []
  for chunk in range(_CHUNKS.value):
    place = chunk % _PLACES.value
    q, k = (scenes[place][None] + _NOISE.value * rng.standard_normal((1, *scenes.shape[1:]), np.float32)
            for _ in range(2))
    v = rng.standard_normal(q.shape).astype(np.float32)
    gates = rng.standard_normal((*q.shape[:3], 3)).astype(np.float32)
    start = time.perf_counter()
    out, layer, tables, distances, evicted = jax.block_until_ready(
        step(layer, tables, jnp.int32(chunk), *(jnp.asarray(x, dtype) for x in (q, k, v, gates))))
    millis = 1e3 * (time.perf_counter() - start)
    if not np.isfinite(np.asarray(out, np.float32)).all():
      raise RuntimeError(f"non-finite attention output at chunk {chunk}")
    distances = np.asarray(distances)
    valid = distances[distances >= 0]
    row = {"chunk": chunk, "scene": place, "ms": millis, "selected": int(valid.size)}
    if np.isfinite(evicted):
      row["evicted"] = float(evicted)
    if valid.size:
      row["mean_distance"] = float(valid.mean())
      row["beyond_window"] = float((valid >= memory.window_chunks).mean())
      best = distances[..., 0][distances[..., 0] >= 0]
      row["best_same_scene"] = float(((chunk - best) % _PLACES.value == place).mean())
    rows.append(row)
    print(f"{chunk:>5} {place:>5} {millis:>8.1f} {_cell(row, 'mean_distance', 9)} "
          f"{_cell(row, 'beyond_window', 10)} {_cell(row, 'best_same_scene', 15)} {_cell(row, 'evicted', 7)}")

  steady = [row["ms"] for row in rows[1:]] or [rows[0]["ms"]]
  revisits = [row["best_same_scene"] for row in rows
              if row["chunk"] >= _PLACES.value + memory.exclude_window_chunks and "best_same_scene" in row]
  print(f"first call (compile + run) {rows[0]['ms']:.0f} ms; median step {np.median(steady):.1f} ms; "
        f"traces of the step: {len(traces)}")
  if revisits:
    print(f"revisits: for {np.mean(revisits):.0%} of (group, head) pairs the best retrieved block is from an "
          f"earlier visit of the same scene (chance: {1 / _PLACES.value:.0%})")
  evicted = [row["evicted"] for row in rows if "evicted" in row]
  if capacity < _CHUNKS.value and evicted:
    print(f"eviction: {np.mean(evicted):.1%} of the unrestricted top-k picks (every pooled chunk a candidate) fell on "
          f"chunks the {capacity}-slot ring had evicted; the selection took the best resident blocks instead")
  if _REPORT.value:
    report = {"config": dataclasses.asdict(config), "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, "python": platform.python_version(), "rows": rows}
    io.write_json(_REPORT.value, report)
    print(f"report written to {_REPORT.value}")


if __name__ == "__main__":
  app.run(main)
