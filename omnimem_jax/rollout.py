"""Autoregressive rollout: chunk after chunk, each denoised in a few steps over the KV store.

docs/architecture.md, 'Rollout'. Per chunk, the sampler's denoising calls, then the context pass that
rewrites the chunk's K/V from its clean latents (`sampler.sample_chunk`). The rollout is split into

- `RolloutConfig`: the frozen description of a rollout (sampler, batch, store dtype, retrieval
  statistics, backends, noise function): everything its compiled functions depend on;
- `Retrieval`: what the selection picked in each chunk (histograms of how far back, or the ids);
- `RolloutState`: the explicit pytree state (KV store, noise key, next chunk, the clean latents of the
  most recent chunks with their chunk indices, kept for a prompt switch's KV recache, and the first
  chunk whose latents were not finite);
- pure functions `(model, state, ...) -> state`: `generate_segment` (chunks as one `lax.scan`, the
  store in the carry), `write_context` (given clean latents written as context chunks: a prefix) and
  `recache` (the recent chunks re-encoded under a new prompt);
- `Rollout`: those functions jitted once for one model (once per segment length; the store donated),
  placed on its devices, and the `stream` / `run` driver. Built on an abstract model (`nnx.eval_shape`),
  it lowers its segment function from shapes alone (`lower_segment`): the memory plan's working set.

The chunk index is traced, so a rollout of any length compiles once per segment length. A chunk whose
clean latents hold NaN or inf (broken weights or inputs) is recorded on the device as the state's
`nonfinite_chunk`, one flag per chunk reduced inside the compiled scan; `stream` checks it with each
segment it fetches anyway and stops with `NonFiniteLatentsError` naming the chunk. The noise of
chunk c, step s comes from `config.noise(key, c, s, shape)` (default `sampler.gaussian_noise`:
`fold_in(fold_in(key, c), s)`), so the same seed gives the same video whatever the segmenting, and a
caller can supply the noise to check a rollout against an external reference.
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
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from omnimem_jax import sharding
from omnimem_jax.config import SamplerConfig
from omnimem_jax.memory import select
from omnimem_jax.memory import store as kv_store
from omnimem_jax.memory.store import KVStore
from omnimem_jax.model import rope
from omnimem_jax.model.wan import CausalWanModel, CrossKV
from omnimem_jax.sampler import NoiseFn, gaussian_noise, sample_chunk, step_table
from omnimem_kernels import dispatch
from omnimem_kernels.backends import Backends


class NonFiniteLatentsError(FloatingPointError):
  """A chunk's clean latents hold NaN or inf: the rollout stops rather than yield a broken (black) video."""


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """What a rollout's compiled functions depend on.

  Attributes:
    sampler: the few-step schedule.
    batch_size: videos generated together (one prompt each).
    store_dtype: dtype of the KV store's plain tiers.
    kv_format: the full-resolution tier's format: "bf16" (plain, at store_dtype), or compact "fp8" /
      "int4" (omnimem mode; `memory.store`).
    retrieval: omnimem mode: also return, per chunk and layer, how many selected blocks lie 0, 1, ...
      chunks back (from the block ids the attention selected; `Retrieval.histograms`).
    record_ids: omnimem mode: also return the block ids every model call of every chunk selected
      (`Retrieval.ids`), e.g. to compare the picks of two rollouts.
    backends: the backend of each attention op (`omnimem_kernels.backends`).
    noise: the initial and fresh noise of every chunk and step (`sampler.NoiseFn`).
  """

  sampler: SamplerConfig = SamplerConfig()
  batch_size: int = 1
  store_dtype: jnp.dtype = jnp.dtype(jnp.bfloat16)
  kv_format: str = "bf16"
  retrieval: bool = False
  record_ids: bool = False
  backends: Backends = Backends()
  noise: NoiseFn = gaussian_noise


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Retrieval:
  """What the selection picked, per chunk (omnimem mode; `RolloutConfig.retrieval` / `record_ids`).

  Attributes:
    histograms: per chunk and layer, selected blocks by chunks back (bin d: d chunks back; the last bin,
      capacity_chunks, holds everything farther), summed over the chunk's model calls; or None.
    ids: per chunk, model call (the denoising steps, then the context pass) and layer, the pooled block
      ids each (batch entry, head, query group) selected, best first, -1 padded (`memory.select`); or None.
  """

  histograms: Int[Array, "n l bins"] | None
  ids: Int[Array, "n s l b h g k"] | None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RolloutState:
  """Everything a rollout carries from one segment to the next (a pytree; donate it under jit)."""

  store: KVStore
  key: jax.Array  # the noise key (a typed PRNG key)
  next_chunk: Int[Array, ""]  # the chunk the next segment starts at
  recent: Float[Array, "r b c f h w"]  # clean latents of the last r chunks, oldest first (KV recache)
  recent_chunks: Int[Array, " r"]  # their chunk indices; -1: none yet
  nonfinite_chunk: Int[Array, ""]  # the first chunk whose clean latents held NaN or inf; -1: none


