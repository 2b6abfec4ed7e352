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
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Callable

import numpy as np
from absl import logging as absl_logging

from lplgrad_jax.errors import ConfigError
from lplgrad_jax.errors import check_choice
from lplgrad_jax.query_files import SKIP

# data.normalization: "fixed" (data.mean / data.std, in [0, 1] units: the authors' code
# normalises CIFAR-10 with constants) or "pool" (per-channel statistics of the training pool).
NORMALIZATIONS = ("fixed", "pool")
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
  # Set by `load_labeling_folder` alone: what a human oracle is shown and starts from.
  train_files: tuple[str, ...] = ()  # absolute path of each pool image, by id
  seed_ids: np.ndarray | None = None  # sorted ids of the images the user labeled up front
  # Set when this process loaded only rows [first_row, first_row + len(y_train)) of the
  # pool (config.data.shard_pool); x_train and y_train then hold those rows alone.
  first_row: int = 0
  pool_size: int | None = None

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
    if self.pool_size is None:
      return _channel_stats(self.x_train, total=lambda v: v)
    from lplgrad_jax import distributed  # JAX: not imported by the JAX-free labeling page

    return _channel_stats(self.x_train, total=distributed.sum_over_processes)


def _channel_stats(images: np.ndarray, total) -> tuple[np.ndarray, np.ndarray]:
  """Mean and std per channel of uint8 `images`; `total` adds float64 sums up over the
  holders of the pool (identity when this process holds all of it)."""
  pixels = images.reshape(-1, 3).astype(np.float64) / 255.0
  count = total(np.array([len(pixels)], np.float64))[0]
  mean = total(pixels.sum(0)) / count
  var = total(np.square(pixels - mean).sum(0)) / count
  return mean.astype(np.float32), np.maximum(np.sqrt(var), 1e-3).astype(np.float32)


def _to_rgb_uint8(images: np.ndarray, what: str) -> np.ndarray:
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


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of uint8 NHWC images to (size, size) through Pillow."""
  if images.shape[1:3] == (size, size):
    return images
  from PIL import Image

  return np.stack(
    [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images]
  )


def _check_labels(y: np.ndarray, num_classes: int, what: str) -> np.ndarray:
  y = np.asarray(y).astype(np.int64).reshape(-1)
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ConfigError(f"{what} holds labels outside 0..{num_classes - 1}")
  return y.astype(np.int32)


# A process's share of the pool: (first row, end row) given the pool's size.
RowRange = Callable[[int], tuple[int, int]]


def _keep_rows(dataset: Dataset, rows: RowRange | None) -> Dataset:
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


def load_digits(data_config, rows: RowRange | None = None) -> Dataset:
  """scikit-learn's 1,797 real 8x8 digits, upsampled; fixed 80/20 split (seed 0)."""
  pixels, labels = _digits_arrays()
  images = _to_rgb_uint8(pixels * (255.0 / 16.0), "digits")
  images = _resize(images, data_config.image_size)
  order = np.random.default_rng(0).permutation(len(images))
  num_test = len(images) // 5
  test, train = order[:num_test], order[num_test:]
  return _keep_rows(
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
    x_train = _to_rgb_uint8(arrays["x_train"], f"{path}:x_train")
    x_test = _to_rgb_uint8(arrays["x_test"], f"{path}:x_test")
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
  return _keep_rows(
    Dataset(
      os.path.splitext(os.path.basename(path))[0],
      _resize(x_train, size),
      _check_labels(y_train, len(names), "y_train"),
      _resize(x_test, size),
      _check_labels(y_test, len(names), "y_test"),
      names,
    ),
    rows,
  )


def _list_class_dirs(split_dir: str) -> list[str]:
  return sorted(
    d
    for d in os.listdir(split_dir)
    if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith(".")
  )


def read_image(path: str, size: int) -> np.ndarray:
  """One image file as the model sees it: RGB uint8 (size, size, 3), bilinear resize.

  Shared by the folder loaders and the predictor, so that new images are
  prepared exactly like the training pool. ConfigError naming the file if
  Pillow cannot decode it.
  """
  from PIL import Image

  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # SyntaxError: broken PNG
    raise ConfigError(f"cannot read image {path}: {e}") from None


def _read_image_folder(
  split_dir: str, class_names: list[str], size: int, rows: RowRange | None = None
):
  """(images, labels, number of files, first row read): the files of rows `rows(N)` alone."""
  files = [
    (os.path.join(split_dir, name, file), label)
    for label, name in enumerate(class_names)
    for file in sorted(os.listdir(os.path.join(split_dir, name)))
    if file.lower().endswith(IMAGE_SUFFIXES)
  ]
  if not files:
    raise ConfigError(
      f"{split_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders"
    )
  start, end = rows(len(files)) if rows is not None else (0, len(files))
  images = [read_image(path, size) for path, _ in files[start:end]]
  shape = (0, size, size, 3)
  return (
    np.stack(images) if images else np.zeros(shape, np.uint8),
    np.asarray([label for _, label in files[start:end]], np.int32),
    len(files),
    start,
  )


def load_image_folder(data_config, rows: RowRange | None = None) -> Dataset:
  """`root/train/<class>/*` and `root/test/<class>/*`, RGB, resized to image_size."""
  root = os.path.expanduser(data_config.root or "")
  train_dir, test_dir = os.path.join(root, "train"), os.path.join(root, "test")
  if not root or not os.path.isdir(root):
    raise ConfigError(
      f"data.root={data_config.root!r} is not a directory: expected an image folder with "
      "train/<class>/ and test/<class>/"
    )
  for split_dir in (train_dir, test_dir):
    if not os.path.isdir(split_dir):
      raise ConfigError(
        f"{split_dir} is missing: expected {root}/train/<class>/ and {root}/test/<class>/"
      )
  classes = _list_class_dirs(train_dir)
  test_classes = _list_class_dirs(test_dir)
  if not classes:
    raise ConfigError(
      f"{train_dir} has no class folders: expected {train_dir}/<class>/<image files>"
    )
  if test_classes != classes:
    raise ConfigError(
      f"test classes {test_classes} differ from train classes {classes} in {root}: "
      "expected the same class folders"
    )
  size = data_config.image_size
  x_train, y_train, pool_size, first_row = _read_image_folder(train_dir, classes, size, rows)
  x_test, y_test, _, _ = _read_image_folder(test_dir, classes, size)
  name = data_config.get("name") or os.path.basename(os.path.normpath(root))
  return Dataset(
    name,
    x_train,
    y_train,
    x_test,
    y_test,
    tuple(classes),
    first_row=first_row,
    pool_size=pool_size if rows is not None else None,
  )


def image_files(directory: str) -> list[str]:
  """Image files under `directory`, recursively, sorted, as paths relative to it.

  Hidden files and folders are passed over: macOS's `._IMG_1.jpg` companions
  carry an image suffix but are not images.
  """
  found = []
  for parent, dirs, files in os.walk(directory):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    found += [
      os.path.relpath(os.path.join(parent, f), directory)
      for f in files
      if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)
    ]
  return sorted(found)


