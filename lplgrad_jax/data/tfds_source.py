"""TFDS data sets: read from data_dir, prepared from the archives in manual_dir, or downloaded.

TensorFlow and TFDS are imported on first use only (seconds, and not needed by any other
source); a download that cannot start fails within PROBE_TIMEOUT seconds and names the
routes that work offline.
"""

from __future__ import annotations

import functools
import os
import socket
import urllib.parse
import urllib.request

import numpy as np
from absl import logging as absl_logging

from lplgrad_jax.data.dataset import Dataset
from lplgrad_jax.data.dataset import RowRange
from lplgrad_jax.data.dataset import to_rgb_uint8
from lplgrad_jax.data.npy_folder import Split
from lplgrad_jax.errors import ConfigError
from lplgrad_jax.errors import check_choice

TFDS_DATASETS = ("cifar10", "cifar100", "svhn_cropped", "caltech101")

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


def _prepared_builder(data_config):
  """(tfds, tf, the data set's builder), prepared: built by TFDS from the archives in
  data.manual_dir, or downloaded and prepared (data.download, the default; a download that
  cannot start fails within PROBE_TIMEOUT seconds)."""
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
  return tfds, _import_tensorflow(), builder


def _batches(data_config, tfds, tf, builder, split: str, n: int, start=0, end=None):
  """(images, labels) batches of `split`'s rows [start, end), in file order, resized."""
  ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
  if end is not None:  # this process's rows only: skipped ones are never kept
    ds = ds.skip(start).take(end - start)
  if data_config.image_size:
    ds = ds.map(_tf_resizer(tf, data_config.image_size))
  for x, y in tfds.as_numpy(ds.batch(n)):
    yield to_rgb_uint8(x, f"{data_config.name}:{split}"), y.astype(np.int32)


def _class_names(builder) -> tuple[str, ...]:
  label = builder.info.supervised_keys[1]
  return tuple(builder.info.features[label].names)


def tfds_splits(data_config) -> tuple[str, tuple[str, ...], dict[str, Split]]:
  """(name, class names, {"train", "test": Split}) of a TFDS data set, read a chunk at a time
  (the converter: a data set larger than memory)."""
  tfds, tf, builder = _prepared_builder(data_config)
  splits = {}
  for key in ("train", "test"):
    split = data_config[f"{key}_split"]
    try:
      count = builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
      raise ConfigError(f"cannot read {data_config.name} split {split!r}: {e}") from None
    chunks = functools.partial(_batches, data_config, tfds, tf, builder, split)
    splits[key] = Split(count, chunks)
  return data_config.name, _class_names(builder), splits


def load_tfds(data_config, rows: RowRange | None = None) -> Dataset:
  """A TFDS image-classification data set, read once into memory in file order."""
  tfds, tf, builder = _prepared_builder(data_config)
  name, size = data_config.name, data_config.image_size

  def read(split: str, start: int = 0, end: int | None = None):
    xs, ys = [], []
    for x, y in _batches(data_config, tfds, tf, builder, split, 1024, start, end):
      xs.append(x)
      ys.append(y)
    if not xs:
      return np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int32)
    return np.concatenate(xs), np.concatenate(ys)

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
  return Dataset(
    name,
    x_train,
    y_train,
    x_test,
    y_test,
    _class_names(builder),
    first_row=first_row or 0,
    pool_size=pool_size,
  )
