"""The in-memory data set every source yields, and what is computed from it.

The id of a training image is its index in `Dataset.x_train`; sources load in a
deterministic order so ids mean the same image across runs and resumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from lplgrad_jax.errors import ConfigError
from lplgrad_jax.errors import check_choice

# data.normalization: "fixed" (data.mean / data.std, in [0, 1] units: the authors' code
# normalises CIFAR-10 with constants), "pool" (per-channel statistics of the training pool) or
# "auto": the statistics pretrained weights were trained with (model.pretrained), else "fixed".
NORMALIZATIONS = ("auto", "fixed", "pool")


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  x_train: np.ndarray  # (N, H, W, 3) uint8; the id of an image is its index
  y_train: np.ndarray  # (N,) int32
  x_test: np.ndarray
  y_test: np.ndarray
  class_names: tuple[str, ...]
  # Set by `load_labeling_folder` alone: what a human oracle is shown and starts from.
  train_files: tuple[str, ...] = ()  # absolute path of each pool image, by id
  seed_ids: np.ndarray | None = None  # sorted ids of the images the user labeled up front
  # Set when this process loaded only rows [first_row, first_row + len(y_train)) of the
  # pool (config.data.shard_pool); x_train and y_train then hold those rows alone.
  first_row: int = 0
  pool_size: int | None = None
  # Per-channel (mean, std) of the whole pool where a source knows them (the npy route's
  # meta.json), so that "pool" normalisation needs no pass over the images.
  pool_statistics: tuple[np.ndarray, np.ndarray] | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_train(self) -> int:
    """The size of the whole pool (of which this process may hold a shard)."""
    return len(self.y_train) if self.pool_size is None else self.pool_size

  def channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the whole training pool, in [0, 1] units, also when
    each process holds a shard of it (sums over the processes' shards)."""
    if self.pool_statistics is not None:
      return self.pool_statistics
    if self.pool_size is None:
      return _channel_stats(self.x_train, total=lambda v: v)
    from lplgrad_jax import distributed  # JAX: not imported by the JAX-free labeling page

    return _channel_stats(self.x_train, total=distributed.sum_over_processes)


def _channel_stats(images: np.ndarray, total) -> tuple[np.ndarray, np.ndarray]:
  """Mean and std per channel of uint8 `images`; `total` adds float64 sums up over the
  holders of the pool (identity when this process holds all of it). A memory-mapped pool is
  read a chunk of images at a time (two passes), never whole."""
  chunk = len(images) if not isinstance(images, np.memmap) else _STATS_CHUNK
  parts = [images[i : i + chunk] for i in range(0, len(images), max(chunk, 1))]
  pixels = lambda part: np.asarray(part).reshape(-1, 3).astype(np.float64) / 255.0
  count = total(np.array([images[..., 0].size], np.float64))[0]
  mean = total(sum((pixels(p).sum(0) for p in parts), np.zeros(3))) / count
  squares = sum((np.square(pixels(p) - mean).sum(0) for p in parts), np.zeros(3))
  return statistics_from_moments(mean, total(squares) / count)


def statistics_from_moments(mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The (mean, std) images are normalised with: float32, the std at least 1e-3 (a channel
  that never varies is not divided by zero)."""
  return mean.astype(np.float32), np.maximum(np.sqrt(var), 1e-3).astype(np.float32)


def valid_statistics(mean: np.ndarray, std: np.ndarray) -> bool:
  """Three means and three positive stds."""
  return mean.shape == (3,) and std.shape == (3,) and bool(np.all(std > 0))


_STATS_CHUNK = 4096  # images per read of a memory-mapped pool


def to_rgb_uint8(images: np.ndarray, what: str) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ConfigError(
      f"{what} has shape {images.shape}: expected (N, H, W), (N, H, W, 1) or (N, H, W, 3)"
    )
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  if images.dtype != np.uint8:
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
  return images


def resize(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of uint8 NHWC images to (size, size) through Pillow."""
  if images.shape[1:3] == (size, size):
    return images
  from PIL import Image

  return np.stack(
    [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images]
  )


def check_labels(y: np.ndarray, num_classes: int, what: str) -> np.ndarray:
  y = np.asarray(y).astype(np.int64).reshape(-1)
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ConfigError(f"{what} holds labels outside 0..{num_classes - 1}")
  return y.astype(np.int32)


# A process's share of the pool: (first row, end row) given the pool's size.
RowRange = Callable[[int], tuple[int, int]]


def keep_rows(dataset: Dataset, rows: RowRange | None) -> Dataset:
  """`dataset` holding only its pool rows `rows(N)` (for sources read whole anyway)."""
  if rows is None:
    return dataset
  start, end = rows(dataset.num_train)
  return dataclasses.replace(
    dataset,
    x_train=dataset.x_train[start:end],
    y_train=dataset.y_train[start:end],
    first_row=start,
    pool_size=dataset.num_train,
  )


def normalization_in_effect(choice: str, has_weights: bool) -> str:
  """`data.normalization` = `choice` as it applies: "auto" is the pretrained weights' own
  statistics ("weights") where there are weights, "fixed" otherwise."""
  if choice == "auto":
    return "weights" if has_weights else "fixed"
  return choice


def input_normalization(
  data_config, dataset: Dataset, weights_normalization: tuple | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """The per-channel (mean, std) that images are normalised with, as `data.normalization` says.

  "pool": statistics of the whole pool, also when each process holds a shard of it.
  "auto": `weights_normalization`, the (mean, std) of pretrained weights, where given.
  """
  choice = check_choice(data_config.normalization, NORMALIZATIONS, "data.normalization")
  choice = normalization_in_effect(choice, weights_normalization is not None)
  if choice == "weights":
    return tuple(np.asarray(v, np.float32) for v in weights_normalization)
  if choice == "fixed":
    mean, std = (np.asarray(data_config[k], np.float32) for k in ("mean", "std"))
    if not valid_statistics(mean, std):
      raise ConfigError(
        f"data.mean={tuple(data_config.mean)} data.std={tuple(data_config.std)}: "
        "expected 3 values each, std > 0"
      )
    return mean, std
  return dataset.channel_stats()