def _class_files(split_dir: str, allow_empty: bool = False) -> dict[str, list[str]]:
  """{class folder name: paths of its images} of `split_dir/<class>/`, classes sorted.

  An image lying directly in `split_dir` is refused rather than ignored: it
  is almost always one the user meant to file under a class. `allow_empty`:
  an empty folder still names a class (one with no seed images yet).
  """
  loose = [
    f
    for f in sorted(os.listdir(split_dir))
    if not f.startswith(".")
    and f.lower().endswith(IMAGE_SUFFIXES)
    and os.path.isfile(os.path.join(split_dir, f))
  ]
  if loose:
    raise ConfigError(
      f"{os.path.join(split_dir, loose[0])} is not in a class folder: "
      f"expected {split_dir}/<class>/<image files>"
    )
  files = {}
  for name in _list_class_dirs(split_dir):
    class_dir = os.path.join(split_dir, name)
    files[name] = [os.path.join(class_dir, f) for f in image_files(class_dir)]
    if not files[name] and not allow_empty:
      raise ConfigError(f"class folder {class_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
  return files


def load_labeling_folder(data_config) -> Dataset:
  """A user's photos for the human oracle: a labeled seed set, unlabeled images, maybe a test set.

  Layout: `root/labeled/<class>/*` (the seed set; its folders name the classes),
  `root/unlabeled/*` and optionally `root/test/<class>/*` (classes among the
  labeled ones; without it the test split is empty). Folders below these are
  read recursively, as photo collections often come in dated subfolders.
  The pool holds the labeled and the unlabeled images together, ordered by file
  name (then path): ids follow file names, so the ids in a query file are easy
  to find among one's files, and a user who numbers files keeps those numbers.
  `y_train` is -1 for unlabeled images; `seed_ids` lists the labeled ones.
  """
  layout = "expected labeled/<class>/, unlabeled/ and optionally test/<class>/ in it"
  root = os.path.abspath(os.path.expanduser(data_config.root)) if data_config.root else ""
  if not root or not os.path.isdir(root):
    raise ConfigError(f"data.root={data_config.root!r} is not a directory: {layout}")
  labeled_dir, unlabeled_dir, test_dir = (
    os.path.join(root, d) for d in ("labeled", "unlabeled", "test")
  )
  for directory in (labeled_dir, unlabeled_dir):
    if not os.path.isdir(directory):
      raise ConfigError(f"{directory} is missing: {layout}")
  labeled = _class_files(labeled_dir, allow_empty=True)
  if not any(labeled.values()):
    raise ConfigError(
      f"{labeled_dir} has no labeled images: expected "
      f"{labeled_dir}/<class>/<image files>, a few labeled images per class"
    )
  classes = tuple(labeled)
  for name in classes:
    if name.casefold() == SKIP:
      raise ConfigError(
        f"class folder {os.path.join(labeled_dir, name)} clashes with the label "
        f"{SKIP!r} that marks unusable images: rename the folder"
      )
  pool = [(path, label) for label, name in enumerate(classes) for path in labeled[name]]
  pool += [(os.path.join(unlabeled_dir, f), -1) for f in image_files(unlabeled_dir)]
  pool.sort(key=lambda item: (os.path.basename(item[0]), os.path.relpath(item[0], root)))
  size = data_config.image_size
  x_train = np.stack([read_image(path, size) for path, _ in pool])
  y_train = np.asarray([label for _, label in pool], np.int32)

  x_test, y_test = np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int32)
  if os.path.isdir(test_dir):
    test = _class_files(test_dir)
    if not test:
      raise ConfigError(
        f"{test_dir} has no class folders: expected {test_dir}/<class>/<image "
        "files> with classes of labeled/, or no test/ folder"
      )
    unknown = [c for c in test if c not in classes]
    if unknown:
      raise ConfigError(
        f"test class folder {os.path.join(test_dir, unknown[0])} is not a class "
        f"of {labeled_dir}: expected test classes among {', '.join(classes)}"
      )
    test_pairs = [(path, classes.index(name)) for name in test for path in test[name]]
    x_test = np.stack([read_image(path, size) for path, _ in test_pairs])
    y_test = np.asarray([label for _, label in test_pairs], np.int32)
  name = data_config.get("name") or os.path.basename(root)
  return Dataset(
    name,
    x_train,
    y_train,
    x_test,
    y_test,
    classes,
    train_files=tuple(path for path, _ in pool),
    seed_ids=np.flatnonzero(y_train >= 0).astype(np.int32),
  )


