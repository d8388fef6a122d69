r"""Times the streaming Wan 2.1 VAE decode of one DiT chunk (3 latent frames -> 12 video frames) at
480x832, with random weights at the real VAE config, and writes JSON.

For each dtype: the first chunk (latent frames 0..2 from a zero cache -> 9 frames) and a steady
chunk (3 latent frames, carried cache -> 12 frames), each a jitted `decode_chunk` call with the
cache donated; median / min / max over `--iters` calls, compile time, the call's FLOPs (its
convolutions and matrix products, counted from its jaxpr) and the bytes it cannot avoid (arguments
and outputs once), the floor (FLOPs over the measured bf16 matmul rate or those bytes over the
measured copy bandwidth: the larger), the feature-cache size, and how far bf16 frames are from
float32 frames on the same weights. The VAE calls no kernel op, so there is no `--backends` flag
(its JSON records `backends: null`).

  python experiments/bench_vae.py --output=benchmarks/results/vae_decode_h100.json
  python experiments/bench_vae.py --preset=tiny --latent_height=4 --latent_width=6 --output=/tmp/vae.json
"""

import dataclasses
import functools
import json
import math
import time
from collections.abc import Sequence

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from omnimem_jax import benchmarking
from omnimem_jax.model.vae import VAEConfig, WanVAE, compiler_options, count_parameters, video_frames

_PRESET = flags.DEFINE_enum("preset", "wan2.1", ["wan2.1", "tiny"], "VAE config.")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Activation (and parameter) dtypes to time.")
_LATENT_HEIGHT = flags.DEFINE_integer("latent_height", 60, "Latent height (480 / 8).")
_LATENT_WIDTH = flags.DEFINE_integer("latent_width", 104, "Latent width (832 / 8).")
_CHUNK = flags.DEFINE_integer("frames_per_chunk", 3, "Latent frames per chunk.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed steady-chunk calls per dtype.", lower_bound=1)
_FIRST_ITERS = flags.DEFINE_integer("first_iters", 3, "Timed first-chunk calls per dtype.", lower_bound=1)
_OUTPUT = flags.DEFINE_string("output", None, "JSON output path.", required=True)


