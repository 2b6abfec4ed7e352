"""How a TFDS data set that is not prepared gets prepared: offline failure, manual_dir, download.

The archives are tiny fakes in the real cifar-10-binary.tar.gz format, written by the tests and
prepared by TFDS's own cifar10 builder. No test reaches the network: the offline tests point
the proxy at a closed port (or need the data host to be unreachable), the download test
replaces only TFDS's HTTP transfer (`_Downloader._sync_download`).
"""

import contextlib
import os
import socket
import tarfile
from unittest import mock

import numpy as np
import pytest
from conftest import REPO_ROOT
from conftest import cli_env
from conftest import local_proxy
from conftest import run_cli
from test_data import _data_config
from test_data import _write_cifar10_binaries

from lplgrad_jax import data
from lplgrad_jax.errors import ConfigError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"


@pytest.fixture
def archive(tmp_path):
  """(path of a fake cifar-10-binary.tar.gz in archives/, {file: (labels, images)})."""
  written = _write_cifar10_binaries(tmp_path / "raw", per_file=4)
  path = tmp_path / "archives" / "cifar-10-binary.tar.gz"
  os.makedirs(path.parent)
  with tarfile.open(path, "w:gz") as tar:
    tar.add(tmp_path / "raw" / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
  return path, written


@contextlib.contextmanager
def _registered(archive_path):
  """TFDS's checksum registry holding the fake archive's checksum instead of the real one."""
  import tensorflow_datasets as tfds

  info = tfds.download.checksums.compute_url_info(archive_path)
  assert list(tfds.builder_cls("cifar10").url_infos) == [CIFAR10_URL]
  with mock.patch.object(tfds.builder_cls("cifar10"), "url_infos", {CIFAR10_URL: info}):
    yield


def _assert_cifar_matches(ds, written):
  assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
  labels, images = written["test_batch.bin"]
  for image, label in zip(images, labels):  # TFDS may reorder: match each image
    match = np.all(ds.x_test == image, axis=(1, 2, 3))
    assert match.sum() == 1 and ds.y_test[match][0] == label


def _host_unreachable(host: str) -> bool:
  try:
    socket.create_connection((host, 443), timeout=3).close()
    return False
  except OSError:
    return True


@pytest.mark.parametrize("route", ["no network", "dead proxy"])
def test_offline_main_command_fails_fast_with_one_error_line(route, tmp_path, monkeypatch):
  """The card's command, no flag, offline: exit 2, one error line naming the offline routes."""
  for var in ("no_proxy", "NO_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(var, raising=False)
  with contextlib.ExitStack() as stack:
    if route == "dead proxy":
      stack.enter_context(local_proxy(monkeypatch, reachable=False))
    elif not _host_unreachable("www.cs.toronto.edu"):
      pytest.skip("this machine reaches the CIFAR host")
    env = cli_env(TFDS_DATA_DIR=str(tmp_path / "tfds"))
    proc = run_cli("--config=configs/cifar100.py", env=env, timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert len(lines) == 1, proc.stderr  # nothing but the error: no TF, absl or retry lines
  assert lines[0].startswith("error: download of TFDS data set 'cifar100' failed (cannot reach ")
  assert (
    "data.data_dir=<a tensorflow_datasets folder holding a prepared cifar100/>" in lines[0]
    and "data.manual_dir=<a folder holding cifar-100-binary.tar.gz>" in lines[0]
  )
  assert not os.path.exists(os.path.join(REPO_ROOT, "runs", "cifar100", "lplgrad", "seed0"))
  assert "tensorflow" not in proc.stdout


def test_download_off_names_the_offline_routes(tmp_path):
  config = _data_config(source="tfds", name="cifar10", data_dir=str(tmp_path), download=False)
  with pytest.raises(
    ConfigError,
    match=r"is not prepared .* and data.download=False: pass "
    r"data.data_dir=.*data.manual_dir="
    r"<a folder holding cifar-10-binary.tar.gz>",
  ):
    data.load_dataset(config)


def test_manual_dir_archives_prepare_without_network(archive, tmp_path, monkeypatch):
  path, written = archive
  monkeypatch.setattr(data.tfds_source, "_unreachable", None)  # never probed: nothing to fetch
  # data.download=False: archives in manual_dir need no download.
  config = _data_config(
    source="tfds",
    name="cifar10",
    data_dir=str(tmp_path / "tfds"),
    manual_dir=str(path.parent),
    download=False,
    image_size=32,
  )
  # The real registry refuses the fake archive: one error line, not a traceback.
  with pytest.raises(
    ConfigError,
    match=r"cannot download and prepare TFDS data set "
    r"'cifar10' \(Artifact .*cifar-10-binary.tar.gz.* "
    r"has wrong checksum",
  ):
    data.load_dataset(config)
  with _registered(path):
    ds = data.load_dataset(config)
  _assert_cifar_matches(ds, written)
  config.manual_dir = ""  # prepared: read without the archives
  np.testing.assert_array_equal(data.load_dataset(config).x_train, ds.x_train)


def test_download_prepares_through_tfds_download_manager(archive, tmp_path, monkeypatch):
  """The online route: TFDS downloads (its HTTP transfer faked), checks, extracts, prepares."""
  from tensorflow_datasets.core.download import downloader

  path, written = archive
  with local_proxy(monkeypatch, reachable=True):  # the data host probe passes
    fetched = []

    def transfer(self, url, destination_path, verify=True):
      fetched.append(url)
      target = destination_path / os.path.basename(url)
      target.write_bytes(path.read_bytes())
      return downloader.DownloadResult(
        path=target, url_info=downloader.checksums_lib.compute_url_info(target)
      )

    config = _data_config(
      source="tfds", name="cifar10", data_dir=str(tmp_path / "tfds"), download=True, image_size=32
    )
    with _registered(path), mock.patch.object(downloader._Downloader, "_sync_download", transfer):
      ds = data.load_dataset(config)
  assert fetched == [CIFAR10_URL]
  _assert_cifar_matches(ds, written)