# Seconds to wait for a data host before calling a TFDS download failed: TFDS itself retries
# an unreachable host for minutes.
PROBE_TIMEOUT = 5.0
# Longest stall of one download connection (TFDS sets no timeout).
DOWNLOAD_SOCKET_TIMEOUT = 60.0


def _import_tfds():
  """TFDS, imported on first use. It imports TensorFlow (seconds) only to prepare or read."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # else a oneDNN notice at TF's import
  import tensorflow_datasets as tfds

  return tfds


def _import_tensorflow():
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")  # keep TF off the accelerator JAX uses
  return tf


def _offline_routes(name: str, archives: list[str]) -> str:
  return (
    f"pass data.data_dir=<a tensorflow_datasets folder holding a prepared {name}/> or "
    f"data.manual_dir=<a folder holding {', '.join(archives)}>"
  )


def _unreachable(urls: list[str], timeout: float) -> str | None:
  """`host:port: reason` of the first data host (or its proxy) that takes no connection."""
  proxies = urllib.request.getproxies()
  for url in urls:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = proxies.get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
      proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
      host, port = proxy_parts.hostname, proxy_parts.port or 80
    try:
      socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
      return f"{host}:{port}: {e.strerror or e}"
  return None


def _download_and_prepare(builder, data_config, tfds) -> None:
  """Has TFDS download (or take from data.manual_dir) and prepare `builder`'s data set.

  ConfigError, within seconds when the data hosts cannot be reached, naming
  the routes that work without network.
  """
  name = builder.name
  url_infos = builder.url_infos or {}
  manual_dir = os.path.expanduser(data_config.manual_dir) if data_config.manual_dir else None
  archives = sorted(info.filename or os.path.basename(url) for url, info in url_infos.items())
  routes = _offline_routes(name, archives)
  to_fetch = [
    url
    for url, info in url_infos.items()
    if not (
      manual_dir and info.filename and os.path.isfile(os.path.join(manual_dir, info.filename))
    )
  ]
  if to_fetch and not data_config.download:
    raise ConfigError(
      f"TFDS data set {name!r} is not prepared in {builder.data_dir!r} and "
      f"data.download=False: {routes}"
    )
  if to_fetch and (reason := _unreachable(to_fetch, PROBE_TIMEOUT)):
    raise ConfigError(
      f"download of TFDS data set {name!r} failed (cannot reach {reason}): to run offline, {routes}"
    )
  _import_tensorflow()  # before TFDS does, to hide the GPU from it
  config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
  previous_timeout = socket.getdefaulttimeout()
  socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT)
  try:
    builder.download_and_prepare(download_config=config)
  except (
    OSError,
    tfds.download.DownloadError,
    tfds.download.download_manager.NonMatchingChecksumError,
  ) as e:
    reason = " ".join(str(e).split("\n")[0].split())[:300]
    raise ConfigError(
      f"cannot download and prepare TFDS data set {name!r} ({reason}): to run offline, {routes}"
    ) from None
  finally:
    socket.setdefaulttimeout(previous_timeout)


def _tf_resizer(tf, size: int):
  """A tf.data map: images to (size, size) uint8, resized where their static shape differs."""

  def resize(x, y):
    if x.shape[0] != size or x.shape[1] != size:
      x = tf.image.resize(x, (size, size), antialias=True)
    return tf.cast(x, tf.uint8), y

  return resize


def load_tfds(data_config, rows: RowRange | None = None) -> Dataset:
  """A TFDS image-classification data set, read once into memory in file order.

  Not yet prepared: built by TFDS from the archives in data.manual_dir, or
  downloaded and prepared (data.download, the default; a download that
  cannot start fails within PROBE_TIMEOUT seconds).
  """
  name = data_config.name
  check_choice(name, TFDS_DATASETS, "TFDS data set")
  data_dir = os.path.expanduser(data_config.data_dir) if data_config.data_dir else None
  if (
    data_dir
    and not os.path.isdir(data_dir)
    and not (data_config.download or data_config.manual_dir)
  ):
    raise ConfigError(
      f"data.data_dir={data_config.data_dir!r} does not exist: expected a TFDS data "
      f"directory holding {name}/ (or set data.download=True)"
    )
  tfds = _import_tfds()
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # "Variant folder ... has no dataset_info.json"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
  finally:
    absl_logging.set_verbosity(verbosity)
  if not prepared:
    _download_and_prepare(builder, data_config, tfds)
  tf = _import_tensorflow()

  size = data_config.image_size

  def read(split: str, start: int = 0, end: int | None = None):
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    if end is not None:  # this process's rows only: skipped ones are never kept
      ds = ds.skip(start).take(end - start)
    if size:
      ds = ds.map(_tf_resizer(tf, size))
    xs, ys = [], []
    for x, y in tfds.as_numpy(ds.batch(1024)):
      xs.append(x)
      ys.append(y)
    if not xs:
      return np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int32)
    return _to_rgb_uint8(np.concatenate(xs), f"{name}:{split}"), np.concatenate(ys).astype(np.int32)

  try:
    pool_size = first_row = None
    if rows is not None:
      pool_size = builder.info.splits[data_config.train_split].num_examples
      first_row, end = rows(pool_size)
      x_train, y_train = read(data_config.train_split, first_row, end)
    else:
      x_train, y_train = read(data_config.train_split)
    x_test, y_test = read(data_config.test_split)
  except ValueError as e:  # e.g. a bad split expression
    raise ConfigError(
      f"cannot read {name} splits {data_config.train_split!r}/{data_config.test_split!r}: {e}"
    ) from None
  label = builder.info.supervised_keys[1]
  class_names = tuple(builder.info.features[label].names)
  return Dataset(
    name,
    x_train,
    y_train,
    x_test,
    y_test,
    class_names,
    first_row=first_row or 0,
    pool_size=pool_size,
  )


def input_normalization(data_config, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
  """The per-channel (mean, std) that images are normalised with, as `data.normalization` says.

  "pool": statistics of the whole pool, also when each process holds a shard of it.
  """
  if check_choice(data_config.normalization, NORMALIZATIONS, "data.normalization") == "fixed":
    mean, std = (np.asarray(data_config[k], np.float32) for k in ("mean", "std"))
    if mean.shape != (3,) or std.shape != (3,) or not np.all(std > 0):
      raise ConfigError(
        f"data.mean={tuple(data_config.mean)} data.std={tuple(data_config.std)}: "
        "expected 3 values each, std > 0"
      )
    return mean, std
  return dataset.channel_stats()


SOURCES: dict[str, Callable[..., Dataset]] = {
  "tfds": load_tfds,
  "image_folder": load_image_folder,
  "digits": load_digits,
  "npz": load_npz,
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
