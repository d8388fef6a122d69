"""The memory plan: what a run needs in device memory, and whether it fits, before any weights load.

A run holds on each device: the DiT's weights; the KV store, one part per tier (`KV_TIERS`: the
full-resolution K/V, plain or compact, their scales, the plain recent ring, the pooled K/V) and its slot
tables; the
rest of the rollout state (the recent clean latents a prompt switch re-encodes, the noise key); every
prompt's cross K/V; with a VAE, its weights and its streaming decode cache. On top comes the working set
of the compiled step that runs: the DiT's chunk step or the VAE's chunk decode. They run one after the
other, so only the larger counts.

Every number comes from the code that allocates it, run on shapes alone: `jax.eval_shape` of the
rollout's `initial_state` (which builds the store with `store.init_store`), `nnx.eval_shape` of the DiT
and the VAE, and for the working sets the temp bytes of the compiled executables' `memory_analysis()`,
lowered from abstract inputs (`Rollout.lower_segment`, `vae.decode_step`). So a new store field, tier or
dtype shows in the plan without a change here. On a mesh every part is one device's shard
(`sharding.device_nbytes`: the store by heads and batch, the weights by heads and FFN units); the VAE
lives on the first device, whole. An element counts `dtype.itemsize` bytes, as `jax.Array.nbytes` does.

  run = RunShape(dits=(DiT(config, "bfloat16"),), batch_size=1, dtype="bfloat16")
  plan = plan_memory(run, device_capacity(run.devices))
  if not plan.fits():
    print(plan.table()); fail(plan.summary())

Measuring the working sets compiles the two steps once more than the run itself does: on a 2-core CPU the
1.3B DiT's step takes 2.7 s to lower and compile (without LLVM's optimisations, `_temp_bytes`), the Wan VAE's
decode 1.4 s, the shapes of every other part 0.6 s. Suggesting settings that fit (`capacity_that_fits`)
compiles the DiT step again for each store size it tries (two to four).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from omnimem_kernels.backends import Backends

from omnimem_jax import environment, sharding
from omnimem_jax.config import ModelConfig, SamplerConfig
from omnimem_jax.memory import store as kv_store
from omnimem_jax.model import vae as wan_vae
from omnimem_jax.model.wan import CausalWanModel
from omnimem_jax.rollout import STATE_AXES, Rollout, RolloutConfig, initial_state

# Set to a number of bytes, the memory a run may use on each device, instead of what the device reports (tests
# use it to make a refusal deterministic; a user, to leave room for another process).
CAPACITY_VARIABLE = "OMNIMEM_DEVICE_MEMORY_BYTES"
ONE_DEVICE = {axis: 1 for axis in sharding.MESH_AXES}

# The KV store's tiers as the plan shows them: (name, the `LayerKV` fields, the chunks the tier holds).
FULL_TIER = "full resolution"
KV_TIERS: tuple[tuple[str, tuple[str, str], Any], ...] = (
    (FULL_TIER, ("k", "v"), lambda memory, fmt: memory.capacity_chunks),
    ("scales", ("k_scale", "v_scale"), lambda memory, fmt: memory.capacity_chunks),
    ("recent ring", ("k_recent", "v_recent"), kv_store.recent_slots),
    ("pooled", ("k_pooled", "v_pooled"), lambda memory, fmt: memory.pooled_slots),
)


@dataclasses.dataclass(frozen=True)
class DiT:
  """One DiT of a run: its config with the run's memory settings, its weights' dtype, whether the rollout
  returns retrieval histograms, its KV store's full-resolution format (`memory.store`)."""

  config: ModelConfig
  param_dtype: str
  retrieval: bool = False
  kv_format: str = "bf16"


