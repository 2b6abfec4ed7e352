"""Sources that are arrays already: scikit-learn's bundled digits, and an .npz file."""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from lplgrad_jax.data.dataset import Dataset
from lplgrad_jax.data.dataset import RowRange
from lplgrad_jax.data.dataset import check_labels
from lplgrad_jax.data.dataset import keep_rows
from lplgrad_jax.data.dataset import resize
from lplgrad_jax.data.dataset import to_rgb_uint8
from lplgrad_jax.errors import ConfigError


def load_digits(data_config, rows: RowRange | None = None) -> Dataset:
  """scikit-learn's 1,797 real 8x8 digits, upsampled; fixed 80/20 split (seed 0)."""
  pixels, labels = _digits_arrays()
  images = to_rgb_uint8(pixels * (255.0 / 16.0), "digits")
  images = resize(images, data_config.image_size)
  order = np.random.default_rng(0).permutation(len(images))
  num_test = len(images) // 5
  test, train = order[:num_test], order[num_test:]
  return keep_rows(
    Dataset(
      "digits",
      images[train],
      labels[train],
      images[test],
      labels[test],
      tuple(str(d) for d in range(10)),
    ),
    rows,
  )


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """(1797, 8, 8) float pixels 0..16 and int32 labels: sklearn.datasets.load_digits()'s
  images and target, read from its CSV file directly. Importing scikit-learn takes about
  a second of every start-up; its function reads the same file where the layout differs."""
  spec = importlib.util.find_spec("sklearn")
  folder = os.path.dirname(spec.origin) if spec and spec.origin else ""
  path = os.path.join(folder, "datasets", "data", "digits.csv.gz")
  if not (folder and os.path.exists(path)):
    from sklearn import datasets as sk_datasets

    digits = sk_datasets.load_digits()
    return digits.images, digits.target.astype(np.int32)
  table = np.loadtxt(path, delimiter=",")
  return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int32)


def _open_npz(path: str):
  """np.load of an .npz archive; ConfigError for any other file (no pickles are loaded)."""
  try:
    arrays = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise ConfigError(
      f"data.root={path!r} is not an .npz file ({type(e).__name__}: "
      f"{' '.join(str(e).split())[:200]}): expected a file holding x_train, "
      "y_train, x_test, y_test"
    ) from None
  if not isinstance(arrays, np.lib.npyio.NpzFile):  # a single .npy array
    raise ConfigError(
      f"data.root={path!r} holds one array, not an .npz archive: expected a "
      "file holding x_train, y_train, x_test, y_test"
    )
  return arrays


def load_npz(data_config, rows: RowRange | None = None) -> Dataset:
  path = os.path.expanduser(data_config.root or "")
  if not path or not os.path.isfile(path):
    raise ConfigError(
      f"data.root={data_config.root!r} is not an .npz file: expected a file holding "
      "x_train, y_train, x_test, y_test"
    )
  with _open_npz(path) as arrays:
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
      raise ConfigError(f"{path} lacks arrays {missing}: expected x_train, y_train, x_test, y_test")
    x_train = to_rgb_uint8(arrays["x_train"], f"{path}:x_train")
    x_test = to_rgb_uint8(arrays["x_test"], f"{path}:x_test")
    y_train, y_test = arrays["y_train"], arrays["y_test"]
  for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
    if len(x) != np.size(y):
      raise ConfigError(
        f"{path} holds {len(x)} x_{split} images but {np.size(y)} y_{split} "
        "labels: expected one label per image"
      )
  num_classes = int(max(np.max(y_train), np.max(y_test))) + 1
  names = (
    tuple(data_config.class_names)
    if data_config.get("class_names")
    else tuple(str(c) for c in range(num_classes))
  )
  size = data_config.image_size
  return keep_rows(
    Dataset(
      os.path.splitext(os.path.basename(path))[0],
      resize(x_train, size),
      check_labels(y_train, len(names), "y_train"),
      resize(x_test, size),
      check_labels(y_test, len(names), "y_test"),
      names,
    ),
    rows,
  )
