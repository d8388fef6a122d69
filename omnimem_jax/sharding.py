"""Logical axis names of parameters -> mesh axes -> shardings.

Every parameter carries logical axis names (`nnx.with_partitioning`), e.g. ("embed", "heads") for a
q projection; `LOGICAL_RULES` maps them onto the mesh axes ("data", "model") of DESIGN.md section 8:
attention projections shard by heads, the FFN by hidden units, and everything else is replicated.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_RULES: dict[str, str | None] = {
    "batch": "data",
    "heads": "model",
    "mlp": "model",
    "layers": None,
    "embed": None,
}


def logical_to_mesh_spec(names: tuple[str | None, ...], rules: Mapping[str, str | None],
                         mesh: Mesh) -> PartitionSpec:
  """PartitionSpec for logical axis `names`; names without a rule, or whose mesh axis is absent from
  `mesh`, are replicated."""
  axes = []
  for name in names:
    axis = rules.get(name) if name is not None else None
    axes.append(axis if axis in mesh.axis_names else None)
  return PartitionSpec(*axes)


def state_shardings(state: nnx.State, mesh: Mesh,
                    rules: Mapping[str, str | None] = LOGICAL_RULES) -> nnx.State:
  """A NamedSharding for every variable of an (abstract) NNX state, from its logical axis names."""
  specs = nnx.get_partition_spec(state)

  def to_sharding(spec):
    names = tuple(spec) if isinstance(spec, PartitionSpec) else ()
    return NamedSharding(mesh, logical_to_mesh_spec(names, rules, mesh))

  return jax.tree.map(to_sharding, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
