import os
from unittest import mock

import numpy as np
import pytest
from conftest import SHARED_CIFAR
from conftest import local_proxy
from conftest import tiny_config
from PIL import Image

from lplgrad_jax import data
from lplgrad_jax.errors import ConfigError


def _data_config(**overrides):
  config = tiny_config()
  for k, v in overrides.items():
    config.data[k] = v
  return config.data


def test_digits_is_real_and_split_deterministically():
  first = data.load_dataset(_data_config(image_size=16))
  second = data.load_dataset(_data_config(image_size=16))
  assert first.x_train.shape == (1438, 16, 16, 3) and first.x_test.shape == (359, 16, 16, 3)
  assert first.x_train.dtype == np.uint8 and first.y_train.dtype == np.int32
  assert first.num_classes == 10 and set(np.unique(first.y_test)) == set(range(10))
  np.testing.assert_array_equal(first.x_train, second.x_train)
  np.testing.assert_array_equal(first.y_train, second.y_train)
  # Grayscale digits become RGB with equal channels.
  np.testing.assert_array_equal(first.x_train[..., 0], first.x_train[..., 2])


def test_npz_source_converts_grayscale_and_resizes(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "set.npz"
  np.savez(
    path,
    x_train=rng.integers(0, 256, (12, 10, 10), dtype=np.uint8),
    y_train=np.arange(12) % 3,
    x_test=rng.integers(0, 256, (6, 10, 10), dtype=np.uint8),
    y_test=np.arange(6) % 3,
  )
  ds = data.load_dataset(_data_config(source="npz", root=str(path), image_size=8))
  assert ds.x_train.shape == (12, 8, 8, 3) and ds.num_classes == 3
  np.testing.assert_array_equal(ds.y_test, np.arange(6) % 3)


def test_npz_source_errors(tmp_path):
  with pytest.raises(ConfigError, match="is not an .npz file"):
    data.load_dataset(_data_config(source="npz", root=str(tmp_path / "missing.npz")))
  path = tmp_path / "partial.npz"
  np.savez(path, x_train=np.zeros((2, 8, 8, 3), np.uint8), y_train=np.zeros(2))
  with pytest.raises(ConfigError, match=r"lacks arrays \['x_test', 'y_test'\]"):
    data.load_dataset(_data_config(source="npz", root=str(path)))


@pytest.mark.skipif(
  not os.path.exists(SHARED_CIFAR), reason="no ../shared/data (a user's checkout)"
)
def test_shared_cifar10_subset_loads_through_npz():
  ds = data.load_dataset(_data_config(source="npz", root=SHARED_CIFAR, image_size=32))
  assert ds.x_train.shape == (5085, 32, 32, 3) and ds.x_test.shape == (1017, 32, 32, 3)
  assert ds.num_classes == 10
  assert 475 <= np.bincount(ds.y_train).min() <= np.bincount(ds.y_train).max() <= 537


def _write_image_folder(root, train_classes=("cat", "dog", "eel"), test_classes=None):
  rng = np.random.default_rng(1)
  for split, classes, count in (
    ("train", train_classes, 4),
    ("test", test_classes or train_classes, 2),
  ):
    for c, name in enumerate(classes):
      os.makedirs(root / split / name)
      for i in range(count):
        if i % 2:  # grayscale JPEG of another size
          Image.fromarray(rng.integers(0, 256, (20, 14), dtype=np.uint8), "L").save(
            root / split / name / f"{i}.jpg"
          )
        else:
          Image.fromarray(np.full((9, 9, 3), 40 * c + i, np.uint8)).save(
            root / split / name / f"{i}.png"
          )
      (root / split / name / "notes.txt").write_text("not an image")


def test_image_folder_reads_rgb_and_grayscale(tmp_path):
  _write_image_folder(tmp_path)
  ds = data.load_dataset(_data_config(source="image_folder", root=str(tmp_path), image_size=12))
  assert ds.class_names == ("cat", "dog", "eel")
  assert ds.x_train.shape == (12, 12, 12, 3) and ds.x_test.shape == (6, 12, 12, 3)
  np.testing.assert_array_equal(ds.y_train, np.repeat([0, 1, 2], 4))
  # The PNG of class 1, image 0, is a flat colour 40.
  np.testing.assert_array_equal(ds.x_train[4], np.full((12, 12, 3), 40, np.uint8))


def _assert_shard_of(shard, whole, start, end):
  """`shard` (loaded with rows=(start, end)) holds exactly those pool rows of `whole`."""
  assert (shard.first_row, shard.num_train, len(shard.y_train)) == (
    start,
    whole.num_train,
    end - start,
  )
  np.testing.assert_array_equal(shard.x_train, whole.x_train[start:end])
  np.testing.assert_array_equal(shard.y_train, whole.y_train[start:end])
  np.testing.assert_array_equal(shard.x_test, whole.x_test)  # every process tests on all


@pytest.mark.parametrize("source", ["image_folder", "digits"])
def test_a_process_loads_only_its_rows_of_the_pool(source, tmp_path):
  _write_image_folder(tmp_path)
  config = _data_config(source=source, root=str(tmp_path), image_size=12)
  whole = data.load_dataset(config)
  _assert_shard_of(data.load_dataset(config, rows=lambda n: (5, min(9, n))), whole, 5, 9)


def test_image_folder_errors(tmp_path):
  with pytest.raises(ConfigError, match="is not a directory"):
    data.load_dataset(_data_config(source="image_folder", root=str(tmp_path / "nope")))
  _write_image_folder(tmp_path / "a", test_classes=("cat", "dog"))
  with pytest.raises(ConfigError, match=r"test classes \['cat', 'dog'\] differ"):
    data.load_dataset(_data_config(source="image_folder", root=str(tmp_path / "a")))
  os.makedirs(tmp_path / "b" / "train")
  with pytest.raises(ConfigError, match="test is missing"):
    data.load_dataset(_data_config(source="image_folder", root=str(tmp_path / "b")))


def test_unknown_source_and_tfds_name():
  with pytest.raises(ConfigError, match="unknown data source 'csv'"):
    data.load_dataset(_data_config(source="csv"))
  with pytest.raises(ConfigError, match="unknown TFDS data set 'mnist'"):
    data.load_dataset(_data_config(source="tfds", name="mnist"))


def _write_cifar10_binaries(root, per_file=6):
  """Files in the layout of cifar-10-binary.tar.gz: label byte + 3072 CHW bytes each."""
  batches = root / "cifar-10-batches-bin"
  os.makedirs(batches)
  rng = np.random.default_rng(2)
  names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
  (batches / "batches.meta.txt").write_text("\n".join(names) + "\n")
  written = {}
  for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
    labels = rng.integers(0, 10, per_file, dtype=np.uint8)
    images = rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8)
    records = np.concatenate([labels[:, None], images.reshape(per_file, -1)], axis=1)
    (batches / name).write_bytes(records.tobytes())
    written[name] = (labels, images.transpose(0, 2, 3, 1))
  return written