def matmul_flops(jaxpr: jax.extend.core.Jaxpr) -> float:
  """FLOPs of the convolutions and matrix products in `jaxpr` (2 per multiply-add), sub-jaxprs included.

  Counted from the program rather than XLA's cost analysis, which on the GPU leaves out the cuDNN
  convolutions (nearly all the work) and, in jax 0.11.2, returns None for a lowered GPU program.
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    out = eqn.outvars[0].aval.shape
    if eqn.primitive.name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *window)
      total += 2 * math.prod(out) * rhs[rhs_spec[1]] * math.prod(rhs[d] for d in rhs_spec[2:])
    elif eqn.primitive.name == "dot_general":
      (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(out) * math.prod(lhs[d] for d in lhs_contracting)
    repeats = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if isinstance(sub, jax.extend.core.Jaxpr):
          total += repeats * matmul_flops(sub)
  return total


def _cost(jaxpr: jax.extend.core.Jaxpr, compiled) -> dict:
  """Matrix-unit FLOPs of the call, and the bytes it cannot avoid: its arguments and outputs once."""
  memory = compiled.memory_analysis()
  return {"flops": matmul_flops(jaxpr), "temp_bytes": memory.temp_size_in_bytes,
          "min_bytes": memory.argument_size_in_bytes + memory.output_size_in_bytes}


def bench_dtype(params: dict, base: VAEConfig, dtype: str, latents: jax.Array, ceilings: dict
                ) -> tuple[dict, dict[str, np.ndarray]]:
  config = dataclasses.replace(base, dtype=dtype, param_dtype=dtype)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: WanVAE(config, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda p: p.astype(dtype), params))
  vae = nnx.merge(graphdef, state)
  batch, chunk, height, width, _ = latents.shape

  def decode(state, z, cache, first):
    return nnx.merge(graphdef, state).decode_chunk(z, cache, first=first)

  def fresh_cache() -> tuple[dict]:
    return (vae.init_decode_cache(batch, height, width),)

  step = jax.jit(decode, static_argnames="first", donate_argnames="cache", compiler_options=compiler_options())
  result = {"dtype": dtype, "parameters": count_parameters(vae)}
  outputs = {}
  compiled = {}
  for name, first, iters in (("first_chunk", True, _FIRST_ITERS.value), ("steady_chunk", False, _ITERS.value)):
    cache, = fresh_cache()
    result["cache_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves(cache)))
    start = time.perf_counter()
    lowered = step.lower(state, latents, cache, first)
    jaxpr = jax.make_jaxpr(functools.partial(decode, first=first))(state, latents, cache).jaxpr
    compiled[first] = lowered.compile()
    compile_s = time.perf_counter() - start
    if first:  # every call starts from a fresh zero cache, made outside the timed region
      timing = benchmarking.time_call(lambda cache: compiled[True](state, latents, cache), reps=iters,
                                      prepare=fresh_cache)
      frames, _ = compiled[True](state, latents, cache)
    else:  # steady state: the cache carried from chunk 0, then from call to call
      carried = {"cache": compiled[True](state, latents, cache)[1]}

      def steady_call() -> jax.Array:
        frames, carried["cache"] = compiled[False](state, latents, carried["cache"])
        return frames

      timing = benchmarking.time_call(steady_call, reps=iters)
      frames = steady_call()
    cost = _cost(jaxpr, compiled[first])
    floor_ms = 1e3 * max(cost["flops"] / (ceilings["matmul_tflops"] * 1e12),
                         cost["min_bytes"] / ceilings["copy_bandwidth_bytes_per_s"])
    result[name] = {"video_frames": int(frames.shape[1]), "expected_frames": video_frames(chunk, first=first),
                    "compile_s": compile_s, **timing.to_dict(), **cost, "floor_ms": floor_ms,
                    "time_over_floor": timing.median_ms / floor_ms if floor_ms else None,
                    "ms_per_video_frame": timing.median_ms / int(frames.shape[1]),
                    "finite": bool(jnp.isfinite(frames).all())}
    outputs[name] = np.asarray(frames.astype(jnp.float32))
  return result, outputs


def main(argv: Sequence[str]) -> None:
  del argv
  base = VAEConfig.from_preset(_PRESET.value)
  reference = WanVAE(dataclasses.replace(base, dtype="float32", param_dtype="float32"), rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(reference, nnx.Param))
  del reference
  shape = (1, _CHUNK.value, _LATENT_HEIGHT.value, _LATENT_WIDTH.value, base.z_dim)
  latents = jax.random.normal(jax.random.key(3), shape, jnp.float32)
  ceilings = benchmarking.device_ceilings()
  report = {
      "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
      "preset": _PRESET.value, "batch": 1, "latent_shape": list(shape),
      "video_frame_size": [8 * _LATENT_HEIGHT.value, 8 * _LATENT_WIDTH.value],
      "weights": "random (lecun normal convs, zero biases, unit gains)",
      "flops_counted": "convolutions and matrix products, 2 per multiply-add, from the jaxpr",
      "ceilings": ceilings, "results": [],
  }
  outputs = {}
  for dtype in _DTYPES.value:  # the JSON is rewritten after each dtype, so a cut-off run keeps what it has
    result, outputs[dtype] = bench_dtype(params, base, dtype, latents, ceilings)
    report["results"].append(result)
    if "float32" in outputs:
      for r in report["results"]:
        for name in ("first_chunk", "steady_chunk"):
          ref, frames = outputs["float32"][name], outputs[r["dtype"]][name]
          r[name]["rel_err_vs_float32"] = float(np.linalg.norm(frames - ref) / np.linalg.norm(ref))
    print(json.dumps(result), flush=True)
    benchmarking.write_report(_OUTPUT.value, report, backends=None)
  for r in report["results"]:
    print(f"{r['dtype']:>9}: first chunk {r['first_chunk']['median_ms']:.1f} ms "
          f"({r['first_chunk']['video_frames']} frames), steady chunk {r['steady_chunk']['median_ms']:.1f} ms "
          f"({r['steady_chunk']['video_frames']} frames, floor {r['steady_chunk']['floor_ms']:.1f} ms), "
          f"rel err vs f32 {r['steady_chunk'].get('rel_err_vs_float32')}")
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