# Logical axis names of the state's arrays (`sharding.tree_shardings`).
STATE_AXES = RolloutState(store=kv_store.LOGICAL_AXES, key=(), next_chunk=(), recent=(None, *sharding.LATENT_AXES),
                          recent_chunks=(None,), nonfinite_chunk=())


@dataclasses.dataclass(frozen=True)
class SegmentOutput:
  """Chunks first_chunk .. first_chunk + num_chunks - 1 of a rollout."""

  first_chunk: int
  latents: Float[Array, "b c f h w"]  # clean latents, frames_per_chunk per chunk
  retrieval: Retrieval | None  # what the selection picked (RolloutConfig.retrieval / record_ids)
  seconds: float  # wall time of the segment (device work included)


# ---- the pure rollout functions ------------------------------------------------------------------


def chunk_shape(model: CausalWanModel, batch_size: int) -> tuple[int, int, int, int, int]:
  """[B, C, frames_per_chunk, H, W]: the latents of one chunk."""
  c = model.config
  return batch_size, c.in_channels, c.memory.frames_per_chunk, c.latent_height, c.latent_width


def initial_state(model: CausalWanModel, config: RolloutConfig, key: jax.Array, recache_chunks: int,
                  store: KVStore | None = None) -> RolloutState:
  """A state at chunk 0 (with an empty store unless one is given), keeping `recache_chunks` recent chunks."""
  if store is None:
    store = kv_store.init_store(model.config, config.batch_size, config.store_dtype, kv_format=config.kv_format)
  return RolloutState(store=store, key=key, next_chunk=jnp.int32(0),
                      recent=jnp.zeros((recache_chunks, *chunk_shape(model, config.batch_size)), jnp.float32),
                      recent_chunks=jnp.full((recache_chunks,), -1, jnp.int32), nonfinite_chunk=jnp.int32(-1))


def first_nonfinite_chunk(earlier: Int[Array, ""], latents: Float[Array, "n b c f h w"],
                          chunks: Int[Array, " n"]) -> Int[Array, ""]:
  """`earlier` if it names a chunk (>= 0), else the first of `chunks` whose latents hold NaN or inf, or
  -1: one reduction per chunk, on the device, so the host checks one scalar per segment."""
  finite = jnp.isfinite(latents).reshape(chunks.shape[0], -1).all(axis=1)
  return jnp.where(earlier >= 0, earlier, jnp.where(finite.all(), -1, chunks[jnp.argmin(finite)]))


def _advance(state: RolloutState, store: KVStore, latents: Float[Array, "n b c f h w"],
             chunks: Int[Array, " n"]) -> RolloutState:
  """The state after chunks `chunks` (clean `latents`) were written into `store`."""
  drop = chunks.shape[0]  # the recent buffer keeps its size: the oldest entries leave
  recent = jnp.concatenate([state.recent, latents.astype(jnp.float32)])[drop:]
  recent_chunks = jnp.concatenate([state.recent_chunks, chunks])[drop:]
  return dataclasses.replace(state, store=store, next_chunk=state.next_chunk + drop, recent=recent,
                             recent_chunks=recent_chunks,
                             nonfinite_chunk=first_nonfinite_chunk(state.nonfinite_chunk, latents, chunks))


def _to_video(latents: Float[Array, "n b c f h w"]) -> Float[Array, "b c nf h w"]:
  latents = jnp.moveaxis(latents, 0, 2)  # [n, B, C, f, H, W] -> [B, C, n, f, H, W]
  return latents.reshape(*latents.shape[:2], -1, *latents.shape[4:])