@dataclasses.dataclass(frozen=True)
class RunShape:
  """Everything the bytes of a run depend on.

  Attributes:
    dits: one DiT, or the models of a side-by-side comparison (each with its own store, stepped in turn).
    batch_size: videos per model; dtype: compute and KV-store dtype.
    prompts: prompt switches (every prompt's cross K/V is held from the start).
    recache_chunks: recent chunks the rollout state keeps for a KV recache.
    vae: the VAE that decodes every model's chunk in one batch, or None (a latent visualisation).
    mesh: ("data", "model") sizes, or None for one device.
    backends: the attention kernels the step compiles with.
  """

  dits: tuple[DiT, ...]
  batch_size: int
  dtype: str
  prompts: int = 1
  recache_chunks: int = 7
  vae: wan_vae.VAEConfig | None = None
  mesh: tuple[int, int] | None = None
  backends: Backends = Backends()

  @property
  def sizes(self) -> dict[str, int]:
    return ONE_DEVICE if self.mesh is None else dict(zip(sharding.MESH_AXES, self.mesh, strict=True))

  @property
  def devices(self) -> int:
    return math.prod(self.sizes.values())


@dataclasses.dataclass(frozen=True)
class Part:
  """One thing a run holds on a device.

  Attributes:
    name: e.g. "weights", "KV store: full resolution", "working set: DiT step".
    group: what the one-line summary adds it to: "weights", "KV store", "rollout state", "cross K/V", "VAE",
      or "working set".
    bytes: on one device.
    dtype: the dtypes of its arrays, "+"-joined (None for a working set).
    chunks: for a KV tier, the chunks it holds (its slots).
    bytes_per_chunk: for a KV tier, the bytes one more full-resolution slot adds to it.
    transient: a working set: of those only the largest counts (the steps run one after the other).
  """

  name: str
  group: str
  bytes: int
  dtype: str | None = None
  chunks: int | None = None
  bytes_per_chunk: int = 0
  transient: bool = False


@dataclasses.dataclass(frozen=True)
class Capacity:
  """The memory a run may use on each device, where that number comes from, and the device's kind;
  `shared`: the run's devices draw on one pool (a CPU's fake devices on the host's memory)."""

  bytes: int | None  # None: unknown, so nothing is refused
  source: str
  device: str
  shared: bool = False


UNITS = (("GB", 10**9), ("MB", 10**6), ("kB", 10**3))


def unit_of(size: int) -> tuple[str, int]:
  """The largest decimal unit `size` reaches, as (name, bytes); ("B", 1) below a kB."""
  return next(((name, scale) for name, scale in UNITS if size >= scale), ("B", 1))


def format_bytes(size: int) -> str:
  """`size` in the largest decimal unit it reaches, e.g. "80.1 GB"."""
  name, scale = unit_of(size)
  return f"{size} B" if scale == 1 else f"{size / scale:.1f} {name}"


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """The bytes of every part of a run on one device, against the device's capacity."""

  parts: tuple[Part, ...]
  capacity: Capacity
  devices: int  # devices the run is spread over; every part is one device's
  measure_seconds: float  # lowering and compiling the steps for their working sets (~0 if measured before)

  @property
  def total(self) -> int:
    """Resident parts plus the largest working set."""
    resident = sum(part.bytes for part in self.parts if not part.transient)
    return resident + max((part.bytes for part in self.parts if part.transient), default=0)

  def fits(self) -> bool:
    return self.capacity.bytes is None or self.total <= self.capacity.bytes

  def _where(self) -> str:
    each = f" per device ({self.devices} devices)" if self.devices > 1 else ""
    capacity = "unknown" if self.capacity.bytes is None else format_bytes(self.capacity.bytes)
    return f"{each} on {self.capacity.device} ({capacity}: {self.capacity.source})"

  def summary(self) -> str:
    """One line: the total against the capacity, then each group of parts in the total's unit (groups under
    5% of a unit left out), e.g. "the run needs 91.2 GB on ...: weights 2.8, KV store 80.1 (80 chunks), ..."."""
    groups: dict[str, int] = {}
    for part in self.parts:
      if not part.transient:
        groups[part.group] = groups.get(part.group, 0) + part.bytes
    steps = [part.bytes for part in self.parts if part.transient]
    if steps:
      groups["working set"] = max(steps)
    slots = max((part.chunks for part in self.parts if part.name.startswith(f"KV store: {FULL_TIER}")), default=None)
    scale = unit_of(self.total)[1]
    shown = [f"{group} {size / scale:.1f}" + (f" ({slots} chunks)" if group == "KV store" else "")
             for group, size in groups.items() if size >= scale / 20]
    return f"the run needs {format_bytes(self.total)}{self._where()}: {', '.join(shown)}"

  def table(self) -> str:
    """The plan as lines for printing: a heading, one line per part, the total and whether it fits."""
    width = max(len(part.name) for part in self.parts)
    lines = [f"memory plan{self._where()}:"]
    for part in self.parts:
      kind = "compiled temp bytes; the larger working set counts" if part.transient else part.dtype
      chunks = f", {part.chunks} chunks" if part.chunks is not None else ""
      lines.append(f"  {part.name:<{width}}  {format_bytes(part.bytes):>9}  {kind}{chunks}")
    verdict = "fits" if self.fits() else "does NOT fit"
    lines.append(f"  {'total':<{width}}  {format_bytes(self.total):>9}  {verdict}")
    return "\n".join(lines)

  def to_dict(self) -> dict[str, Any]:
    """For the run report: every part (bytes, dtype, chunks held), the total and the capacity."""
    return {"parts": [dataclasses.asdict(part) for part in self.parts], "total_bytes": self.total,
            "capacity_bytes": self.capacity.bytes, "capacity_source": self.capacity.source,
            "device": self.capacity.device, "devices": self.devices, "fits": self.fits(),
            "measure_seconds": self.measure_seconds,
            "note": "bytes per device; the total counts the resident parts and the largest working set"}


