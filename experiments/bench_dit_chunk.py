r"""Times one CausalWanModel chunk call at the real 1.3B shape (bf16) and records peak device memory.

Random weights (speed does not depend on their values); a KV store of `--capacity` chunk slots
filled with random K/V for chunks 0..c-1, so the call at chunk c = capacity - 1 reads a full history.
Memory: the compiled call's temp and argument bytes, and the process-wide device peak (run one mode
per process for a per-mode peak).
Beside the model it measures the device's copy and bf16 matmul ceilings, and reports the call's
FLOPs over the matmul ceiling as the floor. `--backends` chooses each attention op's backend. Writes
JSON to --output (`omnimem_jax.benchmarking.write_report`: device, versions, commit, flags).

  python experiments/bench_dit_chunk.py --modes=omnimem,window \
      --output=benchmarks/results/dit_chunk_h100_bf16.json
  python experiments/bench_dit_chunk.py --preset=tiny --capacity=4 --output=/tmp/dit_chunk.json   # smoke run
"""

import dataclasses
import functools
import json
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from omnimem_kernels import dispatch
from omnimem_kernels.backends import Backends
from omnimem_jax import benchmarking, environment
from omnimem_jax.config import ModelConfig
from omnimem_jax.memory.store import KVStore, LayerKV, init_store, layer_kv, written_tables
from omnimem_jax.model.wan import CausalWanModel, count_parameters

_MODES = flags.DEFINE_list("modes", ["omnimem", "window"], "Attention modes to time.")
_PRESET = flags.DEFINE_string("preset", "wan2.1-t2v-1.3b", "Model preset.")
_CAPACITY = flags.DEFINE_integer("capacity", 10, "KV store slots; the timed call is chunk capacity - 1.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed calls per mode.", lower_bound=1)
_BACKENDS = flags.DEFINE_string("backends", "", "Backend per attention op, e.g. 'selection=triton,dense=mosaic_gpu' "
                                "(omnimem_kernels.backends.Backends.parse; default: per platform).")
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
      new = dataclasses.replace(layer, k=k, v=v, k_pooled=pool(k).astype(jnp.bfloat16),
                                v_pooled=pool(v).astype(jnp.bfloat16))
      return jax.tree.map(lambda a, n: jax.lax.dynamic_update_index_in_dim(a, n, index, 2), layers, new)

    return jax.lax.fori_loop(0, config.num_layers, one_layer, layers)

  return KVStore(fill(store.layers), written_tables(config.memory, history))


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


def time_mode(mode: str, backends: Backends) -> dict:
  """One mode's chunk call: compile time and memory, time per call, and the backends it ran."""
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
  state = {"store": filled_store(config, chunk, key)}
  step = jax.jit(lambda model, x, t, cross, store, c: model(x, t, cross, store, c, backends=backends),
                 donate_argnums=(4,))
  timestep = jnp.array([937.5], jnp.float32)
  start = time.perf_counter()
  with dispatch.recording() as ran:  # the ops' backends are chosen while tracing
    compiled = step.lower(model, latents, timestep, cross, state["store"], chunk).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()

  def call() -> jax.Array:
    velocity, state["store"] = compiled(model, latents, timestep, cross, state["store"], chunk)
    return velocity

  timing = benchmarking.time_call(call, reps=_ITERS.value)
  result = {
      "mode": mode, "chunk_index": chunk, "history_chunks": chunk, "capacity_chunks": _CAPACITY.value,
      "parameters": count_parameters(model), "compile_s": compile_s, "backends_ran": benchmarking.backends_ran(ran),
      "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
      "argument_bytes": getattr(memory, "argument_size_in_bytes", None), **timing.to_dict(),
      "flops": chunk_flops(config, chunk), "process_peak_bytes_in_use": environment.peak_device_bytes(),
      "store_bytes": sum(x.nbytes for x in jax.tree.leaves(state["store"])),
      "finite": bool(jnp.isfinite(call()).all()),
  }
  del model, state, cross
  return result


def main(argv: Sequence[str]) -> None:
  del argv
  backends = Backends.parse(_BACKENDS.value)
  ceilings = benchmarking.device_ceilings()
  results = []
  for mode in _MODES.value:
    result = time_mode(mode, backends)
    result["floor_ms"] = 1e3 * result["flops"] / (ceilings["matmul_tflops"] * 1e12)
    result["time_over_floor"] = result["median_ms"] / result["floor_ms"]
    print(json.dumps(result), flush=True)
    results.append(result)
  benchmarking.write_report(_OUTPUT.value, {"dtype": "bfloat16", "preset": _PRESET.value, "batch": 1,
                                            "ceilings": ceilings, "results": results}, backends=backends)
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