def _chunks(latents: Float[Array, "b c nf h w"], frames: int) -> Float[Array, "n b c f h w"]:
  b, c, total, h, w = latents.shape
  return jnp.moveaxis(latents.reshape(b, c, total // frames, frames, h, w), 2, 0)


def _empty_retrieval(model: CausalWanModel, config: RolloutConfig) -> Retrieval | None:
  """The zero `Retrieval` of one chunk that `generate_chunk` fills, or None when nothing is recorded."""
  if not (config.retrieval or config.record_ids):
    return None
  c = model.config
  memory = c.memory
  histograms = jnp.zeros((c.num_layers, memory.capacity_chunks + 1), jnp.int32) if config.retrieval else None
  calls = len(step_table(config.sampler)["timestep"])
  shape = (calls, c.num_layers, config.batch_size, c.num_heads, c.groups_per_chunk, memory.top_k)
  return Retrieval(histograms=histograms, ids=jnp.full(shape, -1, jnp.int32) if config.record_ids else None)


def _record(retrieval: Retrieval, ids: Int[Array, "l b h g k"], tables: kv_store.SlotTables,
            chunk_index: Int[Array, ""], call: Int[Array, ""], model: CausalWanModel) -> Retrieval:
  """`retrieval` with model call `call`'s selected `ids` (its histograms added, its ids stored)."""
  histograms, recorded = retrieval.histograms, retrieval.ids
  if histograms is not None:
    distances = select.retrieval_distances(ids, tables, chunk_index, model.config)
    bins = model.config.memory.capacity_chunks
    histograms = histograms + jax.vmap(lambda d: select.retrieval_histogram(d, bins))(distances)
  if recorded is not None:
    recorded = recorded.at[call].set(ids)
  return Retrieval(histograms=histograms, ids=recorded)


def generate_chunk(model: CausalWanModel, store: KVStore, cross: CrossKV, key: jax.Array,
                   chunk_index: Int[Array, ""], config: RolloutConfig
                   ) -> tuple[Float[Array, "b c f h w"], KVStore, Retrieval | None]:
  """One chunk: `sampler.sample_chunk` over the model call. Returns (clean latents, store, retrieval)."""
  shape = chunk_shape(model, config.batch_size)

  def noise(step):
    fresh = jnp.asarray(config.noise(key, chunk_index, step, shape), jnp.float32)
    if fresh.shape != shape:
      raise ValueError(f"the noise function must return arrays of shape {shape}, got {fresh.shape}")
    return fresh

  def call(x, timestep, carry):
    store, retrieval, index = carry
    timesteps = jnp.full((config.batch_size,), timestep)
    if retrieval is None:
      velocity, store = model(x, timesteps, cross, store, chunk_index, backends=config.backends)
      return velocity, (store, None, index + 1)
    velocity, store, ids = model(x, timesteps, cross, store, chunk_index, backends=config.backends, return_ids=True)
    return velocity, (store, _record(retrieval, ids, store.tables, chunk_index, index, model), index + 1)

  initial = (store, _empty_retrieval(model, config), jnp.int32(0))
  x0, (store, retrieval, _) = sample_chunk(call, noise, config.sampler, initial)
  return x0, store, retrieval


def generate_segment(model: CausalWanModel, state: RolloutState, cross: CrossKV, config: RolloutConfig,
                     num_chunks: int) -> tuple[RolloutState, Float[Array, "b c nf h w"], Retrieval | None]:
  """Chunks next_chunk .. next_chunk + num_chunks - 1 as one scan: (state, latents [B, C, n f, H, W],
  what the selection picked in each chunk or None)."""

  def one_chunk(store, chunk_index):
    x0, store, retrieval = generate_chunk(model, store, cross, state.key, chunk_index, config)
    return store, (x0, retrieval)

  chunks = state.next_chunk + jnp.arange(num_chunks, dtype=jnp.int32)
  store, (latents, retrieval) = jax.lax.scan(one_chunk, state.store, chunks)
  return _advance(state, store, latents, chunks), _to_video(latents), retrieval


def context_pass(model: CausalWanModel, store: KVStore, cross: CrossKV, x0: Float[Array, "b c f h w"],
                 chunk_index: Int[Array, ""], config: RolloutConfig) -> KVStore:
  """Chunk c's K/V rewritten from its clean latents under `cross`, at the sampler's context timestep."""
  timestep = jnp.full((x0.shape[0],), config.sampler.context_timestep, jnp.float32)
  return model(x0, timestep, cross, store, chunk_index, backends=config.backends)[1]


def write_context(model: CausalWanModel, state: RolloutState, cross: CrossKV, latents: Float[Array, "b c nf h w"],
                  config: RolloutConfig) -> RolloutState:
  """Given clean latents written as chunks next_chunk, next_chunk + 1, ... by context passes (a
  ground-truth prefix); the next segment continues after them."""
  chunk_latents = _chunks(latents.astype(jnp.float32), model.config.memory.frames_per_chunk)
  chunks = state.next_chunk + jnp.arange(chunk_latents.shape[0], dtype=jnp.int32)

  def one_chunk(store, item):
    x0, chunk_index = item
    return context_pass(model, store, cross, x0, chunk_index, config), None

  store, _ = jax.lax.scan(one_chunk, state.store, (chunk_latents, chunks))
  return _advance(state, store, chunk_latents, chunks)


def recache(model: CausalWanModel, state: RolloutState, cross: CrossKV, config: RolloutConfig) -> RolloutState:
  """LongLive's KV recache at a prompt switch: the recent chunks the store still holds re-encoded
  under the new prompt's `cross`, oldest first."""
  memory = model.config.memory

  def one_chunk(store, item):
    x0, chunk_index = item
    held = kv_store.resident(store.tables, chunk_index, memory)
    store = jax.lax.cond(held, lambda s: context_pass(model, s, cross, x0, chunk_index, config), lambda s: s, store)
    return store, None

  store, _ = jax.lax.scan(one_chunk, state.store, (state.recent, state.recent_chunks))
  return dataclasses.replace(state, store=store)


# ---- the compiled driver -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Compiled:
  """One of a rollout's jitted functions: calling it runs it; `lower` lowers it from argument shapes alone."""

  run: Callable[..., Any]
  lower: Callable[..., jax.stages.Lowered]

  def __call__(self, *args: Any) -> Any:
    return self.run(*args)


def is_abstract(model: nnx.Module) -> bool:
  """Whether `model`'s parameters are shapes only (`nnx.eval_shape`), not arrays."""
  return any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(model)))


