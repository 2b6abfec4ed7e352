"""The device mesh: one axis, "data", over every device of every process.

Training is data-parallel (the batch is split along "data", parameters are
replicated; XLA's SPMD partitioner makes BatchNorm statistics those of the
global batch); the query scores equal padded shards of each chunk per device
under `jax.shard_map`, and the scores come back replicated for the top-k.
With several processes (`distributed.py`) the mesh spans all of them and host
data becomes global arrays through `jax.make_array_from_callback`: every
process holds the same host copy, so each fills its own devices' shards.
"""

from __future__ import annotations

import jax
import numpy as np
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


def _put(x, target: NamedSharding):
  if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
    return jax.device_put(x, target)
  # Host data (or a process-local array) that every process holds alike. device_put
  # would first check across processes that it is equal: a collective per call.
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


def replicate(tree, mesh: Mesh):
  """Places every array of `tree` on all devices of `mesh`."""
  return jax.tree.map(lambda x: _put(x, replicated(mesh)), tree)


def split_batch(x, mesh: Mesh):
  """Splits a host batch (the same on every process) along "data" over `mesh`'s devices."""
  return _put(x, batch_sharded(mesh))
