"""The npy route: a pool as a folder of .npy files, opened memory-mapped, and its writer.

Layout (`data.source="npy"`, `data.root=DIR`; written by `python -m lplgrad_jax.convert`):
  train_images.npy  (N, H, W, 3) uint8, NumPy's .npy format
  train_labels.npy  (N,) integers (-1, an image without a label, is refused for now: the
                    simulated oracle reveals a label for every queried image)
  test_images.npy   (M, H, W, 3) uint8
  test_labels.npy   (M,) integers
  meta.json         optional: {"class_names": [...], "mean": [r, g, b], "std": [r, g, b]}, the
                    per-channel statistics of the training images in [0, 1] units
Images are read from disk only where they are used: opening the folder reads the labels and
meta.json alone, and `data.normalization="pool"` takes meta.json's statistics instead of a
pass over the images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from collections.abc import Iterator

import numpy as np

from lplgrad_jax.data.dataset import Dataset
from lplgrad_jax.data.dataset import RowRange
from lplgrad_jax.data.dataset import check_labels
from lplgrad_jax.data.dataset import statistics_from_moments
from lplgrad_jax.data.dataset import valid_statistics
from lplgrad_jax.errors import ConfigError

FILES = {
  "x_train": "train_images.npy",
  "y_train": "train_labels.npy",
  "x_test": "test_images.npy",
  "y_test": "test_labels.npy",
}
META = "meta.json"


def load_npy(data_config, rows: RowRange | None = None) -> Dataset:
  """The folder `data.root` in the npy layout, its images memory-mapped (`rows`: this
  process's training rows alone, a view of the file)."""
  root = os.path.expanduser(data_config.root or "")
  if not root or not os.path.isdir(root):
    raise ConfigError(
      f"data.root={data_config.root!r} is not a directory: expected a folder holding "
      f"{', '.join(FILES.values())} (python -m lplgrad_jax.convert writes one)"
    )
  missing = [f for f in FILES.values() if not os.path.isfile(os.path.join(root, f))]
  if missing:
    raise ConfigError(f"{root} lacks {', '.join(missing)}: expected {', '.join(FILES.values())}")
  arrays = {key: _open(os.path.join(root, file)) for key, file in FILES.items()}
  meta = _read_meta(root)
  size = data_config.image_size
  for split in ("train", "test"):
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    path = os.path.join(root, FILES[f"x_{split}"])
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
      raise ConfigError(f"{path} holds {x.dtype} {x.shape}: expected (N, H, W, 3) uint8")
    if x.shape[1:3] != (size, size):
      raise ConfigError(
        f"{path} holds {x.shape[1]}x{x.shape[2]} images: expected data.image_size={size} "
        f"(set it to {x.shape[1]}, or convert again with that size)"
      )
    if y.shape != (len(x),) or y.dtype.kind not in "iu":
      raise ConfigError(
        f"{os.path.join(root, FILES[f'y_{split}'])} holds {y.dtype} {y.shape}: expected "
        f"({len(x)},) integers, one label per image"
      )
  labels = {k: np.asarray(arrays[k]) for k in ("y_train", "y_test")}  # small: read whole
  names = _class_names(data_config, meta, labels)
  unlabeled = int(np.sum(labels["y_train"] == -1))
  if unlabeled:
    raise ConfigError(
      f"{root}: {unlabeled} training images have no label (-1): the simulated oracle reveals "
      "a label for every queried image; expected a label for each"
    )
  first, end = rows(len(labels["y_train"])) if rows is not None else (0, len(labels["y_train"]))
  stats = _statistics(meta, os.path.join(root, META))
  return Dataset(
    data_config.get("name") or os.path.basename(os.path.normpath(root)),
    arrays["x_train"][first:end],
    check_labels(labels["y_train"][first:end], len(names), FILES["y_train"]),
    arrays["x_test"],
    check_labels(labels["y_test"], len(names), FILES["y_test"]),
    names,
    first_row=first,
    pool_size=len(labels["y_train"]) if rows is not None else None,
    pool_statistics=stats,
  )


def _open(path: str) -> np.ndarray:
  try:
    return np.load(path, mmap_mode="r", allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise ConfigError(f"{path} is not a readable .npy file ({e})") from None


def _read_meta(root: str) -> dict:
  path = os.path.join(root, META)
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is not readable JSON ({e})") from None
  if not isinstance(meta, dict):
    raise ConfigError(f"{path} holds {type(meta).__name__}: expected a JSON object")
  return meta


def _statistics(meta: dict, path: str) -> tuple[np.ndarray, np.ndarray] | None:
  if "mean" not in meta and "std" not in meta:
    return None  # "pool" normalisation reads the images (in chunks) instead
  try:
    mean, std = (np.asarray(meta[k], np.float32) for k in ("mean", "std"))
  except (KeyError, TypeError, ValueError):
    mean = std = np.zeros(0)
  if not valid_statistics(mean, std):
    raise ConfigError(f'{path}: expected "mean" and "std", three numbers each, std > 0')
  return mean, std


def _class_names(data_config, meta: dict, labels: dict) -> tuple[str, ...]:
  if meta.get("class_names"):
    return tuple(str(n) for n in meta["class_names"])
  if data_config.get("class_names"):
    return tuple(data_config.class_names)
  largest = max((int(y.max()) for y in labels.values() if y.size), default=0)
  return tuple(str(c) for c in range(largest + 1))


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a source, read a chunk at a time: `count` images, `chunks(n)` yields
  (images (n', H, W, 3) uint8, labels (n',)) in id order."""

  count: int
  chunks: Callable[[int], Iterator[tuple[np.ndarray, np.ndarray]]]


def in_memory_split(images: np.ndarray, labels: np.ndarray) -> Split:
  """A split already in memory (digits, npz)."""

  def chunks(n):
    for start in range(0, len(images), n):
      yield images[start : start + n], labels[start : start + n]

  return Split(len(images), chunks)


class ChannelStatistics:
  """Per-channel mean and std of uint8 images seen a chunk at a time, in [0, 1] units: Chan
  et al.'s pairwise update of (count, mean, sum of squared deviations), exact in float64
  without a second pass."""

  def __init__(self):
    self.count, self.mean, self.m2 = 0, np.zeros(3), np.zeros(3)

  def add(self, images: np.ndarray) -> None:
    pixels = images.reshape(-1, 3).astype(np.float64) / 255.0
    n = len(pixels)
    if not n:
      return
    mean = pixels.mean(0)
    m2 = np.square(pixels - mean).sum(0)
    total = self.count + n
    delta = mean - self.mean
    self.m2 += m2 + np.square(delta) * self.count * n / total
    self.mean += delta * n / total
    self.count = total

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    """As `Dataset.channel_stats`."""
    return statistics_from_moments(self.mean, self.m2 / max(self.count, 1))


def check_out(out: str) -> str:
  """`out` as an absolute path if a conversion may write it: new, or an empty folder, and no
  `out`.partial left by another; ConfigError otherwise (nothing is ever overwritten)."""
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ConfigError(f"--out={out} exists and is not an empty folder: expected a new folder")
  if os.path.exists(out + ".partial"):
    raise ConfigError(
      f"{out}.partial exists (an interrupted conversion?): remove it, or choose another --out"
    )
  return out


def write_npy(out: str, class_names, splits: dict[str, Split], chunk_size: int, progress) -> dict:
  """Writes `splits` ("train", "test") into the new folder `out` in the npy layout, a chunk at
  a time, with the training images' channel statistics from the same pass; returns meta.json.

  The files are written into `out`.partial and renamed to `out` when complete, so `out` is
  either absent or whole; an existing non-empty `out` is refused, never overwritten.
  `progress(total, split)`: a context with update(n), e.g. a tqdm bar.
  """
  out = check_out(out)
  if not splits["train"].count:
    raise ConfigError("the source holds no training images: expected at least one")
  partial = out + ".partial"
  os.makedirs(partial)
  try:
    meta = _write_splits(partial, class_names, splits, chunk_size, progress)
  except (ConfigError, OSError):  # nothing of this run is left behind
    shutil.rmtree(partial, ignore_errors=True)
    raise
  if os.path.isdir(out):
    os.rmdir(out)  # empty, checked above
  os.rename(partial, out)
  return meta


def _write_splits(partial: str, class_names, splits, chunk_size: int, progress) -> dict:
  stats = ChannelStatistics()
  image_shape = None
  for split, source in splits.items():
    if not source.count:  # a source without test images: empty files, as .npy allows
      np.save(os.path.join(partial, FILES[f"x_{split}"]), np.zeros((0, *image_shape), np.uint8))
      np.save(os.path.join(partial, FILES[f"y_{split}"]), np.zeros((0,), np.int32))
      continue
    images = labels = None
    written = 0
    with progress(source.count, split) as bar:
      for x, y in source.chunks(chunk_size):
        if images is None:  # the image size is known from the first chunk
          image_shape = x.shape[1:]
          images = _allocated(FILES[f"x_{split}"], partial, np.uint8, (source.count, *x.shape[1:]))
          labels = _allocated(FILES[f"y_{split}"], partial, np.int32, (source.count,))
        if written + len(x) > source.count:
          raise ConfigError(
            f"the {split} split yields more than the {source.count} images announced"
          )
        images[written : written + len(x)] = x
        labels[written : written + len(x)] = y
        written += len(x)
        if split == "train":
          stats.add(x)
        bar.update(len(x))
    if written != source.count:
      raise ConfigError(f"the {split} split yielded {written} images, {source.count} announced")
    images.flush()
    labels.flush()
    del images, labels  # closes the memory maps
  mean, std = stats.result()
  meta = {
    "class_names": list(class_names),
    "mean": mean.tolist(),
    "std": std.tolist(),
    "num_train": splits["train"].count,
    "num_test": splits["test"].count,
  }
  with open(os.path.join(partial, META), "w") as f:
    json.dump(meta, f, indent=1)
  return meta


def _allocated(name: str, folder: str, dtype, shape) -> np.memmap:
  """A new .npy file opened for writing, its disk space reserved first: a full disk is an
  OSError here, not a SIGBUS when a page of the map is written."""
  path = os.path.join(folder, name)
  array = np.lib.format.open_memmap(path, "w+", dtype, shape)
  with open(path, "r+b") as f:
    os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
  return array
