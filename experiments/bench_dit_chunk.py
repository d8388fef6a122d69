r"""Times one CausalWanModel chunk call at the real 1.3B shape (bf16) and records peak device memory.

Random weights (speed does not depend on their values); a KV store of `--capacity` chunk slots
filled with random K/V for chunks 0..c-1, so the call at chunk c = capacity - 1 reads a full history.
Memory: the compiled call's temp and argument bytes, and the process-wide device peak (run one mode
per process for a per-mode peak).
Beside the model it measures the bf16 matmul ceiling of the same device, and reports the call's
FLOPs over that ceiling as the floor. Writes JSON to --output.

  python experiments/bench_dit_chunk.py --modes=omnimem,window \
      --output=benchmarks/results/dit_chunk_h100_bf16.json
"""

import functools
import json
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from omnimem_jax.config import ModelConfig
from omnimem_jax.memory.store import KVStore, LayerKV, init_store, layer_kv
from omnimem_jax.model.wan import CausalWanModel, count_parameters

_MODES = flags.DEFINE_list("modes", ["omnimem", "window"], "Attention modes to time.")
_PRESET = flags.DEFINE_string("preset", "wan2.1-t2v-1.3b", "Model preset.")
_CAPACITY = flags.DEFINE_integer("capacity", 10, "KV store slots; the timed call is chunk capacity - 1.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed calls per mode.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON output path.", required=True)


def filled_store(config: ModelConfig, history: int, key: jax.Array) -> KVStore:
  """A store whose first `history` slots hold random bf16 K/V (and their block means), filled one
  layer at a time in place so that even an 80-chunk store fits beside its filling."""
  store = init_store(config, batch_size=1)

  @functools.partial(jax.jit, donate_argnums=0)
  def fill(layers: LayerKV) -> LayerKV:
    def one_layer(index, layers):
      layer = layer_kv(layers, index)  # [B, H, S, ...]
      k = jax.random.normal(jax.random.fold_in(key, 2 * index), layer.k.shape, jnp.bfloat16)
      v = jax.random.normal(jax.random.fold_in(key, 2 * index + 1), layer.v.shape, jnp.bfloat16)
      shape = (*k.shape[:-2], config.blocks_per_chunk, config.memory.block_tokens, config.head_dim)
      pool = lambda x: x.reshape(shape).mean(-2, dtype=jnp.float32).reshape(layer.k_pooled.shape)  # noqa: E731
      new = LayerKV(k, v, pool(k).astype(jnp.bfloat16), pool(v).astype(jnp.bfloat16))
      return jax.tree.map(lambda a, n: jax.lax.dynamic_update_index_in_dim(a, n, index, 2), layers, new)

    return jax.lax.fori_loop(0, config.num_layers, one_layer, layers)

  slot_chunk = jnp.where(jnp.arange(config.memory.capacity_chunks) < history,
                         jnp.arange(config.memory.capacity_chunks, dtype=jnp.int32), -1)
  return KVStore(fill(store.layers), slot_chunk)


def chunk_flops(config: ModelConfig, history: int) -> float:
  """Matmul FLOPs of one chunk call (projections, FFN, head; attention over what the mode reads)."""
  n, d, layers, m = config.tokens_per_chunk, config.dim, config.num_layers, config.memory
  linear = 2 * n * layers * (6 * d * d + 2 * d * config.ffn_dim)  # self q,k,v,o; cross q,o; FFN
  keys = {"dense": (history + 1) * n,
          "window": m.recent_chunks * n,
          "sink_window": (m.pinned_chunks + m.recent_chunks) * n,
          "omnimem": m.window_chunks * n + (history + 1) * config.blocks_per_chunk + m.top_k * m.block_tokens}[m.mode]
  attention = 4 * n * d * layers * (keys + config.text_len)
  return float(linear + attention)


def matmul_peak(size: int = 8192, iters: int = 20) -> float:
  """Measured bf16 matmul TFLOP/s (random data, after warm-up)."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16)
  matmul = jax.jit(lambda a, b: a @ b)
  matmul(a, b).block_until_ready()
  start = time.perf_counter()
  for _ in range(iters):
    out = matmul(a, b)
  out.block_until_ready()
  return 2 * size**3 * iters / (time.perf_counter() - start) / 1e12


def time_mode(mode: str) -> dict:
  base = ModelConfig.from_preset(_PRESET.value)
  config = ModelConfig.from_dict({**base.to_dict(), "memory": {**base.to_dict()["memory"], "mode": mode,
                                                               "capacity_chunks": _CAPACITY.value}})
  chunk = _CAPACITY.value - 1
  model = CausalWanModel(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  key = jax.random.key(1)
  latents = jax.random.normal(key, (1, config.in_channels, config.memory.frames_per_chunk, config.latent_height,
                                    config.latent_width), jnp.float32)
  text = jax.random.normal(key, (1, config.text_len, config.text_dim), jnp.bfloat16)
  cross = jax.jit(lambda model, text: model.cross_kv(text))(model, text)
  store = filled_store(config, chunk, key)
  step = jax.jit(lambda model, x, t, cross, store, c: model(x, t, cross, store, c), donate_argnums=(4,))
  timestep = jnp.array([937.5], jnp.float32)
  start = time.perf_counter()
  compiled = step.lower(model, latents, timestep, cross, store, chunk).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  velocity, store = step(model, latents, timestep, cross, store, chunk)
  velocity.block_until_ready()
  times = []
  for _ in range(_ITERS.value):
    start = time.perf_counter()
    velocity, store = step(model, latents, timestep, cross, store, chunk)
    velocity.block_until_ready()
    times.append(time.perf_counter() - start)
  stats = jax.devices()[0].memory_stats() or {}
  result = {
      "mode": mode, "chunk_index": chunk, "history_chunks": chunk, "capacity_chunks": _CAPACITY.value,
      "parameters": count_parameters(model), "compile_s": compile_s,
      "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
      "argument_bytes": getattr(memory, "argument_size_in_bytes", None),
      "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times),
      "flops": chunk_flops(config, chunk), "process_peak_bytes_in_use": stats.get("peak_bytes_in_use"),
      "store_bytes": sum(x.nbytes for x in jax.tree.leaves(store)), "finite": bool(jnp.isfinite(velocity).all()),
  }
  del model, store, cross
  return result


def main(argv: Sequence[str]) -> None:
  del argv
  peak = matmul_peak()
  results = []
  for mode in _MODES.value:
    result = time_mode(mode)
    result["floor_ms"] = 1e3 * result["flops"] / (peak * 1e12)
    result["time_over_floor"] = result["median_ms"] / result["floor_ms"]
    print(json.dumps(result), flush=True)
    results.append(result)
  report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "backend": jax.default_backend(),
            "dtype": "bfloat16", "preset": _PRESET.value, "batch": 1, "matmul_peak_tflops": peak, "results": results}
  with open(_OUTPUT.value, "w") as f:
    json.dump(report, f, indent=2)
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
