"""The npy route (a pool as memory-mapped .npy files), the converter that writes it
(lplgrad_jax.convert), and stream mode (data.stream: the labeled images alone on the devices,
the rest read from disk as the query uses them): what the converter writes reads back as the
source it came from, a campaign on it, streamed or not and resumed, is the campaign on the
source, and every bad folder is one clear error."""

import io
import json
import os
import struct
import time
import zlib

import jax
import numpy as np
import pytest
from conftest import campaign_outcome
from conftest import run_cli
from conftest import tiny_config
from flax import nnx
from PIL import Image

from lplgrad_jax import campaign
from lplgrad_jax import chunks
from lplgrad_jax import convert
from lplgrad_jax import data
from lplgrad_jax import device_pool
from lplgrad_jax import predict
from lplgrad_jax import sharding
from lplgrad_jax.configs import default
from lplgrad_jax.data import dataset as dataset_module
from lplgrad_jax.data import npy_folder
from lplgrad_jax.data import rows
from lplgrad_jax.errors import ConfigError


def _data_config(**overrides):
  config = default.get_config().data
  config.update(overrides)
  return config


def _image_folder(root):
  rng = np.random.default_rng(3)
  for split, count in (("train", 5), ("test", 2)):
    for c, name in enumerate(("bird", "cat", "dog")):
      os.makedirs(root / split / name)
      for i in range(count):
        size = (9 + i, 7 + c)  # sizes differ: every image is resized as it is read
        pixels = rng.integers(0, 256, (*size, 3), np.uint8)
        Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def _assert_same_dataset(read, source):
  for key in ("x_train", "y_train", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(read, key), getattr(source, key), err_msg=key)
  assert read.class_names == source.class_names


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_an_image_folder_converts_chunk_by_chunk_and_reads_back(chunk_size, tmp_path):
  _image_folder(tmp_path / "photos")
  folder = _data_config(source="image_folder", root=str(tmp_path / "photos"), image_size=12)
  meta = convert.convert(folder, str(tmp_path / "npy"), chunk_size, progress=False)
  assert not os.path.exists(tmp_path / "npy.partial")
  source = data.load_dataset(folder)
  read = data.load_dataset(_data_config(source="npy", root=str(tmp_path / "npy"), image_size=12))
  _assert_same_dataset(read, source)
  assert isinstance(read.x_train, np.memmap) and isinstance(read.x_test, np.memmap)
  assert (meta["num_train"], meta["num_test"], meta["class_names"]) == (
    15,
    6,
    ["bird", "cat", "dog"],
  )
  # The statistics of the one streaming pass are the two-pass ones, to float32's last bit.
  streamed, two_pass = read.channel_stats(), source.channel_stats()
  for a, b in zip(streamed, two_pass):
    np.testing.assert_array_equal(a, b)


def test_pool_statistics_without_meta_json_are_read_in_chunks(tmp_path, monkeypatch):
  convert.convert(_data_config(source="digits"), str(tmp_path / "npy"), 500, progress=False)
  meta_path = tmp_path / "npy" / "meta.json"
  meta = json.loads(meta_path.read_text())
  del meta["mean"], meta["std"]
  meta_path.write_text(json.dumps(meta))
  monkeypatch.setattr(dataset_module, "_STATS_CHUNK", 100)  # 15 chunks of the 1,438 images
  read = data.load_dataset(_data_config(source="npy", root=str(tmp_path / "npy")))
  assert read.pool_statistics is None and isinstance(read.x_train, np.memmap)
  whole = data.load_dataset(_data_config(source="digits"))
  for chunked, at_once in zip(read.channel_stats(), whole.channel_stats()):
    np.testing.assert_allclose(chunked, at_once, rtol=1e-6)
  meta["mean"] = [0.5, 0.5]
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(ConfigError, match='expected "mean" and "std", three numbers each'):
    data.load_dataset(_data_config(source="npy", root=str(tmp_path / "npy")))


@pytest.mark.parametrize("announced", [5, 7])
def test_a_source_that_yields_another_count_leaves_nothing(announced, tmp_path):
  images = np.zeros((6, 8, 8, 3), np.uint8)

  def chunks(n):
    for start in range(0, 6, n):
      yield images[start : start + n], np.zeros(min(n, 6 - start), np.int32)

  splits = {"train": npy_folder.Split(announced, chunks), "test": npy_folder.Split(0, chunks)}
  with pytest.raises(ConfigError, match=rf"{announced}( images)? announced"):
    npy_folder.write_npy(str(tmp_path / "out"), ("a",), splits, 4, _no_progress)
  assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")


