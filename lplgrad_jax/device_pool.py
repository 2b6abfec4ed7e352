"""The training pool on the devices: the whole pool, or in stream mode its labeled rows alone.

A training step gathers its batch by row from `arrays` (a `train.Pool`). `rows(labeled_ids)`
gives the rows of the labeled images: their ids themselves when the whole pool is on the
devices (the default), or their places in a cache of the labeled images alone
(`data.stream=True`: the pool stays on disk, memory-mapped, and the cache holds at most the
final labeled set, known from the budget). The cache appends the images labeled since the
last round, read from disk; its order is immaterial, because an epoch orders the labeled
set by position in `labeled_ids` (sorted ids), so batches, and training, are those of the
whole pool bit for bit, on resume too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lplgrad_jax import sharding
from lplgrad_jax import train
from lplgrad_jax.chunks import local_rows
from lplgrad_jax.chunks import split_layout
from lplgrad_jax.data.rows import padded
from lplgrad_jax.errors import ConfigError

_APPEND_ROWS = 256  # images written into the cache per call (one compiled shape)


class WholePool:
  """Every pool image on the devices, replicated or split by rows (data.shard_pool)."""

  def __init__(self, dataset, normalization, mesh, *, shard: bool):
    images_and_labels = (dataset.x_train, dataset.y_train)
    self.mesh, self.shard = mesh, shard
    if shard:
      images_and_labels = sharding.shard_rows(images_and_labels, dataset.num_train, mesh)
    else:
      images_and_labels = sharding.replicate(images_and_labels, mesh)
    self.arrays = train.Pool(*images_and_labels, *sharding.replicate(normalization, mesh))

  def rows(self, labeled_ids) -> np.ndarray:
    return np.asarray(labeled_ids, np.int32)

  def describe(self) -> str:
    devices = f"{self.mesh.size} device" + ("s" if self.mesh.size > 1 else "")
    return f"; the pool split by rows over {devices}" if self.shard else ""


class LabeledCache:
  """The labeled images alone on the devices, `capacity` rows, appended as images are
  labeled; the pool's other images are read from disk only when a query scores them.

  `split`: each process holds only its rows of the pool (data.shard_pool), reads the newly
  labeled images among them, and the devices exchange them (`sharding.gather_rows`)."""

  def __init__(self, dataset, normalization, mesh, *, capacity: int, split: bool = False):
    self.images, self.labels = dataset.x_train, dataset.y_train  # host (memory-mapped)
    self.first_row = dataset.first_row
    self.pool_blocks = sharding.pool_blocks(mesh, dataset.num_train) if split else None
    self.capacity, self.mesh = capacity, mesh
    self.row_of: dict[int, int] = {}
    shape = (capacity, *self.images.shape[1:])
    empty = jax.jit(
      lambda: (jnp.zeros(shape, self.images.dtype), jnp.zeros((capacity,), jnp.int32)),
      out_shardings=sharding.replicated(mesh),
    )()
    self.arrays = train.Pool(*empty, *sharding.replicate(normalization, mesh))

  def rows(self, labeled_ids) -> np.ndarray:
    """The cache rows of `labeled_ids`; images not yet cached are read and appended first."""
    new = np.asarray([i for i in labeled_ids if int(i) not in self.row_of], np.int64)
    if len(self.row_of) + len(new) > self.capacity:
      raise ConfigError(
        f"{len(self.row_of) + len(new)} labeled images exceed the training cache of "
        f"{self.capacity} (the budget's final labeled set)"
      )
    for start in range(0, len(new), _APPEND_ROWS):
      self._append(np.sort(new[start : start + _APPEND_ROWS]))
    return np.asarray([self.row_of[int(i)] for i in labeled_ids], np.int32)

  def _append(self, ids: np.ndarray) -> None:
    first = len(self.row_of)
    targets = np.full(_APPEND_ROWS, self.capacity, np.int32)  # past the end: dropped
    targets[: len(ids)] = first + np.arange(len(ids))
    images, labels = self._read(ids)
    cache_images, cache_labels = _write_rows(
      self.arrays.images, self.arrays.labels, sharding.replicate(targets, self.mesh), images, labels
    )
    self.arrays = self.arrays._replace(images=cache_images, labels=cache_labels)
    self.row_of.update((int(i), first + k) for k, i in enumerate(ids))

  def _read(self, ids: np.ndarray):
    """(images, labels) of `ids` in `_APPEND_ROWS` rows (zeros after them), on every device."""
    if self.pool_blocks is None:
      return sharding.replicate(_rows(self.images, self.labels, ids, _APPEND_ROWS), self.mesh)
    # Each process puts the ids it holds at the start of its block of a row-split array (one
    # chunk of `split_layout`: every block has room for them all); one gather of `positions`
    # from it gives every device the rows in the order of `ids`.
    size = self.mesh.size * _APPEND_ROWS
    blocks = sharding.process_blocks(self.mesh, size)
    reads, positions, _ = split_layout(ids, self.pool_blocks, blocks)
    process = jax.process_index()
    own = local_rows(ids[reads[process]], self.first_row, len(self.images))
    first, end = blocks[process]
    split = jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(
        sharding.batch_sharded(self.mesh), x, (size, *x.shape[1:])
      ),
      _rows(self.images, self.labels, own, end - first),
    )
    positions = padded(positions.astype(np.int32), _APPEND_ROWS)  # rows past `ids`: dropped
    return _gather_rows(split, sharding.replicate(positions, self.mesh), self.mesh)

  def describe(self) -> str:
    where = "on disk" if isinstance(self.images, np.memmap) else "in host memory"
    split = ", each process reading its own rows" if self.pool_blocks is not None else ""
    cache = f"the devices cache up to {self.capacity} labeled rows"
    return f"; stream mode: the pool stays {where}, {cache}{split}"


def _rows(images, labels, ids: np.ndarray, size: int):
  """Host (images, labels) of `ids`, in `size` rows, zeros after them."""
  return padded(images[ids], size), padded(np.asarray(labels[ids], np.int32), size)


_gather_rows = jax.jit(sharding.gather_rows, static_argnames="mesh")


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _write_rows(cache_images, cache_labels, targets, images, labels):
  return (
    cache_images.at[targets].set(images, mode="drop"),
    cache_labels.at[targets].set(labels, mode="drop"),
  )


def rows_split(data_config) -> bool:
  """Whether training gathers its batches from a pool split by rows over the devices: the
  whole pool with data.shard_pool (a streamed one's cache is replicated)."""
  return bool(data_config.shard_pool and not data_config.get("stream"))


def place(dataset, normalization, mesh, data_config, final_size: int) -> WholePool | LabeledCache:
  """The training pool of a campaign, as `data.stream` and `data.shard_pool` say."""
  if data_config.get("stream"):
    return LabeledCache(
      dataset, normalization, mesh, capacity=final_size, split=data_config.shard_pool
    )
  return WholePool(dataset, normalization, mesh, shard=rows_split(data_config))
