"""Rows of a pool by id, read from disk a chunk at a time, and reading ahead of their use.

A memory-mapped pool (the npy route) is never read whole: `Rows(pool, ids)` is the images of
`ids` as an array-like whose slices are read when taken (what `chunks.map_chunks` takes for
the query and the evaluation), and `prefetched` reads the next chunks on a host thread while
the devices compute on the current one; `padded` fills a block of rows with zeros up to its
compiled size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from collections.abc import Iterator

import numpy as np


class Rows:
  """The rows `ids` of `array`, read only as slices of them are taken."""

  def __init__(self, array: np.ndarray, ids):
    self.array, self.ids = array, np.asarray(ids, np.int64)
    self.shape = (len(self.ids), *array.shape[1:])
    self.dtype = array.dtype

  def __len__(self) -> int:
    return len(self.ids)

  def __getitem__(self, index: slice) -> np.ndarray:
    ids = self.ids[index]
    ascending = np.argsort(ids, kind="stable")  # the file read front to back
    rows = np.empty((len(ids), *self.shape[1:]), self.dtype)
    rows[ascending] = self.array[ids[ascending]]
    return rows


def padded(rows: np.ndarray, size: int) -> np.ndarray:
  """`rows` followed by zero rows up to `size` rows, read into memory (a memory-mapped slice
  is read here: on the read-ahead thread, where chunks are made)."""
  if isinstance(rows, np.memmap):
    rows = np.array(rows)
  if len(rows) == size:
    return rows
  return np.concatenate([rows, np.zeros((size - len(rows),) + rows.shape[1:], rows.dtype)])


def lazy_rows(array: np.ndarray, ids) -> np.ndarray | Rows:
  """`array[ids]`, read lazily (`Rows`) where `array` is memory-mapped."""
  return Rows(array, ids) if isinstance(array, np.memmap) else array[ids]


def prefetched(items: Iterable, depth: int = 2) -> Iterator:
  """`items` in order, the next `depth` produced ahead on a host thread (file reads overlap
  the devices' work on the current item); an exception in the producer is raised here, and
  the producer stops when the consumer does."""
  ahead: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()
  done = object()

  def put(entry) -> bool:
    while not stop.is_set():
      try:
        ahead.put(entry, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in items:
        if not put((item, None)):
          return
    except BaseException as e:  # handed to the consumer, raised there
      put((None, e))
      return
    put((done, None))

  threading.Thread(target=produce, daemon=True, name="prefetch").start()
  try:
    while True:
      item, error = ahead.get()
      if error is not None:
        raise error
      if item is done:
        return
      yield item
  finally:
    stop.set()
