"""Meshes, logical axis rules and the shardings of weights, the KV store and activations.

DESIGN.md section 8: a mesh with axes ("data", "model") and explicit (Auto) axis types. Every
parameter carries logical axis names (`nnx.with_partitioning`), e.g. ("embed", "heads") for a q
projection; `LOGICAL_RULES` maps them onto the mesh: attention projections and the KV store shard by
heads over "model", the FFN by hidden units, batches of prompts over "data", everything else is
replicated. Attention itself runs under `jax.shard_map` on each device's heads
(`omnimem_jax.model.wan`), so its Pallas kernels never see a sharded array.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from omnimem_jax.config import ModelConfig
from omnimem_jax.memory.store import KVStore, LayerKV

MESH_AXES = ("data", "model")

LOGICAL_RULES: dict[str, str | None] = {
    "batch": "data",
    "heads": "model",
    "mlp": "model",
    "layers": None,
    "embed": None,
    "head_dim": None,
    "kv_blocks": None,
}

# Logical names of the KV store's axes (memory/store.py): K/V [B, H, L, S, T, D], pooled [B, H, L, S*NB, D].
STORE_AXES = ("batch", "heads", "layers", "kv_blocks", None, "head_dim")
POOLED_AXES = ("batch", "heads", "layers", "kv_blocks", "head_dim")
# Cross-attention K/V of a prompt (model.wan.CrossKV): [L, B, tokens, H, D].
CROSS_AXES = ("layers", "batch", None, "heads", "head_dim")
# Per-token activations inside attention: [B, N, H, D] (q, k, v, outputs) and [B, N, H, 3] (gates).
TOKEN_HEAD_AXES = ("batch", None, "heads", None)


def parse_mesh(text: str) -> dict[str, int]:
  """"data=2,model=2" -> {"data": 2, "model": 2}; missing axes are 1."""
  sizes = {axis: 1 for axis in MESH_AXES}
  for item in filter(None, (part.strip() for part in text.split(","))):
    name, _, value = item.partition("=")
    if name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
      raise ValueError(f"mesh must look like 'data=2,model=2' (axes {MESH_AXES}, sizes >= 1), got {text!r}")
    sizes[name.strip()] = int(value)
  return sizes


def make_mesh(data: int = 1, model: int = 1, *, config: ModelConfig | None = None, batch_size: int | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "model") mesh of data x model devices with Auto axis types.

  With `config` / `batch_size`, refuses up front a model axis that does not divide the heads or a data
  axis that does not divide the batch.
  """
  devices = list(jax.devices() if devices is None else devices)
  if data * model > len(devices):
    raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices, only {len(devices)} visible")
  if config is not None and config.num_heads % model:
    divisors = [d for d in range(1, config.num_heads + 1) if config.num_heads % d == 0]
    raise ValueError(f"the model axis ({model}) must divide the {config.num_heads} heads: one of {divisors}")
  if batch_size is not None and batch_size % data:
    raise ValueError(f"the data axis ({data}) must divide the batch ({batch_size} prompts)")
  return jax.make_mesh((data, model), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices[:data * model])


def initialize_distributed() -> bool:
  """`jax.distributed.initialize()` when the environment describes a multi-process job; True if it ran.

  Reads the usual variables (JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES / JAX_PROCESS_ID, or a
  cluster JAX detects itself: SLURM, Open MPI, Cloud TPU); a plain single-process run does nothing.
  """
  if not any(name in os.environ for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                                             "TPU_WORKER_HOSTNAMES")):
    return False
  jax.distributed.initialize()
  return True


def logical_to_mesh_spec(names: Sequence[str | None], rules: Mapping[str, str | None],
                         mesh: Mesh | jax.sharding.AbstractMesh) -> PartitionSpec:
  """PartitionSpec for logical axis `names`; names without a rule, or whose mesh axis is absent from
  `mesh`, are replicated."""
  axes = []
  for name in names:
    axis = rules.get(name) if name is not None else None
    axes.append(axis if axis in mesh.axis_names else None)
  return PartitionSpec(*axes)


def named(mesh: Mesh, names: Sequence[str | None], rules: Mapping[str, str | None] = LOGICAL_RULES
          ) -> NamedSharding:
  """The NamedSharding of an array whose axes have these logical names."""
  return NamedSharding(mesh, logical_to_mesh_spec(names, rules, mesh))


def state_shardings(state: nnx.State, mesh: Mesh,
                    rules: Mapping[str, str | None] = LOGICAL_RULES) -> nnx.State:
  """A NamedSharding for every variable of an (abstract) NNX state, from its logical axis names."""
  specs = nnx.get_partition_spec(state)

  def to_sharding(spec):
    names = tuple(spec) if isinstance(spec, PartitionSpec) else ()
    return named(mesh, names, rules)

  return jax.tree.map(to_sharding, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def store_shardings(mesh: Mesh, rules: Mapping[str, str | None] = LOGICAL_RULES) -> KVStore:
  """The KV store's shardings (a KVStore of NamedShardings): heads over "model", batch over "data"."""
  full, pooled = named(mesh, STORE_AXES, rules), named(mesh, POOLED_AXES, rules)
  return KVStore(layers=LayerKV(full, full, pooled, pooled), slot_chunk=NamedSharding(mesh, PartitionSpec()))


def shard_module(module: nnx.Module, mesh: Mesh, rules: Mapping[str, str | None] = LOGICAL_RULES) -> nnx.Module:
  """Places every parameter of `module` (in place) with the sharding its logical names map to."""
  state = nnx.state(module)
  nnx.update(module, jax.device_put(state, state_shardings(state, mesh, rules)))
  return module


def module_mesh(module: nnx.Module) -> Mesh | None:
  """The ("data", "model") mesh `module`'s parameters live on, or None (one device, or another mesh)."""
  placement = jax.tree.leaves(nnx.state(module, nnx.Param))[0].sharding
  if isinstance(placement, NamedSharding) and set(MESH_AXES) <= set(placement.mesh.axis_names):
    return placement.mesh
  return None


def context_mesh() -> jax.sharding.AbstractMesh | None:
  """The mesh set by `jax.set_mesh` if it has the ("data", "model") axes, else None (one device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return None
  return mesh
