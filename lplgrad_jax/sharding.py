"""The device mesh: one axis, "data", over every device.

Training is data-parallel (the batch is split along "data", parameters are
replicated; XLA's SPMD partitioner makes BatchNorm statistics those of the
global batch); the query scores equal padded shards of each chunk per device
under `jax.shard_map`, and the top-k is taken over the gathered scores.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  # Auto axes: shardings are hints to XLA's partitioner, not part of array types.
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree, mesh: Mesh):
  """Places every array of `tree` on all devices of `mesh`."""
  return jax.device_put(tree, replicated(mesh))
