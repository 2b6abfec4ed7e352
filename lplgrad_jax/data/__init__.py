"""Data sources: every one yields the whole pool in memory as uint8 NHWC with stable ids.

The id of a training image is its index in `Dataset.x_train`; sources load in a
deterministic order so ids mean the same image across runs and resumes.
Sources (chosen by `config.data.source`):
  tfds          cifar10, cifar100, svhn_cropped, caltech101 via TFDS (data_dir,
                manual_dir, download)
  image_folder  root/train/<class>/* and root/test/<class>/* (CDD, users' data)
  (human oracle) root/labeled/<class>/*, root/unlabeled/*, optional root/test/<class>/*
                (`load_labeling_folder`: the pool mixes labeled and unlabeled images)
  digits        scikit-learn's bundled 8x8 digits, upsampled (the embedded default)
  npz           x_train/y_train/x_test/y_test arrays in one .npz file
  npy           root/train_images.npy, train_labels.npy, test_images.npy, test_labels.npy,
                meta.json, memory-mapped (`npy_folder`; written by lplgrad_jax.convert)
"""

from __future__ import annotations

from collections.abc import Callable

from lplgrad_jax.data.arrays import load_digits
from lplgrad_jax.data.arrays import load_npz
from lplgrad_jax.data.dataset import NORMALIZATIONS
from lplgrad_jax.data.dataset import Dataset
from lplgrad_jax.data.dataset import RowRange
from lplgrad_jax.data.dataset import input_normalization
from lplgrad_jax.data.folders import IMAGE_SUFFIXES
from lplgrad_jax.data.folders import image_files
from lplgrad_jax.data.folders import image_folder_splits
from lplgrad_jax.data.folders import load_image_folder
from lplgrad_jax.data.folders import load_labeling_folder
from lplgrad_jax.data.folders import read_image
from lplgrad_jax.data.npy_folder import Split
from lplgrad_jax.data.npy_folder import check_out
from lplgrad_jax.data.npy_folder import in_memory_split
from lplgrad_jax.data.npy_folder import load_npy
from lplgrad_jax.data.npy_folder import write_npy
from lplgrad_jax.data.tfds_source import TFDS_DATASETS
from lplgrad_jax.data.tfds_source import load_tfds
from lplgrad_jax.data.tfds_source import tfds_splits
from lplgrad_jax.errors import ConfigError
from lplgrad_jax.errors import check_choice

__all__ = [
  "IMAGE_SUFFIXES",
  "NORMALIZATIONS",
  "SOURCES",
  "TFDS_DATASETS",
  "Dataset",
  "RowRange",
  "Split",
  "check_out",
  "image_files",
  "input_normalization",
  "load_dataset",
  "load_digits",
  "load_image_folder",
  "load_labeling_folder",
  "load_npy",
  "load_npz",
  "load_tfds",
  "read_image",
  "source_splits",
  "write_npy",
]

SOURCES: dict[str, Callable[..., Dataset]] = {
  "tfds": load_tfds,
  "image_folder": load_image_folder,
  "digits": load_digits,
  "npz": load_npz,
  "npy": load_npy,
}


def load_dataset(
  data_config, *, human_oracle: bool = False, rows: RowRange | None = None
) -> Dataset:
  """Loads the data set that `config.data` names; ConfigError on bad settings.

  `human_oracle`: an image folder is a labeling folder (`load_labeling_folder`).
  `rows`: keep only the training rows `rows(pool size)` (a process's shard of the
  pool); image folders and TFDS then read no others, digits and npz read the
  whole file and drop the rest.
  """
  check_choice(data_config.source, SOURCES, "data source")
  if not isinstance(data_config.image_size, int) or data_config.image_size < 8:
    raise ConfigError(f"data.image_size={data_config.image_size!r}: expected an integer >= 8")
  if human_oracle and data_config.source == "image_folder":
    return load_labeling_folder(data_config)
  return SOURCES[data_config.source](data_config, rows)


def source_splits(data_config) -> tuple[str, tuple[str, ...], dict[str, Split]]:
  """(name, class names, {"train", "test": Split}) of the data set `config.data` names, read a
  chunk at a time where the source allows (image folders, TFDS); digits, npz and npy folders
  are read as `load_dataset` reads them (in memory, or memory-mapped)."""
  check_choice(data_config.source, SOURCES, "data source")
  if data_config.source == "image_folder":
    return image_folder_splits(data_config)
  if data_config.source == "tfds":
    return tfds_splits(data_config)
  d = load_dataset(data_config)
  splits = {
    "train": in_memory_split(d.x_train, d.y_train),
    "test": in_memory_split(d.x_test, d.y_test),
  }
  return d.name, d.class_names, splits