class _no_progress:
  def __init__(self, total, split):
    del total, split

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def update(self, n):
    del n


def test_a_process_reads_only_its_rows(tmp_path):
  convert.convert(_data_config(source="digits"), str(tmp_path / "npy"), 500, progress=False)
  whole = data.load_dataset(_data_config(source="digits"))
  shard = data.load_dataset(
    _data_config(source="npy", root=str(tmp_path / "npy")), rows=lambda n: (100, 300)
  )
  np.testing.assert_array_equal(shard.x_train, whole.x_train[100:300])
  assert (shard.first_row, shard.num_train) == (100, whole.num_train)
  np.testing.assert_array_equal(shard.channel_stats()[0], whole.channel_stats()[0])


def test_statistics_of_chunks_equal_those_of_the_whole():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (50, 4, 4, 3), np.uint8)
  stats = npy_folder.ChannelStatistics()
  for start, end in ((0, 1), (1, 17), (17, 17), (17, 50)):
    stats.add(images[start:end])
  pixels = images.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(stats.mean, pixels.mean(0), rtol=1e-14)
  np.testing.assert_allclose(stats.m2 / len(pixels), pixels.var(0), rtol=1e-12)


@pytest.mark.parametrize("stream", [False, True], ids=["in_memory", "streamed"])
def test_a_campaign_on_the_converted_pool_is_the_campaign_on_the_source(
  stream, tiny_campaign, tmp_path, monkeypatch
):
  config, source_workdir, _ = tiny_campaign
  convert.convert(config.data, str(tmp_path / "npy"), 256, progress=False)
  on_npy = tiny_config(
    **{"data.source": "npy", "data.root": str(tmp_path / "npy"), "data.stream": stream}
  )
  workdir = str(tmp_path / "w")
  caches = []  # the training pool each round trains on
  rows = device_pool.LabeledCache.rows
  monkeypatch.setattr(
    device_pool.LabeledCache, "rows", lambda c, ids: caches.append(c.capacity) or rows(c, ids)
  )
  if stream:  # stopped after two rounds and resumed: the cache refills in another order
    on_npy.al.num_rounds = 2
    campaign.run(on_npy, workdir)
    on_npy.al.num_rounds = config.al.num_rounds
  campaign.run(on_npy, workdir)
  # Streamed: the devices held the final labeled set alone (30 images for two rounds, then 40
  # for three), never the pool's 1,438.
  assert caches == ([30, 30, 40] if stream else [])
  assert campaign_outcome(workdir) == campaign_outcome(source_workdir)
  trained, source = (predict.load_model(w).learner for w in (workdir, source_workdir))
  for a, b in zip(jax.tree.leaves(nnx.state(trained)), jax.tree.leaves(nnx.state(source))):
    np.testing.assert_array_equal(a, b)  # the same weights, bit for bit


def test_rows_are_read_as_their_slices_are_taken(tmp_path):
  path = str(tmp_path / "pool.npy")
  np.save(path, np.arange(40 * 2, dtype=np.uint8).reshape(40, 2))
  pool = np.load(path, mmap_mode="r")
  ids = np.array([31, 2, 17, 2, 39, 0, 8])
  view = rows.lazy_rows(pool, ids)
  assert isinstance(view, rows.Rows) and len(view) == 7 and view.shape == (7, 2)
  np.testing.assert_array_equal(view[2:6], np.asarray(pool)[ids[2:6]])
  in_memory = rows.lazy_rows(np.asarray(pool), ids)  # an array in memory is indexed at once
  assert isinstance(in_memory, np.ndarray) and in_memory.shape == (7, 2)


def test_prefetched_keeps_order_raises_and_stops():
  assert list(rows.prefetched(iter(range(10)), depth=2)) == list(range(10))

  def failing():
    yield 1
    raise OSError("disk gone")

  with pytest.raises(OSError, match="disk gone"):
    list(rows.prefetched(failing()))
  produced = []

  def counting():
    for i in range(1000):
      produced.append(i)
      yield i

  ahead = rows.prefetched(counting(), depth=2)
  assert next(ahead) == 0
  ahead.close()  # the consumer stops: the producer stops too, a few items ahead at most
  time.sleep(0.5)
  assert len(produced) <= 5