def test_tfds_builds_locally_then_reads_offline(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds

  raw = tmp_path / "raw"
  written = _write_cifar10_binaries(raw)
  data_dir = tmp_path / "tfds"
  os.makedirs(data_dir)
  config = _data_config(
    source="tfds", name="cifar10", data_dir=str(data_dir), download=False, image_size=32
  )
  with pytest.raises(ConfigError, match="is not prepared"):
    data.load_dataset(config)
  # Prepare with TFDS's own cifar10 builder, its download served from local files.
  with (
    local_proxy(monkeypatch, reachable=True),
    mock.patch.object(tfds.download.DownloadManager, "download_and_extract", return_value=str(raw)),
  ):
    config.download = True
    data.load_dataset(config)
  config.download = False  # the offline path: a prepared data_dir
  ds = data.load_dataset(config)
  assert ds.x_train.shape == (30, 32, 32, 3) and ds.x_test.shape == (6, 32, 32, 3)
  assert ds.class_names[:2] == ("airplane", "automobile")
  test_labels, test_images = written["test_batch.bin"]
  # TFDS may reorder examples; every written test image must come back with its label.
  for image, label in zip(test_images, test_labels):
    match = np.all(ds.x_test == image, axis=(1, 2, 3))
    assert match.sum() == 1 and ds.y_test[match][0] == label
  again = data.load_dataset(config)
  np.testing.assert_array_equal(again.x_train, ds.x_train)  # stable ids across loads
  _assert_shard_of(data.load_dataset(config, rows=lambda n: (7, 19)), ds, 7, 19)
  resized = data.load_dataset(
    _data_config(source="tfds", name="cifar10", data_dir=str(data_dir), image_size=16)
  )
  assert resized.x_train.shape == (30, 16, 16, 3)
  # The converter reads it a chunk at a time; the npy folder reads back as the data set.
  from lplgrad_jax import convert

  convert.convert(config, str(tmp_path / "npy"), 4, progress=False)
  npy = data.load_dataset(_data_config(source="npy", root=str(tmp_path / "npy"), image_size=32))
  for key in ("x_train", "y_train", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(npy, key), getattr(ds, key))
  assert npy.class_names == ds.class_names


def test_tfds_missing_data_dir(tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    data.load_dataset(
      _data_config(source="tfds", name="cifar10", data_dir=str(tmp_path / "absent"), download=False)
    )


def test_input_normalization_fixed_or_pool():
  from lplgrad_jax.configs import cifar10
  from lplgrad_jax.configs import cifar100
  from lplgrad_jax.configs import svhn

  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (5, 4, 4, 3), np.uint8)
  dataset = data.Dataset("t", x, np.zeros(5, np.int32), x, np.zeros(5, np.int32), ("a",))
  mean, std = data.input_normalization(cifar10.get_config().data, dataset)
  # The constants of the authors' (and Learning Loss's) code.
  np.testing.assert_array_equal(mean, np.float32([0.4914, 0.4822, 0.4465]))
  np.testing.assert_array_equal(std, np.float32([0.2023, 0.1994, 0.2010]))
  mean, _ = data.input_normalization(cifar100.get_config().data, dataset)
  np.testing.assert_array_equal(mean, np.float32([0.5071, 0.4867, 0.4408]))
  for config in (svhn.get_config(), tiny_config()):  # no constants in the code: the pool's
    mean, std = data.input_normalization(config.data, dataset)
    pixels = x.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, pixels.std(0), rtol=1e-6)
  config = cifar10.get_config()
  config.data.normalization = "imagenet"
  with pytest.raises(ConfigError, match="unknown data.normalization 'imagenet'"):
    data.input_normalization(config.data, dataset)
  config.data.normalization = "fixed"
  config.data.std = (0.2, 0.0, 0.2)
  with pytest.raises(ConfigError, match=r"data.std=\(0.2, 0.0, 0.2\)"):
    data.input_normalization(config.data, dataset)