class Rollout:
  """Compiled rollout of one model: `stream` yields segments; `run` returns the whole video.

  Usage:
    rollout = Rollout(model, SamplerConfig())
    for segment in rollout.stream([(0, rollout.cross_kv(text))], num_chunks=80, seed=0):
      show(segment.latents)

  The state-level API (`init_state`, `write_context`, `generate`, `recache`) drives the same compiled
  functions step by step, e.g. to start from a ground-truth prefix. Each takes the state by donation:
  use the returned state, never the one passed in; `check_finite(state)` refuses one whose chunks made
  NaN or inf latents.
  """

  def __init__(self, model: CausalWanModel, sampler: SamplerConfig = SamplerConfig(), *, batch_size: int = 1,
               store_dtype: Any = jnp.bfloat16, kv_format: str = "bf16", retrieval: bool = False,
               record_ids: bool = False, backends: Backends = Backends(),
               mesh: Mesh | None = None, noise: NoiseFn = gaussian_noise):
    """`mesh` (from `sharding.make_mesh`): place the model's parameters on it (in place) and shard the
    store by heads over "model" and the batch over "data"; default: the ("data", "model") mesh the
    model's parameters already live on, if any, else one device. `noise`: see `sampler.NoiseFn`."""
    if (retrieval or record_ids) and model.config.memory.mode != "omnimem":
      raise ValueError(f"retrieval statistics exist in omnimem mode only, not {model.config.memory.mode}")
    if mesh is not None:
      sharding.make_mesh(mesh.shape["data"], mesh.shape["model"], config=model.config, batch_size=batch_size,
                         devices=mesh.devices.flat)  # validates heads / batch divisibility
      if not is_abstract(model):  # an abstract model's functions only lower, with the mesh's shardings
        sharding.shard_module(model, mesh)
    kv_store.check_format(model.config.memory, kv_format)
    self.config = RolloutConfig(sampler=sampler, batch_size=batch_size, store_dtype=jnp.dtype(store_dtype),
                                kv_format=kv_format, retrieval=retrieval, record_ids=record_ids, backends=backends,
                                noise=noise)
    self.model = model
    self.mesh = sharding.module_mesh(model) if mesh is None else mesh
    self.state: RolloutState | None = None  # the last `stream`'s state
    self.timings: list[tuple[int, int, float]] = []  # (first chunk, chunks, seconds) per streamed segment
    self._compilations: collections.Counter[str] = collections.Counter()
    self._backends_used: dict[str, set[str]] = {}
    self._graphdef, self._params = nnx.split(model)
    self._cross_kv = self._compile("cross_kv", lambda model, text: model.cross_kv(text),
                                   in_axes=(("batch", None, None),), out_axes=sharding.CROSS_AXES)
    self._write_context = self._compile("write_context", functools.partial(write_context, config=self.config),
                                        in_axes=(STATE_AXES, sharding.CROSS_AXES, sharding.LATENT_AXES),
                                        out_axes=STATE_AXES, donate_state=True)
    self._recache = self._compile("recache", functools.partial(recache, config=self.config),
                                  in_axes=(STATE_AXES, sharding.CROSS_AXES), out_axes=STATE_AXES, donate_state=True)
    self._segments: dict[int, _Compiled] = {}  # generate_segment jitted per segment length
    state_shardings = {} if self.mesh is None else {"out_shardings": sharding.tree_shardings(self.mesh, STATE_AXES)}
    self._fresh_state = jax.jit(lambda seed, recache_chunks: initial_state(
        model, self.config, jax.random.key(seed), recache_chunks), static_argnums=1, **state_shardings)
    self._state_with_store = jax.jit(lambda seed, store, recache_chunks: initial_state(
        model, self.config, jax.random.key(seed), recache_chunks, store), static_argnums=2, donate_argnums=1,
        **state_shardings)

  @property
  def sampler(self) -> SamplerConfig:
    return self.config.sampler

  @property
  def store(self) -> KVStore | None:
    """The KV store at the end of the last `stream` (None before any)."""
    return None if self.state is None else self.state.store

  @property
  def traces(self) -> int:
    """Compilations of the generation segment this rollout caused (1 per segment length)."""
    return self._compilations["segment"]

  @property
  def compilations(self) -> dict[str, int]:
    """Traces (compilations) of each jitted function of this rollout, by name."""
    return dict(self._compilations)

  @property
  def backends_used(self) -> dict[str, list[str]]:
    """The backends each attention op dispatched to in this rollout's compiled functions, by op, e.g.
    {"block_topk": ["xla"], "selection_attention": ["xla"]} (`omnimem_kernels.dispatch.recording`)."""
    return {op: sorted(names) for op, names in sorted(self._backends_used.items())}

  # ---- compiled functions and placement --------------------------------------------------------

  def _compile(self, name: str, fn: Callable[..., Any], *, in_axes: tuple[Any, ...], out_axes: Any,
               donate_state: bool = False) -> _Compiled:
    """`fn(model, *args)` jitted over the parameters; traces counted in `compilations`, the backends the
    attention ops dispatch to recorded in `backends_used`. On a mesh, inputs and outputs get the
    shardings of their logical axes (`in_axes`, `out_axes`); the state (first argument) may be donated."""

    def traced(params, *args):
      self._compilations[name] += 1
      return fn(nnx.merge(self._graphdef, params), *args)

    shardings = {}
    if self.mesh is not None:
      shardings = {"in_shardings": (sharding.state_shardings(self._params, self.mesh),
                                    *(sharding.tree_shardings(self.mesh, axes) for axes in in_axes)),
                   "out_shardings": sharding.tree_shardings(self.mesh, out_axes)}
    jitted = jax.jit(traced, donate_argnums=(1,) if donate_state else (), **shardings)

    def call(*args):
      with self._mesh_context(), dispatch.recording() as used:
        result = jitted(self._params, *args)
      for op, names in used.items():
        self._backends_used.setdefault(op, set()).update(names)
      return result

    def lower(*args):
      with self._mesh_context():
        return jitted.lower(self._params, *args)

    return _Compiled(call, lower)

  def _segment(self, num_chunks: int) -> _Compiled:
    if num_chunks not in self._segments:
      config = self.config
      retrieval = None if not (config.retrieval or config.record_ids) else Retrieval(
          histograms=() if config.retrieval else None,
          ids=(None, None, None, "batch", "heads") if config.record_ids else None)  # [n, s, l, b, h, g, k]
      out_axes = (STATE_AXES, sharding.LATENT_AXES, retrieval)
      self._segments[num_chunks] = self._compile(
          "segment", functools.partial(generate_segment, config=self.config, num_chunks=num_chunks),
          in_axes=(STATE_AXES, sharding.CROSS_AXES), out_axes=out_axes, donate_state=True)
    return self._segments[num_chunks]

  def _mesh_context(self) -> contextlib.AbstractContextManager:
    """Traces under the rollout's mesh, so attention runs under `shard_map` on local heads."""
    return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

  def _placement(self, axes: Any = ()) -> Any:
    """Where the rollout's inputs of logical `axes` (one `sharding.Axes` for every leaf, or a tree of them)
    live: sharded by them on a mesh, else where the parameters are (`sharding.placement_like_params`)."""
    if self.mesh is None:
      return sharding.placement_like_params(self.model)
    return sharding.tree_shardings(self.mesh, axes)

  def _put(self, tree: Any, axes: Any = ()) -> Any:
    """`tree` moved explicitly (no implicit transfers) onto the rollout's devices (`_placement`)."""
    return jax.device_put(tree, self._placement(axes))

  def _abstract(self, tree: Any, axes: Any = ()) -> Any:
    """The shapes of `tree`, placed as `_put` would place it: the same lowering as the real inputs'."""
    def place(placement: jax.sharding.Sharding, subtree: Any) -> Any:
      return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=placement), subtree)

    return jax.tree.map(place, self._placement(axes), tree,
                        is_leaf=lambda node: isinstance(node, jax.sharding.Sharding))

  def lower_segment(self, num_chunks: int = 1, *, recache_chunks: int = 7) -> jax.stages.Lowered:
    """The segment function `generate` runs for `num_chunks` chunks, lowered from the shapes of its inputs
    alone (a fresh state keeping `recache_chunks` recent chunks, one prompt's cross K/V): on a model from
    `nnx.eval_shape` it needs no weights. `.compile().memory_analysis()` gives the step's working set
    (`omnimem_jax.budget`); on a mesh, per device. Counts as one trace in `compilations`."""
    c = self.model.config
    state = jax.eval_shape(lambda: initial_state(self.model, self.config, jax.random.key(0), recache_chunks))
    text = jax.ShapeDtypeStruct((self.config.batch_size, c.text_len, c.text_dim), jnp.float32)
    cross = self._cross_kv.lower(self._abstract(text, ("batch", None, None))).out_info
    return self._segment(num_chunks).lower(self._abstract(state, STATE_AXES),
                                           self._abstract(cross, sharding.CROSS_AXES))

  # ---- the state-level API ---------------------------------------------------------------------

  def cross_kv(self, text_embeddings: Float[Array, "b text text_dim"] | np.ndarray) -> CrossKV:
    """`model.cross_kv` of a prompt's text-encoder output, computed on (and laid out for) the rollout's
    devices: the batch over "data", heads over "model"."""
    return self._cross_kv(self._put(text_embeddings, ("batch", None, None)))

  def init_state(self, seed: int, *, recache_chunks: int = 7, store: KVStore | None = None) -> RolloutState:
    """A state at chunk 0 on the rollout's devices: the noise key of `seed`, `store` (default: an empty
    one, made in place on the devices; a given one is donated), room for `recache_chunks` recent chunks."""
    if recache_chunks < 0:
      raise ValueError(f"recache_chunks must be >= 0, got {recache_chunks}")
    seed = self._put(np.uint32(seed))
    if store is None:
      state = self._fresh_state(seed, recache_chunks)
    else:
      state = self._state_with_store(seed, self._put(store, kv_store.LOGICAL_AXES), recache_chunks)
    return state if self.mesh is not None else self._put(state)

  def write_context(self, state: RolloutState, cross: CrossKV,
                    latents: Float[Array, "b c nf h w"] | np.ndarray) -> RolloutState:
    """Clean `latents` (whole chunks) written as the next chunks by context passes, e.g. a ground-truth
    prefix; generation continues after them."""
    c = self.model.config
    frames = c.memory.frames_per_chunk
    expected = (self.config.batch_size, c.in_channels, c.latent_height, c.latent_width)
    shape = tuple(latents.shape)
    if len(shape) != 5 or (shape[0], shape[1], *shape[3:]) != expected or shape[2] % frames or not shape[2]:
      raise ValueError(f"context latents must be [{expected[0]}, {expected[1]}, a multiple of {frames} frames, "
                       f"{expected[2]}, {expected[3]}], got {shape}")
    self.check_length(shape[2] // frames, self._next_chunk(state))
    return self._write_context(state, self._put(cross, sharding.CROSS_AXES), self._put(latents, sharding.LATENT_AXES))

  def generate(self, state: RolloutState, cross: CrossKV, num_chunks: int
               ) -> tuple[RolloutState, Float[Array, "b c nf h w"], Retrieval | None]:
    """The next `num_chunks` chunks as one compiled scan: (state, latents [B, C, num_chunks x 3, H, W],
    what the selection picked in each chunk, or None)."""
    if num_chunks < 1:
      raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    self.check_length(num_chunks, self._next_chunk(state))
    return self._segment(num_chunks)(state, self._put(cross, sharding.CROSS_AXES))

  def recache(self, state: RolloutState, cross: CrossKV) -> RolloutState:
    """The recent chunks still in the store re-encoded under `cross` (a prompt switch's KV recache)."""
    if state.recent_chunks.shape[0] == 0:
      return state
    return self._recache(state, self._put(cross, sharding.CROSS_AXES))

  def _next_chunk(self, state: RolloutState) -> int:
    return int(jax.device_get(state.next_chunk))

  def check_finite(self, state: RolloutState) -> None:
    """Raises NonFiniteLatentsError if a chunk of this state's rollout made NaN or inf latents (fetches
    one scalar from the device: call it where the latents are fetched anyway)."""
    chunk = int(jax.device_get(state.nonfinite_chunk))
    if chunk >= 0:
      raise NonFiniteLatentsError(f"chunk {chunk}: the DiT made NaN or infinite latents (are the checkpoint's "
                                  "weights or the text embeddings finite? is the dtype too narrow?)")

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
      store: continue from this store (default: a fresh one; donated). The final state is `self.state`.

    Raises NonFiniteLatentsError, naming the chunk, instead of yielding a segment with NaN or inf latents.
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
    switches = dict(prompts)
    self.state = self.init_state(seed, recache_chunks=recache_chunks, store=store)
    cross = switches[0]
    for first in range(0, num_chunks, segment_chunks):
      start_time = time.perf_counter()
      if first in switches and first > 0:
        cross = switches[first]
        self.state = self.recache(self.state, cross)
      self.state, latents, retrieval = self.generate(self.state, cross, segment_chunks)
      latents.block_until_ready()
      self.check_finite(self.state)
      seconds = time.perf_counter() - start_time
      self.timings.append((first, segment_chunks, seconds))
      yield SegmentOutput(first, latents, retrieval, seconds)

  def run(self, prompts: Sequence[tuple[int, CrossKV]], num_chunks: int, seed: int = 0,
          **kwargs: Any) -> tuple[jax.Array, Retrieval | None]:
    """The whole rollout: (latents [B, C, 3 * num_chunks, H, W], what the selection picked, as numpy
    arrays over all chunks, or None).

    The picks come to the host by an explicit `jax.device_get`, which transfer guards allow (an implicit
    `np.asarray` of a GPU array is refused under `jax.transfer_guard("disallow")`)."""
    segments = list(self.stream(prompts, num_chunks, seed, **kwargs))
    latents = jnp.concatenate([segment.latents for segment in segments], axis=2)
    if segments[0].retrieval is None:
      return latents, None
    picks = jax.device_get([segment.retrieval for segment in segments])
    return latents, jax.tree.map(lambda *parts: np.concatenate(parts), *picks)