def _write_npy(root, **changes):
  rng = np.random.default_rng(0)
  arrays = {
    "train_images.npy": rng.integers(0, 256, (6, 32, 32, 3), np.uint8),
    "train_labels.npy": np.array([0, 1, 2, 0, 1, 2], np.int32),
    "test_images.npy": rng.integers(0, 256, (2, 32, 32, 3), np.uint8),
    "test_labels.npy": np.array([1, 0], np.int64),
  }
  arrays.update(changes)
  os.makedirs(root, exist_ok=True)
  for name, array in arrays.items():
    if array is None:
      continue
    if isinstance(array, bytes):
      (root / name).write_bytes(array)
    else:
      np.save(root / name, array)


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"test_labels.npy": None}, "lacks test_labels.npy"),
    ({"train_images.npy": b"not npy"}, "train_images.npy is not a readable .npy file"),
    ({"train_images.npy": np.zeros((6, 32, 32), np.uint8)}, r"uint8 \(6, 32, 32\): expected"),
    ({"test_images.npy": np.zeros((2, 32, 32, 3), np.float32)}, "float32 .*expected .* uint8"),
    ({"train_images.npy": np.zeros((6, 16, 16, 3), np.uint8)}, "16x16 images: expected data.im"),
    ({"train_labels.npy": np.zeros(5, np.int32)}, r"\(5,\): expected \(6,\) integers"),
    ({"train_labels.npy": np.array([0, -1, 2, 0, -1, 2])}, "2 training images have no label"),
    ({"train_labels.npy": np.array([0, 1, 2, 0, 1, 9])}, r"labels outside 0..2"),
  ],
  ids=[
    "missing_file",
    "not_npy",
    "grayscale",
    "float_images",
    "other_size",
    "label_count",
    "unlabeled",
    "label_range",
  ],
)
def test_a_bad_npy_folder_is_one_clear_error(changes, message, tmp_path):
  _write_npy(tmp_path / "d", **changes)
  if "label_range" in message or "outside" in message:
    (tmp_path / "d" / "meta.json").write_text(json.dumps({"class_names": ["a", "b", "c"]}))
  with pytest.raises(ConfigError, match=message):
    data.load_dataset(_data_config(source="npy", root=str(tmp_path / "d")))


def test_the_converter_never_overwrites(tmp_path):
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("mine")
  with pytest.raises(ConfigError, match="exists and is not an empty folder"):
    convert.convert(_data_config(source="digits"), str(tmp_path / "full"), progress=False)
  assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
  (tmp_path / "half.partial").mkdir()
  with pytest.raises(ConfigError, match="an interrupted conversion"):
    convert.convert(_data_config(source="digits"), str(tmp_path / "half"), progress=False)


def test_the_converter_command(tmp_path):
  proc = run_cli(
    "--config=digits",
    f"--out={tmp_path / 'npy'}",
    "--chunk_size=300",
    module="lplgrad_jax.convert",
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "1438 training and 359 test images, 10 classes" in proc.stdout
  assert "--config.data.source=npy" in proc.stdout
  again = run_cli("--config=digits", f"--out={tmp_path / 'npy'}", module="lplgrad_jax.convert")
  lines = [line for line in again.stderr.splitlines() if line.strip()]
  assert again.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --out=")


def _sparse_npy(path, shape, dtype=np.uint8):
  """An .npy file of zeros that takes no disk: its header, then a hole to its full size."""
  with open(path, "wb") as f:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False}
    np.lib.format.write_array_header_1_0(f, {**header, "shape": shape})
    f.truncate(f.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize)


_IN_ZIP64_EXTRA = 2**32 - 1  # a size or offset that the entry's ZIP64 extra field holds


