"""Data sources: every one yields the whole pool in memory as uint8 NHWC with stable ids.

The id of a training image is its index in `Dataset.x_train`; sources load in a
deterministic order so ids mean the same image across runs and resumes.
Sources (chosen by `config.data.source`):
  tfds          cifar10, cifar100, svhn_cropped, caltech101 via TFDS (data_dir,
                manual_dir, download)
  image_folder  root/train/<class>/* and root/test/<class>/* (CDD, users' data)
  digits        scikit-learn's bundled 8x8 digits, upsampled (the embedded default)
  npz           x_train/y_train/x_test/y_test arrays in one .npz file
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

from lplgrad_jax.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TFDS_DATASETS = ("cifar10", "cifar100", "svhn_cropped", "caltech101")


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  x_train: np.ndarray  # (N, H, W, 3) uint8; the id of an image is its index
  y_train: np.ndarray  # (N,) int32
  x_test: np.ndarray
  y_test: np.ndarray
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_train(self) -> int:
    return len(self.y_train)

  def channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the training pool, in [0, 1] units."""
    x = self.x_train.reshape(-1, 3).astype(np.float64) / 255.0
    return x.mean(0).astype(np.float32), np.maximum(x.std(0), 1e-3).astype(np.float32)


def _to_rgb_uint8(images: np.ndarray, what: str) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ConfigError(f"{what} has shape {images.shape}: expected (N, H, W), (N, H, W, 1) or (N, H, W, 3)")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  if images.dtype != np.uint8:
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
  return images


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of uint8 NHWC images to (size, size) through Pillow."""
  if images.shape[1:3] == (size, size):
    return images
  from PIL import Image
  return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                   for im in images])


def _check_labels(y: np.ndarray, num_classes: int, what: str) -> np.ndarray:
  y = np.asarray(y).astype(np.int64).reshape(-1)
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ConfigError(f"{what} holds labels outside 0..{num_classes - 1}")
  return y.astype(np.int32)


def load_digits(data_config) -> Dataset:
  """scikit-learn's 1,797 real 8x8 digits, upsampled; fixed 80/20 split (seed 0)."""
  from sklearn import datasets as sk_datasets
  digits = sk_datasets.load_digits()
  images = _to_rgb_uint8(digits.images * (255.0 / 16.0), "digits")
  images = _resize(images, data_config.image_size)
  order = np.random.default_rng(0).permutation(len(images))
  num_test = len(images) // 5
  test, train = order[:num_test], order[num_test:]
  labels = digits.target.astype(np.int32)
  return Dataset("digits", images[train], labels[train], images[test], labels[test],
                 tuple(str(d) for d in range(10)))


def load_npz(data_config) -> Dataset:
  path = os.path.expanduser(data_config.root or "")
  if not path or not os.path.isfile(path):
    raise ConfigError(f"data.root={data_config.root!r} is not an .npz file: expected a file holding x_train, y_train, x_test, y_test")
  with np.load(path) as arrays:
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
      raise ConfigError(f"{path} lacks arrays {missing}: expected x_train, y_train, x_test, y_test")
    x_train = _to_rgb_uint8(arrays["x_train"], f"{path}:x_train")
    x_test = _to_rgb_uint8(arrays["x_test"], f"{path}:x_test")
    y_train, y_test = arrays["y_train"], arrays["y_test"]
  num_classes = int(max(np.max(y_train), np.max(y_test))) + 1
  names = tuple(data_config.class_names) if data_config.get("class_names") else tuple(
      str(c) for c in range(num_classes))
  size = data_config.image_size
  return Dataset(os.path.splitext(os.path.basename(path))[0],
                 _resize(x_train, size), _check_labels(y_train, len(names), "y_train"),
                 _resize(x_test, size), _check_labels(y_test, len(names), "y_test"), names)


def _list_class_dirs(split_dir: str) -> list[str]:
  return sorted(d for d in os.listdir(split_dir)
                if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith("."))


