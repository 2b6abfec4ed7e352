"""The device mesh: one axis, "data", over every device of every process.

Training is data-parallel (the batch is split along "data", parameters are
replicated; XLA's SPMD partitioner makes BatchNorm statistics those of the
global batch); the query scores equal padded shards of each chunk per device
under `jax.shard_map`, and the scores come back replicated for the top-k.
With several processes (`distributed.py`) the mesh spans all of them and host
data becomes global arrays through `jax.make_array_from_callback`: every
process holds the same host copy, so each fills its own devices' shards.

With `config.data.shard_pool` the pool is not replicated but split by rows
over "data" (`shard_rows`; each process loads only the rows of its devices,
`process_rows`; every process's rows: `pool_blocks`), and batches are gathered
from it by `gather_rows`. The query reads each process's own rows for its own
devices (`chunks.SplitRows`), and so does a streamed pool's labeled cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from lplgrad_jax.data import rows
from lplgrad_jax.errors import ConfigError
from lplgrad_jax.utils import round_up

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  # Auto axes: shardings are hints to XLA's partitioner, not part of array types.
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


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


def _padded_rows(num_rows: int, mesh: Mesh) -> int:
  return round_up(num_rows, mesh.size)


def process_blocks(mesh: Mesh, num_rows: int) -> dict[int, tuple[int, int]]:
  """Every process's rows (first, end) of an array of `num_rows` (a multiple of the devices)
  split by rows over "data": one block per process, which every process can compute."""
  blocks: dict[int, list[slice]] = {}
  for device, index in batch_sharded(mesh).devices_indices_map((num_rows,)).items():
    start, stop, _ = index[0].indices(num_rows)  # a single device's slice is (None, None)
    blocks.setdefault(device.process_index, []).append(slice(start, stop))
  spans = {}
  for process, held in blocks.items():
    start, end = min(s.start for s in held), max(s.stop for s in held)
    if sum(s.stop - s.start for s in held) != end - start:
      raise ConfigError(
        "data.shard_pool=True needs each process's devices to hold one block of "
        "rows, but the device mesh interleaves processes (e.g. a TPU topology "
        "order): expected data.shard_pool=False here"
      )
    spans[process] = (start, end)
  return spans


def pool_blocks(mesh: Mesh, num_rows: int) -> dict[int, tuple[int, int]]:
  """Every process's rows (first, end) of a pool of `num_rows` split by rows over "data"
  (`shard_rows`), ends clipped to the pool."""
  return {
    process: (min(start, num_rows), min(end, num_rows))
    for process, (start, end) in process_blocks(mesh, _padded_rows(num_rows, mesh)).items()
  }


def process_rows(mesh: Mesh):
  """The pool rows this process's devices hold when the pool is split by rows: a
  function of the pool's size N giving (first row, end row), end clipped to N."""
  return lambda num_rows: pool_blocks(mesh, num_rows)[jax.process_index()]


def shard_rows(tree, num_rows: int, mesh: Mesh):
  """Global arrays of `num_rows` (padded to a multiple of the devices) split by rows over
  "data", from each process's own rows (`process_rows(mesh)`) of every array of `tree`."""
  num_padded = _padded_rows(num_rows, mesh)
  start, end = process_rows(mesh)(num_padded)

  def put(local):
    local = np.asarray(local)
    return jax.make_array_from_process_local_data(
      batch_sharded(mesh), rows.padded(local, end - start), (num_padded,) + local.shape[1:]
    )

  return jax.tree.map(put, tree)


def gather_rows(tree, ids, mesh: Mesh):
  """Rows `ids` of arrays split by rows over "data" (`shard_rows`), on every device.

  Each device takes the requested rows it holds (zeros for the others) and one
  all-reduce adds them up: the cost is the gathered rows, never the pool.
  """

  def local(shard, ids):
    offset = ids - jax.lax.axis_index(DATA_AXIS) * shard.shape[0]
    held = (offset >= 0) & (offset < shard.shape[0])
    picked = shard[jnp.clip(offset, 0, shard.shape[0] - 1)]
    held = held.reshape(held.shape + (1,) * (picked.ndim - 1))
    return jax.lax.psum(jnp.where(held, picked, jnp.zeros((), picked.dtype)), DATA_AXIS)

  gather = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(PartitionSpec(DATA_AXIS), PartitionSpec()),
    out_specs=PartitionSpec(),
    check_vma=False,
  )
  return jax.tree.map(lambda x: gather(x, ids), tree)