# ---- capacity --------------------------------------------------------------------------------------


def host_available_bytes() -> int | None:
  """The host's available memory: /proc/meminfo's MemAvailable, else the free physical pages (sysconf)."""
  meminfo = Path("/proc/meminfo")
  if meminfo.is_file():
    for line in meminfo.read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError):
    return None


def device_capacity(devices: int = 1) -> Capacity:
  """What a run may use on each of its `devices`: CAPACITY_VARIABLE if set; else the first device's
  `memory_stats()["bytes_limit"]` (a GPU: JAX's pool, sized by `environment.memory_pool_setting()`); else
  (a CPU) the host's available memory shared among the devices. Raises ValueError for a bad
  CAPACITY_VARIABLE."""
  device = jax.devices()[0]
  override = os.environ.get(CAPACITY_VARIABLE)
  if override is not None:
    if not override.strip().isdigit():
      raise ValueError(f"{CAPACITY_VARIABLE}={override!r} must be a whole number of bytes")
    return Capacity(int(override), CAPACITY_VARIABLE, device.device_kind)
  limit = (device.memory_stats() or {}).get("bytes_limit")
  if limit is not None:
    return Capacity(int(limit), f"bytes_limit, {environment.memory_pool_setting()}", device.device_kind)
  available = host_available_bytes()
  share = f" / {devices} devices" if devices > 1 else ""
  return Capacity(None if available is None else available // devices, f"the host's MemAvailable{share}",
                  device.device_kind, shared=True)


# ---- the parts -------------------------------------------------------------------------------------


def _dtypes(tree: Any) -> str:
  return "+".join(sorted({str(leaf.dtype) for leaf in jax.tree.leaves(tree)}))


def abstract_dit(dit: DiT, dtype: str) -> CausalWanModel:
  """The DiT as the run builds it, shapes only (`nnx.eval_shape`: nothing allocated, no weights read)."""
  return nnx.eval_shape(lambda: CausalWanModel(dit.config, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype),
                                               param_dtype=jnp.dtype(dit.param_dtype)))


def _store(config: ModelConfig, run: RunShape, kv_format: str) -> Any:
  """The shapes of an empty KV store (`store.init_store`)."""
  return jax.eval_shape(lambda: kv_store.init_store(config, run.batch_size, jnp.dtype(run.dtype),
                                                    kv_format=kv_format))