def _read_image_folder(split_dir: str, class_names: list[str], size: int):
  from PIL import Image, UnidentifiedImageError
  images, labels = [], []
  for label, name in enumerate(class_names):
    class_dir = os.path.join(split_dir, name)
    for file in sorted(os.listdir(class_dir)):
      if not file.lower().endswith(IMAGE_SUFFIXES):
        continue
      path = os.path.join(class_dir, file)
      try:
        with Image.open(path) as im:
          im = im.convert("RGB").resize((size, size), Image.BILINEAR)
          images.append(np.asarray(im, dtype=np.uint8))
      except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"cannot read image {path}: {e}") from None
      labels.append(label)
  if not images:
    raise ConfigError(f"{split_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
  return np.stack(images), np.asarray(labels, np.int32)


def load_image_folder(data_config) -> Dataset:
  """`root/train/<class>/*` and `root/test/<class>/*`, RGB, resized to image_size."""
  root = os.path.expanduser(data_config.root or "")
  train_dir, test_dir = os.path.join(root, "train"), os.path.join(root, "test")
  if not root or not os.path.isdir(root):
    raise ConfigError(f"data.root={data_config.root!r} is not a directory: expected an image folder with train/<class>/ and test/<class>/")
  for split_dir in (train_dir, test_dir):
    if not os.path.isdir(split_dir):
      raise ConfigError(f"{split_dir} is missing: expected {root}/train/<class>/ and {root}/test/<class>/")
  classes = _list_class_dirs(train_dir)
  test_classes = _list_class_dirs(test_dir)
  if not classes:
    raise ConfigError(f"{train_dir} has no class folders: expected {train_dir}/<class>/<image files>")
  if test_classes != classes:
    raise ConfigError(f"test classes {test_classes} differ from train classes {classes} in {root}: expected the same class folders")
  size = data_config.image_size
  x_train, y_train = _read_image_folder(train_dir, classes, size)
  x_test, y_test = _read_image_folder(test_dir, classes, size)
  name = data_config.get("name") or os.path.basename(os.path.normpath(root))
  return Dataset(name, x_train, y_train, x_test, y_test, tuple(classes))


def load_tfds(data_config) -> Dataset:
  """A TFDS image-classification data set, read once into memory in file order."""
  name = data_config.name
  if name not in TFDS_DATASETS:
    raise ConfigError(f"unknown TFDS data set {name!r}: expected one of {', '.join(TFDS_DATASETS)}")
  data_dir = os.path.expanduser(data_config.data_dir) if data_config.data_dir else None
  if data_dir and not os.path.isdir(data_dir) and not data_config.download:
    raise ConfigError(f"data.data_dir={data_config.data_dir!r} does not exist: expected a TFDS data directory holding {name}/ (or set data.download=True)")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  import tensorflow_datasets as tfds
  tf.config.set_visible_devices([], "GPU")  # keep TF off the accelerator JAX uses

  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    if not data_config.download:
      raise ConfigError(
          f"TFDS data set {name!r} is not prepared in {builder.data_dir!r} and data.download=False: "
          "copy a prepared tensorflow_datasets folder there and pass data.data_dir, "
          "or put the raw archives in data.manual_dir and set data.download=True")
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(data_config.manual_dir) if data_config.manual_dir else None,
        try_download_gcs=False)  # offline machines: never wait on Google's bucket
    builder.download_and_prepare(download_config=download_config)

  size = data_config.image_size

  def read(split: str):
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    if size:
      ds = ds.map(lambda x, y: (tf.cast(tf.image.resize(x, (size, size), antialias=True)
                                        if x.shape[0] != size or x.shape[1] != size else x,
                                        tf.uint8), y))
    xs, ys = [], []
    for x, y in tfds.as_numpy(ds.batch(1024)):
      xs.append(x)
      ys.append(y)
    return _to_rgb_uint8(np.concatenate(xs), f"{name}:{split}"), np.concatenate(ys).astype(np.int32)

  try:
    x_train, y_train = read(data_config.train_split)
    x_test, y_test = read(data_config.test_split)
  except ValueError as e:  # e.g. a bad split expression
    raise ConfigError(f"cannot read {name} splits {data_config.train_split!r}/{data_config.test_split!r}: {e}") from None
  label = builder.info.supervised_keys[1]
  class_names = tuple(builder.info.features[label].names)
  return Dataset(name, x_train, y_train, x_test, y_test, class_names)


SOURCES: dict[str, Callable[..., Dataset]] = {
    "tfds": load_tfds,
    "image_folder": load_image_folder,
    "digits": load_digits,
    "npz": load_npz,
}


def load_dataset(data_config) -> Dataset:
  """Loads the data set that `config.data` names; ConfigError on bad settings."""
  if data_config.source not in SOURCES:
    raise ConfigError(f"unknown data source {data_config.source!r}: expected one of {', '.join(SOURCES)}")
  if not isinstance(data_config.image_size, int) or data_config.image_size < 8:
    raise ConfigError(f"data.image_size={data_config.image_size!r}: expected an integer >= 8")
  return SOURCES[data_config.source](data_config)