def _sparse_npz(path, arrays: dict):
  """An uncompressed .npz (ZIP64) of `arrays`, where an entry given as a shape is uint8 zeros
  that take no disk: its .npy header, then a hole. What np.savez would write, byte for byte
  in the members, without writing the zeros. (Zip format: PKWARE's APPNOTE, 4.3 and 4.5.3.)"""
  entries, zeros, big = [], bytes(256 << 20), _IN_ZIP64_EXTRA
  with open(path, "wb") as f:
    for name, array in arrays.items():
      header = io.BytesIO()
      if isinstance(array, tuple):
        meta = {"descr": "|u1", "fortran_order": False, "shape": array}
        np.lib.format.write_array_header_1_0(header, meta)
        body, hole = header.getvalue(), int(np.prod(array))
      else:
        np.lib.format.write_array(header, np.ascontiguousarray(array))
        body, hole = header.getvalue(), 0
      crc = zlib.crc32(body)
      for start in range(0, hole, len(zeros)):
        crc = zlib.crc32(zeros[: min(len(zeros), hole - start)], crc)
      size, offset, name = len(body) + hole, f.tell(), f"{name}.npy".encode()
      extra = struct.pack("<HHQQ", 1, 16, size, size)
      # Local header: signature, version, flags, stored, time, date, CRC, sizes, name, extra.
      local = (0x04034B50, 45, 0, 0, 0, 0x21, crc, big, big, len(name), len(extra))
      f.write(struct.pack("<IHHHHHIIIHH", *local) + name + extra + body)
      f.truncate(f.tell() + hole)
      f.seek(0, os.SEEK_END)
      entries.append((name, crc, size, offset))
    directory = f.tell()
    for name, crc, size, offset in entries:
      extra = struct.pack("<HHQQQ", 1, 24, size, size, offset)
      # Central header: the local one's fields, then comment, disk, attributes, offset.
      central = (0x02014B50, 45, 45, 0, 0, 0, 0x21, crc, big, big, len(name), len(extra))
      f.write(struct.pack("<IHHHHHHIIIHHHHHII", *central, 0, 0, 0, 0, big) + name + extra)
    end, count = f.tell(), len(entries)
    zip64_end = (0x06064B50, 44, 45, 45, 0, 0, count, count, end - directory, directory)
    f.write(struct.pack("<IQHHIIQQQQ", *zip64_end))
    f.write(struct.pack("<IIQI", 0x07064B50, 0, end, 1))  # where the ZIP64 end record is
    f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, big, big, 0))


LIMIT_MB = 2048  # RLIMIT_DATA of the streamed run: a quarter of the pool


def test_a_streamed_campaign_runs_on_a_pool_four_times_its_memory_limit(tmp_path):
  root = tmp_path / "pool"
  root.mkdir()
  count = 4 * LIMIT_MB * 2**20 // (32 * 32 * 3)  # 8 GiB of images, as a sparse file
  _sparse_npy(root / "train_images.npy", (count, 32, 32, 3))
  np.save(root / "train_labels.npy", (np.arange(count) % 10).astype(np.int32))
  np.save(root / "test_images.npy", np.zeros((50, 32, 32, 3), np.uint8))
  np.save(root / "test_labels.npy", (np.arange(50) % 10).astype(np.int32))
  meta = {"class_names": [str(c) for c in range(10)], "mean": [0.5] * 3, "std": [0.25] * 3}
  (root / "meta.json").write_text(json.dumps(meta))
  script = os.path.join(os.path.dirname(__file__), "stream_memory_check.py")
  proc = run_cli(script, str(root), str(tmp_path / "w"), "stream", str(LIMIT_MB), module=None)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["completed"], report["error"]
  assert report["peak_rss_anon_mb"] < LIMIT_MB / 2, report  # bounded by the cache, not by N
  # The same images held in memory, as every other route does (an .npz here): under the same
  # limit the campaign cannot even load them. (The sparse .npz is a valid one: a small one
  # reads back, its CRCs checked.)
  _sparse_npz(tmp_path / "small.npz", {"x": (1000, 4, 4, 3), "y": np.arange(7)})
  with np.load(tmp_path / "small.npz") as small:
    assert not small["x"].any() and small["x"].shape == (1000, 4, 4, 3)
    np.testing.assert_array_equal(small["y"], np.arange(7))
  labels = {name: np.load(root / f"{name}.npy") for name in ("train_labels", "test_labels")}
  _sparse_npz(
    root / "pool.npz",
    {
      "x_train": (count, 32, 32, 3),
      "y_train": labels["train_labels"],
      "x_test": np.zeros((50, 32, 32, 3), np.uint8),
      "y_test": labels["test_labels"],
    },
  )
  proc = run_cli(
    script, str(root / "pool.npz"), str(tmp_path / "m"), "npz", str(LIMIT_MB), module=None
  )
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert not report["completed"] and "Unable to allocate 8.00 GiB" in report["error"], report


