"""Placement: meshes, logical axis rules, and where every tree lives (weights, the KV store, a
prompt's cross K/V, latents, caches).

docs/architecture.md, 'Sharding': a mesh with axes ("data", "model") and explicit (Auto) axis types.
Every parameter carries logical axis names (`nnx.with_partitioning`), e.g. ("embed", "heads") for a q
projection, and every other tree declares its own (the store in `memory.store.LOGICAL_AXES`, the
cross K/V and latents here); `LOGICAL_RULES` maps them onto the mesh: attention projections and the
KV store shard by heads over "model", the FFN by hidden units, batches of prompts over "data",
everything else is replicated. Attention itself runs under `jax.shard_map` on each device's heads
(`omnimem_jax.model.wan`), so its Pallas kernels never see a sharded array.

This module is the one place that decides placement: the rollout, checkpoint restores and the CLI ask
it for shardings (`named`, `tree_shardings`, `state_shardings`) and for placed trees
(`shard_module`, `place_like_params`). It knows trees only by their logical axis names, never by
their types.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec, make_single_device_sharding

from omnimem_jax.config import ModelConfig

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

Axes = tuple[str | None, ...]  # the logical name of each axis of one array (None: never sharded)

# Cross-attention K/V of a prompt (both fields of model.wan.CrossKV): [L, B, tokens, H, D].
CROSS_AXES: Axes = ("layers", "batch", None, "heads", "head_dim")
# Latent videos and chunks [B, C, F, H, W]: the batch over "data".
LATENT_AXES: Axes = ("batch", None, None, None, None)
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
  axis that does not divide the batch; these come before the device count, so a mesh that cannot work on
  any machine gets the same error on every machine.
  """
  if config is not None and config.num_heads % model:
    divisors = [d for d in range(1, config.num_heads + 1) if config.num_heads % d == 0]
    raise ValueError(f"the model axis ({model}) must divide the {config.num_heads} heads: one of {divisors}")
  if batch_size is not None and batch_size % data:
    raise ValueError(f"the data axis ({data}) must divide the batch ({batch_size} prompts)")
  devices = list(jax.devices() if devices is None else devices)
  if data * model > len(devices):
    raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices, only {len(devices)} visible")
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


def state_axes(state: nnx.State) -> nnx.State:
  """The logical axis names (`Axes`) of every variable of an (abstract) NNX state; () where it has none."""
  specs = nnx.get_partition_spec(state)
  return jax.tree.map(lambda spec: tuple(spec) if isinstance(spec, PartitionSpec) else (), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def state_shardings(state: nnx.State, mesh: Mesh,
                    rules: Mapping[str, str | None] = LOGICAL_RULES) -> nnx.State:
  """A NamedSharding for every variable of an (abstract) NNX state, from its logical axis names."""
  return tree_shardings(mesh, state_axes(state), rules)


def _is_axes(node: Any) -> bool:
  """Whether `node` is one array's logical axis names (a tuple of str / None; () for a scalar)."""
  return isinstance(node, tuple) and all(name is None or isinstance(name, str) for name in node)


def tree_shardings(mesh: Mesh, axes: Any, rules: Mapping[str, str | None] = LOGICAL_RULES) -> Any:
  """The NamedShardings of a tree whose leaves are logical axis names (`Axes`), same structure; e.g.
  `tree_shardings(mesh, store.LOGICAL_AXES)` is a KVStore of shardings. One `Axes` gives one sharding
  (for jit and `device_put`, a prefix that covers every leaf of a tree)."""
  return jax.tree.map(lambda names: named(mesh, names, rules), axes, is_leaf=_is_axes)


def device_nbytes(tree: Any, axes: Any, sizes: Mapping[str, int], rules: Mapping[str, str | None] = LOGICAL_RULES
                  ) -> int:
  """Bytes of one device's shard of every array of `tree` (arrays or `jax.ShapeDtypeStruct`s: no devices
  needed) on a ("data", "model") mesh of `sizes`, e.g. {"data": 1, "model": 2}. `axes` names their logical
  axes as `tree_shardings` takes them (a tree of `Axes`, or one `Axes` for every leaf below it). A sharded
  axis is divided by its mesh axis's size, rounded up (an uneven split pads the last shard); an element
  counts `dtype.itemsize` bytes, as `jax.Array.nbytes` does."""
  mesh = AbstractMesh(tuple(sizes[axis] for axis in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * 2)

  def shard_bytes(names: Axes, subtree: Any) -> int:
    total = 0
    for leaf in jax.tree.leaves(subtree):
      spec = tuple(logical_to_mesh_spec(names, rules, mesh)) if leaf.ndim else ()
      spec += (None,) * (leaf.ndim - len(spec))
      shard = [math.ceil(size / (sizes[axis] if axis else 1)) for size, axis in zip(leaf.shape, spec, strict=True)]
      total += math.prod(shard) * leaf.dtype.itemsize
    return total

  return sum(jax.tree.leaves(jax.tree.map(shard_bytes, axes, tree, is_leaf=_is_axes)))


def shard_module(module: nnx.Module, mesh: Mesh, rules: Mapping[str, str | None] = LOGICAL_RULES) -> nnx.Module:
  """Places every parameter of `module` (in place) with the sharding its logical names map to."""
  state = nnx.state(module)
  nnx.update(module, jax.device_put(state, state_shardings(state, mesh, rules)))
  return module


def _params_sharding(module: nnx.Module) -> jax.sharding.Sharding:
  return jax.tree.leaves(nnx.state(module, nnx.Param))[0].sharding


def module_mesh(module: nnx.Module) -> Mesh | None:
  """The ("data", "model") mesh `module`'s parameters live on, or None (one device, or another mesh)."""
  placement = _params_sharding(module)
  if isinstance(placement, NamedSharding) and set(MESH_AXES) <= set(placement.mesh.axis_names):
    return placement.mesh
  return None


def placement_like_params(module: nnx.Module) -> jax.sharding.Sharding:
  """Where `place_like_params` puts a tree: replicated over the mesh of `module`'s parameters, or on their
  (first) device; for an abstract module (`nnx.eval_shape`), the first local device, where a restore and a
  freshly initialised model put theirs."""
  placement = _params_sharding(module)
  if isinstance(placement, NamedSharding):
    return NamedSharding(placement.mesh, PartitionSpec())
  if placement is None:
    return make_single_device_sharding(jax.local_devices()[0])
  return make_single_device_sharding(min(placement.device_set, key=lambda device: device.id))


def place_like_params(module: nnx.Module, tree: Any) -> Any:
  """`tree` (e.g. a fresh KV store, a prompt's cross K/V, a VAE cache) on the devices `module`'s
  parameters live on: replicated over their mesh, or on their device (`placement_like_params`).

  A restored module lives on a mesh and the state its calls return carries that mesh; a first state
  without it would make the second call compile again.
  """
  return jax.device_put(tree, placement_like_params(module))


def context_mesh() -> jax.sharding.AbstractMesh | None:
  """The mesh set by `jax.set_mesh` if it has the ("data", "model") axes, else None (one device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return None
  return mesh