def _one_more_slot(config: ModelConfig) -> ModelConfig:
  """`config` with one more full-resolution slot (and the pooled tier at least as long)."""
  memory = config.memory
  pooled = None if memory.pooled_chunks is None else max(memory.pooled_chunks, memory.capacity_chunks + 1)
  return dataclasses.replace(config, memory=dataclasses.replace(memory, capacity_chunks=memory.capacity_chunks + 1,
                                                                pooled_chunks=pooled))


def store_parts(run: RunShape, dit: DiT, label: str = "") -> list[Part]:
  """One part per KV tier holding anything (`KV_TIERS`: its bytes per device, dtype, chunks held and the bytes
  one more full-resolution slot adds to it) and the slot tables."""
  axes, sizes = kv_store.LOGICAL_AXES, run.sizes
  store, bigger = _store(dit.config, run, dit.kv_format), _store(_one_more_slot(dit.config), run, dit.kv_format)
  parts = []
  for name, fields, chunks in KV_TIERS:
    tier_axes = {field: getattr(axes.layers, field) for field in fields}
    size, grown = (sharding.device_nbytes({field: getattr(x.layers, field) for field in fields}, tier_axes, sizes)
                   for x in (store, bigger))
    if size:
      tier = {field: getattr(store.layers, field) for field in fields}
      compact = name == FULL_TIER and dit.kv_format != "bf16"  # e.g. "fp8 as uint8": the codes' bytes
      parts.append(Part(f"KV store: {name}{label}", "KV store", size,
                        f"{dit.kv_format} as {_dtypes(tier)}" if compact else _dtypes(tier),
                        chunks(dit.config.memory, dit.kv_format), grown - size))
  parts.append(Part(f"KV store: slot tables{label}", "KV store",
                    sharding.device_nbytes(store.tables, axes.tables, sizes), _dtypes(store.tables)))
  return parts


def dit_parts(run: RunShape, dit: DiT, label: str = "") -> list[Part]:
  """Weights, one part per KV tier (`store_parts`), the rest of the rollout state and the
  prompts' cross K/V of one DiT, per device. A tier's growth per slot is the difference at one more slot."""
  model, sizes = abstract_dit(dit, run.dtype), run.sizes
  params = nnx.state(model)
  parts = [Part(f"weights{label}", "weights", sharding.device_nbytes(params, sharding.state_axes(params), sizes),
                _dtypes(params))]
  parts += store_parts(run, dit, label)
  config = RolloutConfig(batch_size=run.batch_size, store_dtype=jnp.dtype(run.dtype), kv_format=dit.kv_format)
  state = jax.eval_shape(lambda: initial_state(model, config, jax.random.key(0), run.recache_chunks))
  rest = dataclasses.replace(state, store=())  # the state's other fields (the store is the tiers above)
  rest_axes = dataclasses.replace(STATE_AXES, store=())
  parts.append(Part(f"rollout state{label}", "rollout state", sharding.device_nbytes(rest, rest_axes, sizes),
                    _dtypes(rest)))
  text = jax.ShapeDtypeStruct((run.batch_size, dit.config.text_len, dit.config.text_dim), jnp.float32)
  cross = nnx.eval_shape(lambda module, embeddings: module.cross_kv(embeddings), model, text)
  parts.append(Part(f"cross K/V ({run.prompts} prompt{'s' if run.prompts > 1 else ''}){label}", "cross K/V",
                    run.prompts * sharding.device_nbytes(cross, sharding.CROSS_AXES, sizes), _dtypes(cross)))
  return parts


def abstract_vae(config: wan_vae.VAEConfig) -> wan_vae.WanVAE:
  """The VAE as the run restores it, shapes only."""
  return nnx.eval_shape(lambda: wan_vae.WanVAE(config, rngs=nnx.Rngs(0)))


