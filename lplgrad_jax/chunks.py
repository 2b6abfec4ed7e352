"""Images to the devices a chunk at a time: what the query, the evaluation and linear mode's
frozen features run over.

`map_chunks(fn, images, chunk_size)` cuts `images` into chunks of `chunk_size` rows, padded so
that one shape compiles, reads each ahead of its use on a host thread (`rows.prefetched`),
keeps two chunks in flight on the devices and returns `fn`'s per-image outputs of the real
images, in order.

`images` is an array, a `Rows` view of a memory-mapped pool, or `SplitRows`: rows of a pool
split by rows over the processes of a multi-host run (data.shard_pool), of which each
process reads only those in its own part of the pool, for its own devices. Each chunk then
holds every process's next rows in that process's block of the chunk (`split_layout`), and
the outputs are put back in the order of the ids afterwards.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from collections.abc import Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from lplgrad_jax import sharding
from lplgrad_jax.data.rows import Rows
from lplgrad_jax.data.rows import padded
from lplgrad_jax.data.rows import prefetched
from lplgrad_jax.utils import ceil_div
from lplgrad_jax.utils import round_up

_IN_FLIGHT = 2  # chunks on the devices while the host waits for the oldest


def split_layout(ids: np.ndarray, pool_blocks: dict, chunk_blocks: dict):
  """Where each of `ids` goes when every process's devices take only ids of its own pool rows.

  pool_blocks: process -> (first, end) pool row it holds; chunk_blocks: process -> (first,
  end) row of a chunk its devices take. Returns (process -> the indices into `ids` it reads,
  in order; each id's row in the chunks laid end to end; the number of chunks).
  """
  chunk_size = max(end for _, end in chunk_blocks.values())
  owner = np.full(len(ids), -1)
  for process, (first, end) in pool_blocks.items():
    owner[(ids >= first) & (ids < end)] = process
  if np.any(owner < 0):
    raise ValueError(f"ids {ids[owner < 0][:5].tolist()} are in no process's rows")
  reads = {process: np.flatnonzero(owner == process) for process in chunk_blocks}
  widths = {process: end - first for process, (first, end) in chunk_blocks.items()}
  num_chunks = max(ceil_div(len(reads[p]), widths[p]) for p in chunk_blocks)
  positions = np.empty(len(ids), np.int64)
  for process, (first, _) in chunk_blocks.items():
    k = np.arange(len(reads[process]))
    positions[reads[process]] = (k // widths[process]) * chunk_size + first + k % widths[process]
  return reads, positions, num_chunks


class SplitRows:
  """The pool rows `ids` where this process holds rows [first_row, first_row + len(local)) of a
  pool split over `mesh` by rows, `pool_blocks` (process -> its (first, end) pool rows; see
  `sharding.pool_blocks`); `local` may be memory-mapped, and only the rows of this process's
  own ids are read from it."""

  def __init__(self, local, first_row: int, ids, mesh, pool_blocks: dict):
    self.local, self.first_row, self.mesh = local, first_row, mesh
    self.ids = np.asarray(ids, np.int64)
    self.pool_blocks = pool_blocks
    self.shape = (len(self.ids), *local.shape[1:])
    self.dtype = local.dtype

  @classmethod
  def of_whole(cls, images, mesh) -> SplitRows:
    """All of `images`, which every process holds (a test set), each reading its share."""
    blocks = sharding.pool_blocks(mesh, len(images))
    return cls(images, 0, np.arange(len(images)), mesh, blocks)

  def __len__(self) -> int:
    return len(self.ids)

  def chunks(self, chunk_size: int):
    """`local_chunks` of this process, for chunks of `chunk_size` split over the mesh."""
    chunk_blocks = sharding.process_blocks(self.mesh, chunk_size)
    return self.local_chunks(chunk_blocks, jax.process_index())

  def local_chunks(self, chunk_blocks: dict, process: int):
    """(`process`'s blocks of the chunks, padded, read as they are taken (on a read-ahead
    thread); each id's row in the chunks laid end to end; the number of chunks), where
    `chunk_blocks` gives each process's (first, end) rows of a chunk."""
    reads, positions, num_chunks = split_layout(self.ids, self.pool_blocks, chunk_blocks)
    own = local_rows(self.ids[reads[process]], self.first_row, len(self.local))
    first, end = chunk_blocks[process]
    width = end - first

    def blocks():
      for c in range(num_chunks):
        yield padded(Rows(self.local, own[c * width : (c + 1) * width])[:], width)

    return blocks(), positions, num_chunks


def local_rows(ids: np.ndarray, first_row: int, num_local: int) -> np.ndarray:
  """Where pool rows `ids` are among a process's rows [first_row, first_row + num_local)."""
  ids = np.asarray(ids, np.int64)
  rows = ids - first_row
  if len(rows) and (rows.min() < 0 or rows.max() >= num_local):
    raise ValueError(
      f"ids {ids[(rows < 0) | (rows >= num_local)][:5].tolist()} are not among this process's "
      f"rows [{first_row}, {first_row + num_local})"
    )
  return rows


def array_like(images) -> np.ndarray | Rows | SplitRows:
  """`images` as an array, unless it is already rows read as they are taken."""
  return images if isinstance(images, (np.ndarray, Rows, SplitRows)) else np.asarray(images)


def _whole_chunks(images, chunk_size: int) -> Iterator[np.ndarray]:
  for start in range(0, len(images), chunk_size):
    yield padded(images[start : start + chunk_size], chunk_size)


def _readable_here(x) -> bool:
  """Whether this process can read all of `x` (a host array, or all of its shards here)."""
  return not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated


def map_chunks(
  fn: Callable, images, chunk_size: int, mesh=None, progress: str = ""
) -> tuple[np.ndarray, ...]:
  """`fn(chunk)` (a tuple of per-image arrays, replicated over the devices) over `images` in
  padded chunks; the outputs of the real images, in order, on the host.

  mesh: None hands `fn` each chunk as a host array; a mesh splits each chunk over its devices
  (`chunk_size` rounded up to a multiple of them). `SplitRows` carry their own mesh.
  progress: the description of a bar over the chunks ("": none).
  """
  images = array_like(images)
  if isinstance(images, SplitRows):
    mesh, chunk_size = images.mesh, round_up(chunk_size, images.mesh.size)
    blocks, positions, num_chunks = images.chunks(chunk_size)
    target = sharding.batch_sharded(mesh)

    def place(block):
      return jax.make_array_from_process_local_data(target, block, (chunk_size, *block.shape[1:]))
  else:
    chunk_size = chunk_size if mesh is None else round_up(chunk_size, mesh.size)
    blocks, num_chunks = _whole_chunks(images, chunk_size), ceil_div(len(images), chunk_size)
    positions = np.arange(len(images))
    place = (lambda chunk: chunk) if mesh is None else (lambda c: sharding.split_batch(c, mesh))
  pending, done = collections.deque(), []
  bar = tqdm(
    prefetched(blocks),
    desc=progress,
    unit="chunk",
    total=num_chunks,
    disable=not progress,
    leave=False,
  )
  for block in bar:
    pending.append(fn(place(block)))
    if not all(_readable_here(x) for x in pending[-1]):
      raise ValueError("map_chunks: fn must return its outputs on every device (replicated)")
    if len(pending) > _IN_FLIGHT:
      done.append(jax.device_get(pending.popleft()))
  done.extend(jax.device_get(out) for out in pending)
  return tuple(np.concatenate([out[i] for out in done])[positions] for i in range(len(done[0])))