def test_each_process_takes_its_own_ids_in_its_block_of_every_chunk():
  # Three processes hold pool rows [0, 10), [10, 20), [20, 25); their devices take rows
  # [0, 4), [4, 6), [6, 8) of each chunk of 8.
  ids = np.array([24, 3, 11, 12, 0, 13, 14, 15, 21, 1])
  reads, positions, num_chunks = chunks.split_layout(
    ids, {0: (0, 10), 1: (10, 20), 2: (20, 25)}, {0: (0, 4), 1: (4, 6), 2: (6, 8)}
  )
  assert {p: r.tolist() for p, r in reads.items()} == {0: [1, 4, 9], 1: [2, 3, 5, 6, 7], 2: [0, 8]}
  # Process 1's five ids need three chunks of its two rows; the others fit in the first.
  assert num_chunks == 3
  assert positions.tolist() == [6, 0, 4, 5, 1, 12, 13, 20, 7, 2]
  with pytest.raises(ValueError, match=r"\[30\]"):
    chunks.split_layout(np.array([30]), {0: (0, 25)}, {0: (0, 8)})


def test_two_processes_read_only_their_own_rows_and_the_chunks_hold_every_id(tmp_path):
  # Two simulated processes hold pool rows [0, 12) and [12, 23), each in its own memory-mapped
  # file; their devices take rows [0, 3) and [3, 4) of each chunk of 4 (3 devices and 1).
  pool = np.arange(23 * 2 * 2 * 3, dtype=np.uint8).reshape(23, 2, 2, 3)
  pool_blocks, chunk_blocks = {0: (0, 12), 1: (12, 23)}, {0: (0, 3), 1: (3, 4)}
  ids = np.array([7, 22, 0, 5, 13, 8, 20, 19, 14])
  mesh = sharding.data_mesh(jax.devices()[:1])
  laid_out = np.full((5 * 4, 2, 2, 3), 255, np.uint8)
  for process, (first, end) in pool_blocks.items():
    np.save(tmp_path / f"{process}.npy", pool[first:end])
    local = np.load(tmp_path / f"{process}.npy", mmap_mode="r")
    split = chunks.SplitRows(local, first, ids, mesh, pool_blocks)
    blocks, positions, num_chunks = split.local_chunks(chunk_blocks, process)
    # Process 1's five ids need five chunks of its one row.
    assert num_chunks == 5
    low, high = chunk_blocks[process]
    for c, block in enumerate(blocks):
      laid_out[c * 4 + low : c * 4 + high] = block
  np.testing.assert_array_equal(laid_out[positions], pool[ids])
  # A process that holds other rows than the layout says refuses to read them.
  split = chunks.SplitRows(local, 0, ids, mesh, pool_blocks)
  with pytest.raises(ValueError, match=r"not among this process's rows \[0, 11\)"):
    split.local_chunks(chunk_blocks, 1)


def test_split_rows_come_back_in_the_order_of_their_ids(tmp_path):
  pool = np.arange(23 * 2 * 2 * 3, dtype=np.uint8).reshape(23, 2, 2, 3)
  np.save(tmp_path / "pool.npy", pool)
  memmapped = np.load(tmp_path / "pool.npy", mmap_mode="r")
  ids = np.array([7, 22, 0, 5, 5, 13, 8])
  mesh = sharding.data_mesh(jax.devices()[:1])
  split = chunks.SplitRows(memmapped, 0, ids, mesh, sharding.pool_blocks(mesh, len(pool)))
  sums = jax.jit(lambda x: (x.reshape(len(x), -1).astype(np.int32).sum(1), x[:, 0, 0, 0]))
  for chunk_size in (1, 3, 8):
    total, first = chunks.map_chunks(sums, split, chunk_size)
    np.testing.assert_array_equal(total, pool[ids].reshape(len(ids), -1).sum(1))
    np.testing.assert_array_equal(first, pool[ids, 0, 0, 0])