def _decode_latents(run: RunShape) -> jax.ShapeDtypeStruct:
  """One chunk's latents [B, frames, h, w, z] as the run decodes them: every model's batch in one call."""
  config = run.dits[0].config
  return jax.ShapeDtypeStruct((run.batch_size * len(run.dits), config.memory.frames_per_chunk, config.latent_height,
                               config.latent_width, run.vae.z_dim), jnp.float32)


def _decode_cache(vae: wan_vae.WanVAE, latents: jax.ShapeDtypeStruct) -> Any:
  """The shapes of the decode cache (`init_decode_cache`) for `latents`."""
  batch, _, height, width, _ = latents.shape
  return nnx.eval_shape(lambda module: module.init_decode_cache(batch, height, width), vae)


def static_parts(run: RunShape) -> list[Part]:
  """Every part the run holds from start to end, per device: each DiT's (`dit_parts`; labelled by attention
  mode in a comparison), and the VAE's weights and decode cache (on the first device, whole)."""
  labels = [f" [{dit.config.memory.mode}]" if len(run.dits) > 1 else "" for dit in run.dits]
  parts = [part for dit, label in zip(run.dits, labels, strict=True) for part in dit_parts(run, dit, label)]
  if run.vae is not None:
    vae = abstract_vae(run.vae)
    params, cache = nnx.state(vae), _decode_cache(vae, _decode_latents(run))
    parts.append(Part("VAE weights", "VAE", sharding.device_nbytes(params, (), ONE_DEVICE), _dtypes(params)))
    parts.append(Part("VAE decode cache", "VAE", sharding.device_nbytes(cache, (), ONE_DEVICE), _dtypes(cache)))
  return parts


def _temp_bytes(lowered: jax.stages.Lowered) -> int:
  """The temp bytes of `lowered`, compiled without LLVM's optimisations: buffer assignment, which decides
  them, runs before and is the same, and a tiny rollout then compiles in 2 s instead of 30 on a 2-core CPU.
  Where XLA_FLAGS already sets the level (the demo, the tests) no option is passed, so that the persistent
  compilation cache, which options bypass, can serve the compile."""
  level_set = next(iter(environment.FAST_COMPILE_OPTIONS)) in os.environ.get("XLA_FLAGS", "")
  compiled = lowered.compile(compiler_options=None if level_set else environment.FAST_COMPILE_OPTIONS)
  return int(compiled.memory_analysis().temp_size_in_bytes)


@functools.cache
def dit_step_bytes(dit: DiT, batch_size: int, dtype: str, recache_chunks: int, mesh: tuple[int, int] | None,
                   backends: Backends) -> int:
  """The temp bytes of the DiT's compiled one-chunk segment (what `Rollout.stream` runs), lowered from shapes
  alone on the run's mesh (then per device); measured once per process for each set of arguments."""
  rollout = Rollout(abstract_dit(dit, dtype), SamplerConfig(), batch_size=batch_size, store_dtype=dtype,
                    kv_format=dit.kv_format, retrieval=dit.retrieval, backends=backends,
                    mesh=None if mesh is None else sharding.make_mesh(*mesh))
  return _temp_bytes(rollout.lower_segment(1, recache_chunks=recache_chunks))


@functools.cache
def vae_step_bytes(config: wan_vae.VAEConfig, latents: jax.ShapeDtypeStruct) -> int:
  """The temp bytes of the VAE's compiled chunk decode (`vae.decode_step`) of `latents` [B, frames, h, w, z],
  a later chunk's (the larger of its two traces); measured once per process for each set of arguments."""
  vae = abstract_vae(config)
  graphdef, params = nnx.split(vae)
  return _temp_bytes(wan_vae.decode_step(graphdef).lower(params, latents, _decode_cache(vae, latents), first=False))


def working_sets(run: RunShape) -> list[Part]:
  """The compiled steps' working sets: the DiT step's (the largest of a comparison's models) and the VAE
  decode's."""
  dit_temp = max(dit_step_bytes(dit, run.batch_size, run.dtype, run.recache_chunks, run.mesh, run.backends)
                 for dit in run.dits)
  parts = [Part("working set: DiT step", "working set", dit_temp, transient=True)]
  if run.vae is not None:
    parts.append(Part("working set: VAE decode", "working set", vae_step_bytes(run.vae, _decode_latents(run)),
                      transient=True))
  return parts


