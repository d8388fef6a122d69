"""Autoregressive rollout: chunk after chunk, each denoised in a few steps over the KV store.

Per chunk (DESIGN.md section 6): the sampler's denoising calls, then the context pass that rewrites
the chunk's K/V from its clean latents. A segment of chunks is one jitted `lax.scan` with the store
in the carry (donated); within a chunk the model calls are a second `lax.scan`, so the DiT is traced
once. The chunk index is traced, so a rollout of any length compiles once per segment length.
Noise comes from `fold_in(fold_in(key, chunk), step)`: the same seed gives the same video whatever
the segmenting (streaming one chunk at a time equals one scan over all chunks).

`Rollout.stream` is the driver: it yields each segment as it is produced, switches prompts at chunk
boundaries (LongLive-style KV recache: the last `recache_chunks` chunks are re-encoded at the
context timestep under the new prompt, oldest first), and keeps per-chunk timings.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int

from omnimem_kernels.backends import Backends
from omnimem_jax import checkpoints, sharding
from omnimem_jax.config import SamplerConfig
from omnimem_jax.memory.store import KVStore, init_store, slot_of_chunk
from omnimem_jax.model import rope
from omnimem_jax.model.wan import CausalWanModel, CrossKV
from omnimem_jax.sampler import step_table


@dataclasses.dataclass(frozen=True)
class SegmentOutput:
  """Chunks first_chunk .. first_chunk + num_chunks - 1 of a rollout."""

  first_chunk: int
  latents: Float[Array, "b c f h w"]  # clean latents, frames_per_chunk per chunk
  retrieval: Int[Array, "n l bins"] | None  # per chunk and layer: selected blocks by chunks back
  seconds: float  # wall time of the segment (device work included)


def generate_chunk(model: CausalWanModel, store: KVStore, cross: CrossKV, key: jax.Array,
                   chunk_index: Int[Array, ""], sampler: SamplerConfig, batch_size: int, retrieval: bool,
                   backends: Backends = Backends()) -> tuple[jax.Array, KVStore, jax.Array | None]:
  """One chunk: the denoising calls and the context pass (one traced model call, scanned)."""
  config = model.config
  shape = (batch_size, config.in_channels, config.memory.frames_per_chunk, config.latent_height, config.latent_width)
  chunk_key = jax.random.fold_in(key, chunk_index)
  table = {name: jnp.asarray(value) for name, value in step_table(sampler).items()}
  steps = len(table["timestep"])

  def call(carry, step):
    x, x0_kept, store, _ = carry
    index, timestep, sigma, sigma_next, is_context = step
    outputs = model(x, jnp.full((batch_size,), timestep), cross, store, chunk_index, retrieval_histogram=retrieval,
                    backends=backends)
    velocity, store = outputs[:2]
    histogram = outputs[2] if retrieval else carry[3]
    x0 = x - sigma * velocity
    x0_kept = jnp.where(is_context > 0, x0_kept, x0)
    noise = jax.random.normal(jax.random.fold_in(chunk_key, index + 1), shape, jnp.float32)
    return ((1.0 - sigma_next) * x0 + sigma_next * noise, x0_kept, store, histogram), None

  histogram = jnp.zeros((config.num_layers, config.memory.capacity_chunks + 1), jnp.int32) if retrieval else None
  x = jax.random.normal(jax.random.fold_in(chunk_key, 0), shape, jnp.float32)
  per_step = (jnp.arange(steps), table["timestep"], table["sigma"], table["sigma_next"], table["is_context"])
  (_, x0, store, histogram), _ = jax.lax.scan(call, (x, jnp.zeros(shape, jnp.float32), store, histogram), per_step)
  return x0, store, histogram


TRACES: collections.Counter[str] = collections.Counter()  # traces (compilations) of the jitted pieces


def rollout_segment(graphdef: nnx.GraphDef, params: nnx.State, store: KVStore, cross: CrossKV, key: jax.Array,
                    first_chunk: Int[Array, ""], *, sampler: SamplerConfig, batch_size: int, retrieval: bool,
                    num_chunks: int, backends: Backends = Backends()
                    ) -> tuple[jax.Array, KVStore, jax.Array | None]:
  """Chunks first_chunk .. first_chunk + num_chunks - 1 as one scan: (latents [B, C, 3n, H, W], store,
  retrieval histograms [n, L, capacity + 1] or None). `Rollout` jits it once per segment length."""
  TRACES["segment"] += 1
  model = nnx.merge(graphdef, params)

  def one_chunk(store, chunk_index):
    x0, store, histogram = generate_chunk(model, store, cross, key, chunk_index, sampler, batch_size, retrieval,
                                          backends)
    return store, (x0, histogram)

  chunks = first_chunk + jnp.arange(num_chunks, dtype=jnp.int32)
  store, (latents, histograms) = jax.lax.scan(one_chunk, store, chunks)
  latents = jnp.moveaxis(latents, 0, 2)  # [n, B, C, f, H, W] -> [B, C, n, f, H, W]
  return latents.reshape(*latents.shape[:2], -1, *latents.shape[4:]), store, histograms


def context_pass(graphdef: nnx.GraphDef, params: nnx.State, store: KVStore, cross: CrossKV, x0: jax.Array,
                 chunk_index: Int[Array, ""], *, context_timestep: float,
                 backends: Backends = Backends()) -> KVStore:
  """Rewrites chunk c's K/V from its clean latents under `cross` (a prompt switch's KV recache)."""
  TRACES["context_pass"] += 1
  timestep = jnp.full((x0.shape[0],), context_timestep, jnp.float32)
  return nnx.merge(graphdef, params)(x0, timestep, cross, store, chunk_index, backends=backends)[1]


class Rollout:
  """Compiled rollout of one model: `stream` yields segments; `run` returns the whole video.

  Usage:
    rollout = Rollout(model, SamplerConfig())
    for segment in rollout.stream([(0, model.cross_kv(text))], num_chunks=80, seed=0):
      show(segment.latents)
  """

  def __init__(self, model: CausalWanModel, sampler: SamplerConfig = SamplerConfig(), *, batch_size: int = 1,
               store_dtype: Any = jnp.bfloat16, retrieval: bool = False,
               backends: Backends = Backends(), mesh: Mesh | None = None):
    """`mesh` (from `sharding.make_mesh`): place the model's parameters on it (in place) and shard the
    store by heads over "model" and the batch over "data"; default: the ("data", "model") mesh the
    model's parameters already live on, if any, else one device."""
    self.model, self.sampler, self.batch_size, self.store_dtype = model, sampler, batch_size, store_dtype
    if retrieval and model.config.memory.mode != "omnimem":
      raise ValueError(f"retrieval histograms exist in omnimem mode only, not {model.config.memory.mode}")
    self.retrieval = retrieval  # opt-in: it scores the selection once more in every model call
    self.backends = backends
    if mesh is not None:
      sharding.make_mesh(mesh.shape["data"], mesh.shape["model"], config=model.config, batch_size=batch_size,
                         devices=mesh.devices.flat)  # validates heads / batch divisibility
      sharding.shard_module(model, mesh)
    self.mesh = sharding.module_mesh(model) if mesh is None else mesh
    self.traces = 0  # compilations this rollout caused
    self.store: KVStore | None = None
    self.timings: list[tuple[int, int, float]] = []  # (first chunk, chunks, seconds) per segment
    self._graphdef, self._params = nnx.split(model)
    self._cross_sharding = None if self.mesh is None else CrossKV(*(sharding.named(self.mesh, sharding.CROSS_AXES),) * 2)
    self._segments: dict[int, Callable[..., Any]] = {}  # jitted rollout_segment per segment length
    context = functools.partial(context_pass, self._graphdef, context_timestep=sampler.context_timestep,
                                backends=self.backends)
    self._context = jax.jit(context, donate_argnums=(1,), **self._shardings(for_segment=False))

  def cross_kv(self, text_embeddings: Float[Array, "b text text_dim"] | np.ndarray) -> CrossKV:
    """`model.cross_kv` of a prompt's text-encoder output, computed on (and laid out for) the rollout's
    devices: the batch over "data", heads over "model"."""
    placement = None if self.mesh is None else sharding.named(self.mesh, ("batch", None, None))
    encode = jax.jit(lambda params, text: nnx.merge(self._graphdef, params).cross_kv(text),
                     out_shardings=self._cross_sharding)
    with self._mesh_context():
      return encode(self._params, self._placed(text_embeddings, placement))

  def _shardings(self, for_segment: bool) -> dict[str, Any]:
    """jit's in/out shardings on the rollout's mesh (params, store, cross K/V, ...); none on one device."""
    if self.mesh is None:
      return {}
    mesh, replicated = self.mesh, NamedSharding(self.mesh, PartitionSpec())
    params, store = sharding.state_shardings(self._params, mesh), sharding.store_shardings(mesh)
    cross, latents = self._cross_sharding, sharding.named(mesh, ("batch", None, None, None, None))
    if for_segment:  # (params, store, cross, key, first chunk) -> (latents, store, histograms)
      return {"in_shardings": (params, store, cross, replicated, replicated),
              "out_shardings": (latents, store, replicated if self.retrieval else None)}
    return {"in_shardings": (params, store, cross, latents, replicated), "out_shardings": store}

  def _segment(self, num_chunks: int) -> Callable[..., Any]:
    if num_chunks not in self._segments:
      segment = functools.partial(rollout_segment, self._graphdef, sampler=self.sampler, batch_size=self.batch_size,
                                  retrieval=self.retrieval, num_chunks=num_chunks,
                                  backends=self.backends)
      self._segments[num_chunks] = jax.jit(segment, donate_argnums=(1,), **self._shardings(for_segment=True))
    return self._segments[num_chunks]

  def _mesh_context(self) -> contextlib.AbstractContextManager:
    """Traces under the rollout's mesh, so attention runs under `shard_map` on local heads."""
    return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

  def _placed(self, tree: Any, target: Any = None) -> Any:
    """`tree` moved explicitly (no implicit transfers) onto the rollout's devices / shardings."""
    if self.mesh is None:
      return checkpoints.place_like_params(self.model, jax.device_put(tree))
    return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()) if target is None else target)

  # ---- driver ----------------------------------------------------------------------------------

  def check_length(self, num_chunks: int, first_chunk: int = 0) -> None:
    """Raises ValueError if the frames of these chunks leave the RoPE table (before any work)."""
    frames = self.model.config.memory.frames_per_chunk
    rope.check_frames(self.model.config, first_chunk * frames, num_chunks * frames)

  def stream(self, prompts: Sequence[tuple[int, CrossKV]], num_chunks: int, seed: int = 0, *,
             segment_chunks: int = 1, recache_chunks: int = 7, store: KVStore | None = None
             ) -> Iterator[SegmentOutput]:
    """Generates `num_chunks` chunks, yielding every `segment_chunks` of them as they are done.

    Args:
      prompts: (first chunk, cross K/V) per prompt, the first at chunk 0, increasing; from each
        switch on the new prompt conditions the chunks, after its KV recache.
      num_chunks: chunks to generate (3 latent frames each).
      seed: noise seed.
      segment_chunks: chunks per compiled scan (1 streams; num_chunks runs one scan).
      recache_chunks: chunks before a switch re-encoded under the new prompt (still stored ones).
      store: continue from this store (default: a fresh one). The final store is `self.store`.
    """
    self.check_length(num_chunks)
    starts = [start for start, _ in prompts]
    if not prompts or starts[0] != 0 or starts != sorted(set(starts)) or starts[-1] >= num_chunks:
      raise ValueError(f"prompt switches must start at chunk 0 and increase within the {num_chunks} chunks, "
                       f"got first chunks {starts}")
    if num_chunks % segment_chunks:
      raise ValueError(f"num_chunks={num_chunks} must be a multiple of segment_chunks={segment_chunks}")
    if any(start % segment_chunks for start in starts):
      raise ValueError(f"prompt switches {starts} must fall on segment boundaries (multiples of {segment_chunks})")
    config = self.model.config
    if store is None:  # placed once: the store is donated from call to call and never leaves the devices
      fresh = jax.jit(init_store, static_argnums=(0, 1, 2), out_shardings=None if self.mesh is None else
                      sharding.store_shardings(self.mesh))
      store = fresh(config, self.batch_size, self.store_dtype)
      store = store if self.mesh is not None else self._placed(store)
    self.store = store
    key = jax.jit(jax.random.key)(self._placed(np.uint32(seed)))  # made on the devices
    switches = {start: cross if self.mesh is None else self._placed(cross, self._cross_sharding)
                for start, cross in prompts}
    recent: list[tuple[int, jax.Array]] = []  # clean latents of the last recache_chunks chunks
    cross = switches[0]
    frames = config.memory.frames_per_chunk
    for first in range(0, num_chunks, segment_chunks):
      start_time = time.perf_counter()
      if first in switches and first > 0:
        cross = switches[first]
        held = jax.device_get(self.store.slot_chunk)
        for chunk, x0 in recent:
          if int(held[int(slot_of_chunk(chunk, config.memory))]) == chunk:
            with self._mesh_context():
              self.store = self._context(self._params, self.store, cross, x0, self._placed(np.int32(chunk)))
      traces = TRACES["segment"]
      with self._mesh_context():
        latents, self.store, histograms = self._segment(segment_chunks)(self._params, self.store, cross, key,
                                                                        self._placed(np.int32(first)))
      self.traces += TRACES["segment"] - traces
      latents.block_until_ready()
      seconds = time.perf_counter() - start_time
      self.timings.append((first, segment_chunks, seconds))
      for index in range(segment_chunks):
        recent.append((first + index, jax.lax.slice_in_dim(latents, index * frames, (index + 1) * frames, axis=2)))
      recent = recent[-recache_chunks:] if recache_chunks else []
      yield SegmentOutput(first, latents, histograms, seconds)

  def run(self, prompts: Sequence[tuple[int, CrossKV]], num_chunks: int, seed: int = 0,
          **kwargs: Any) -> tuple[jax.Array, np.ndarray | None]:
    """The whole rollout: (latents [B, C, 3 * num_chunks, H, W], retrieval histograms or None)."""
    segments = list(self.stream(prompts, num_chunks, seed, **kwargs))
    latents = jnp.concatenate([segment.latents for segment in segments], axis=2)
    if not self.retrieval:
      return latents, None
    return latents, np.concatenate([np.asarray(segment.retrieval) for segment in segments])