def plan_memory(run: RunShape, capacity: Capacity) -> MemoryPlan:
  """The run's memory plan against `capacity` (`device_capacity`); compiles the steps (`working_sets`)."""
  parts = static_parts(run)
  start = time.perf_counter()
  steps = working_sets(run)
  return MemoryPlan(parts=(*parts, *steps), capacity=capacity, devices=run.devices,
                    measure_seconds=time.perf_counter() - start)


def model_axis_that_fits(run: RunShape, plan: MemoryPlan) -> int | None:
  """The smallest "model" mesh axis (a divisor of the heads above the run's) with which a single-model run
  fits, its weights and store divided as `sharding` places them, the working set kept as measured (a mesh
  shrinks it too); None if none does, or where the devices share one pool (a CPU's)."""
  if len(run.dits) > 1 or plan.capacity.shared or plan.capacity.bytes is None:
    return None
  data, model = run.mesh or (1, 1)
  heads = run.dits[0].config.num_heads
  steps = max(part.bytes for part in plan.parts if part.transient)
  for size in (size for size in range(model + 1, heads + 1) if heads % size == 0):
    wider = dataclasses.replace(run, mesh=(data, size))
    if sum(part.bytes for part in static_parts(wider)) + steps <= plan.capacity.bytes:
      return size
  return None


def with_capacity(run: RunShape, capacity_chunks: int, shorter_video: bool = False) -> RunShape:
  """`run` with every model's store of `capacity_chunks` full-resolution slots; the pooled tier keeps its
  length (the video's), or with `shorter_video` shrinks with them (a video of `capacity_chunks` chunks)."""
  def resized(dit: DiT) -> DiT:
    pooled = dit.config.memory.pooled_chunks
    pooled = None if pooled is None or shorter_video else max(pooled, capacity_chunks)
    memory = dataclasses.replace(dit.config.memory, capacity_chunks=capacity_chunks, pooled_chunks=pooled)
    return dataclasses.replace(dit, config=dataclasses.replace(dit.config, memory=memory))

  return dataclasses.replace(run, dits=tuple(resized(dit) for dit in run.dits))


def with_kv_format(run: RunShape, kv_format: str) -> RunShape:
  """`run` with its omnimem models' stores in `kv_format` (the baselines keep theirs)."""
  return dataclasses.replace(run, dits=tuple(
      dataclasses.replace(dit, kv_format=kv_format) if dit.config.memory.mode == "omnimem" else dit
      for dit in run.dits))


def capacity_that_fits(run: RunShape, plan: MemoryPlan, tries: int = 3, shorter_video: bool = False) -> int | None:
  """Store slots (`capacity_chunks`, at most the planned; with `shorter_video` the video's chunks, see
  `with_capacity`) with which the run fits `plan`'s capacity, or None if not even the fewest its attention
  modes allow do (or the capacity is unknown). The bytes grow about
  linearly with the slots (the store, and the working set's scores over the history), so a guess
  interpolates between the fewest slots and the planned; each guess is confirmed by its own plan (one more
  compile), and one that does not fit becomes the upper end of the next."""
  high, high_total = max(dit.config.memory.capacity_chunks for dit in run.dits), plan.total
  low = max(dit.config.memory.min_capacity_chunks for dit in run.dits)
  if plan.fits():  # an unknown capacity fits
    return high
  if high <= low:
    return None
  fewest = plan_memory(with_capacity(run, low, shorter_video), plan.capacity)
  if not fewest.fits():
    return None
  for _ in range(tries):
    guess = low + (plan.capacity.bytes - fewest.total) * (high - low) // (high_total - fewest.total)
    if guess <= low:
      break
    candidate = plan_memory(with_capacity(run, guess, shorter_video), plan.capacity)
    if candidate.fits():
      return guess
    high, high_total = guess, candidate.total
  return low
