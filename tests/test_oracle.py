"""The human oracle's files (query CSV, contact sheet, filled-in labels) and the labeling folder."""

import os
import shutil

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from lplgrad_jax import data
from lplgrad_jax import query_files
from lplgrad_jax.errors import ConfigError
from lplgrad_jax.query_files import LabelFileError

CLASSES = ("cat", "dog")
RED, GREEN, BLUE, PURPLE = (200, 30, 30), (30, 200, 30), (30, 30, 200), (123, 45, 167)


def _flat(color, size=8):
  return np.full((size, size, 3), color, np.uint8)


def _color_count(image: Image.Image, color) -> int:
  return int(np.all(np.asarray(image) == color, axis=-1).sum())


def test_write_query_csv_and_contact_sheet(tmp_path):
  original = tmp_path / "photo.png"  # the sheet shows the original file, not the pool copy
  Image.fromarray(_flat(BLUE, 40)).save(original)
  ids, files = [17, 3, 40], [str(original), "/gone/3.png", "/gone/40.png"]
  images = [_flat(PURPLE), _flat(RED), _flat(GREEN)]
  csv_path, png_path = query_files.write_query(
    str(tmp_path), 2, ids, files, np.array([2.5, 0.125, 1e-7]), images, CLASSES
  )
  assert (
    csv_path
    == query_files.query_csv_path(str(tmp_path), 2)
    == str(tmp_path / "queries" / "round_2.csv")
  )
  assert (
    png_path
    == query_files.contact_sheet_path(str(tmp_path), 2)
    == str(tmp_path / "queries" / "round_2.png")
  )
  with open(csv_path, encoding="utf-8") as f:
    assert f.read() == (
      f"id,file,score,label\n17,{original},2.5,\n3,/gone/3.png,0.125,\n40,/gone/40.png,1e-07,\n"
    )
  sheet = Image.open(png_path)
  assert sheet.width == query_files.PAD + 3 * (query_files.THUMB + query_files.PAD)
  assert sheet.height > query_files.THUMB + query_files.CAPTION + query_files.PAD
  thumb_area = query_files.THUMB * query_files.THUMB
  for color in (BLUE, RED, GREEN):  # each image enlarged, whole, exactly once
    assert _color_count(sheet, color) == thumb_area
  assert _color_count(sheet, PURPLE) == 0
  assert sorted(os.listdir(tmp_path / "queries")) == ["round_2.csv", "round_2.png"]  # no temp files


def test_write_query_without_scores_wraps_rows(tmp_path):
  csv_path, png_path = query_files.write_query(
    str(tmp_path),
    1,
    list(range(12)),
    [f"/gone/{i}.png" for i in range(12)],
    None,
    [_flat(RED)] * 12,
    CLASSES,
  )
  with open(csv_path) as f:
    lines = f.read().splitlines()
  assert lines[1] == "0,/gone/0.png,," and len(lines) == 13
  sheet = Image.open(png_path)
  assert sheet.width == query_files.PAD + query_files.COLUMNS_PER_ROW * (
    query_files.THUMB + query_files.PAD
  )
  assert sheet.height > 2 * (query_files.THUMB + query_files.CAPTION + query_files.PAD)
  assert _color_count(sheet, RED) == 12 * query_files.THUMB * query_files.THUMB


def _write(path, text: str, encoding="utf-8") -> str:
  with open(path, "w", encoding=encoding, newline="") as f:
    f.write(text)
  return str(path)


def test_read_labels_accepts_spreadsheet_output(tmp_path):
  # Excel: byte-order mark, CRLF, an added column; names with other case and spaces.
  path = _write(
    tmp_path / "round_1.csv",
    "id,file,score,label,notes\r\n17,a.png,0.5, DOG ,sure\r\n\r\n"
    "3,b.png,0.2,skip,\r\n40,c.png,0.1,Cat,\r\n",
    encoding="utf-8-sig",
  )
  assert query_files.read_labels(path, [17, 3, 40], CLASSES) == {17: 1, 3: None, 40: 0}
  # Locales whose list separator is ";", columns reordered.
  path = _write(tmp_path / "round_2.csv", "label;id\ncat;5\nSKIP;6\n")
  assert query_files.read_labels(path, [5, 6], CLASSES) == {5: 0, 6: None}


def test_read_labels_case_folding_only_when_unambiguous(tmp_path):
  path = _write(tmp_path / "round_1.csv", "id,label\n1,Cat\n2,cat\n3,CAT\n")
  with pytest.raises(LabelFileError) as e:
    query_files.read_labels(path, [1, 2, 3], ("Cat", "cat"))
  assert e.value.problems == [
    "round_1.csv line 4: unknown label 'CAT' for id 3: expected one of Cat, cat, skip"
  ]


def test_read_labels_reports_every_bad_row(tmp_path):
  path = _write(
    tmp_path / "round_2.csv",
    "id,file,score,label\n"
    "17,a.png,0.9,dgo\n"  # line 2
    "3,b.png,0.8,\n"  # line 3
    "\n"  # line 4: blank lines are passed over
    "17,a.png,0.9,cat\n"  # line 5
    "99,z.png,,cat\n"  # line 6
    "x1,q.png,,dog\n"  # line 7
    "41,d.png,0.5,dog\n",
  )  # line 8: fine
  with pytest.raises(LabelFileError) as e:
    query_files.read_labels(path, [17, 3, 40, 41, 42], CLASSES)
  assert e.value.problems == [
    "round_2.csv line 2: unknown label 'dgo' for id 17: expected one of cat, dog, skip",
    "round_2.csv line 3: blank label for id 3: expected one of cat, dog, skip",
    "round_2.csv line 5: id 17 is listed again (first on line 2)",
    "round_2.csv line 6: id 99 is not one of this query's images",
    "round_2.csv line 7: id 'x1' is not an integer: expected an id of this query",
    "round_2.csv: 2 ids of this query missing from the file (40, 42): put their rows back",
  ]
  lines = str(e.value).splitlines()
  assert lines[0] == f"{path}: 6 problems in the labels; fix and rerun"
  assert lines[1:] == e.value.problems
  assert isinstance(e.value, ConfigError)  # the CLI reports it and exits 2


def test_read_labels_file_problems(tmp_path):
  with pytest.raises(ConfigError, match=r"round_3\.csv is missing: .*label column filled in"):
    query_files.read_labels(str(tmp_path / "round_3.csv"), [1], CLASSES)
  path = _write(tmp_path / "round_1.csv", "id,file,score\n1,a.png,0.5\n")
  with pytest.raises(LabelFileError) as e:
    query_files.read_labels(path, [1], CLASSES)
  assert e.value.problems == [
    "round_1.csv line 1: no label column: expected the header id,file,score,label"
  ]
  path = _write(tmp_path / "latin.csv", "id,label\n1,caf\xe9\n", encoding="latin-1")
  with pytest.raises(ConfigError, match="is not UTF-8 text"):
    query_files.read_labels(path, [1], CLASSES)


def test_set_label_changes_one_row_and_keeps_the_format(tmp_path):
  # Reordered columns, an extra one, ";" and a blank line, as a spreadsheet may leave them.
  path = _write(
    tmp_path / "round_1.csv", "label;id;note;file\n;17;blurry;/p/17.png\n\ndog;3;;/p/3.png\n"
  )
  query_files.set_label(path, 17, "cat")
  query_files.set_label(path, 3, "")  # cleared
  query_files.set_label(path, 40, "skip", file="/p/40.png")  # its row was deleted: appended
  with open(path, encoding="utf-8") as f:
    assert f.read() == (
      "label;id;note;file\ncat;17;blurry;/p/17.png\n\n;3;;/p/3.png\nskip;40;;/p/40.png\n"
    )
  assert query_files.query_rows(path) == [
    query_files.QueryRow(17, "/p/17.png", "cat"),
    query_files.QueryRow(3, "/p/3.png", ""),
    query_files.QueryRow(40, "/p/40.png", "skip"),
  ]
  query_files.set_label(path, 3, "Dog")
  assert query_files.read_labels(path, [17, 3, 40], CLASSES) == {17: 0, 3: 1, 40: None}
  with pytest.raises(ConfigError, match="no id column"):
    query_files.set_label(_write(tmp_path / "bad.csv", "file,label\nx,\n"), 1, "cat")


def _labeling_folder(root, test=False):
  """Pool files whose names are their expected ids; pixel value 20 * id marks each image."""
  files = {
    "labeled/dog/00001.png": 1,
    "labeled/cat/00003.png": 3,
    "labeled/cat/x/00005.jpg": 5,
    "unlabeled/00000.png": 0,
    "unlabeled/00002.png": 2,
    "unlabeled/2024/00004.png": 4,
  }
  for name, i in files.items():
    os.makedirs(os.path.dirname(root / name), exist_ok=True)
    if name.endswith(".jpg"):  # grayscale JPEG of another size
      Image.fromarray(np.full((20, 14), 20 * i, np.uint8), "L").save(root / name, quality=100)
    else:
      Image.fromarray(_flat(20 * i, 9)).save(root / name)
  (root / "unlabeled" / "notes.txt").write_text("not an image")
  (root / "unlabeled" / "._00000.png").write_bytes(b"macOS metadata")  # hidden: passed over
  if test:
    os.makedirs(root / "test" / "dog")
    Image.fromarray(_flat(7, 9)).save(root / "test" / "dog" / "t.png")
  return root


def _load(root, image_size=8):
  config = tiny_config()
  config.data.root = str(root)
  config.data.image_size = image_size
  config.data.name = ""
  return data.load_labeling_folder(config.data)


def test_labeling_folder_ids_follow_file_names(tmp_path):
  root = _labeling_folder(tmp_path / "photos")
  ds = _load(root)
  assert ds.name == "photos" and ds.class_names == CLASSES
  assert ds.x_train.shape == (6, 8, 8, 3) and ds.x_train.dtype == np.uint8
  np.testing.assert_array_equal(ds.y_train, [-1, 1, -1, 0, -1, 0])
  np.testing.assert_array_equal(ds.seed_ids, [1, 3, 5])
  assert [os.path.basename(f) for f in ds.train_files] == [
    "00000.png",
    "00001.png",
    "00002.png",
    "00003.png",
    "00004.png",
    "00005.jpg",
  ]
  assert all(os.path.isabs(f) and os.path.isfile(f) for f in ds.train_files)
  np.testing.assert_allclose(ds.x_train.reshape(6, -1).mean(1), 20 * np.arange(6), atol=1)
  assert ds.x_test.shape == (0, 8, 8, 3) and ds.x_test.dtype == np.uint8
  assert ds.y_test.shape == (0,) and ds.y_test.dtype == np.int32


def test_an_empty_labeled_class_folder_still_names_a_class(tmp_path):
  root = _labeling_folder(tmp_path)
  os.makedirs(root / "labeled" / "eel")  # no seed images of eels yet
  ds = _load(root)
  assert ds.class_names == ("cat", "dog", "eel")
  np.testing.assert_array_equal(ds.seed_ids, [1, 3, 5])


def test_labeling_folder_with_test_split(tmp_path):
  ds = _load(_labeling_folder(tmp_path, test=True))
  assert ds.x_test.shape == (1, 8, 8, 3)
  np.testing.assert_array_equal(ds.y_test, [1])  # dog: the index among labeled/'s classes
  np.testing.assert_array_equal(ds.x_test[0], _flat(7))


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda r: r / "absent", r"data.root=.*absent' is not a directory"),
    (lambda r: os.rename(r / "labeled", r / "seed"), r"labeled is missing: expected labeled/"),
    (lambda r: os.rename(r / "unlabeled", r / "pool"), r"unlabeled is missing"),
    (
      lambda r: [os.rename(r / "labeled" / c, r / "unlabeled" / c) for c in CLASSES],
      r"labeled has no labeled images",
    ),
    (
      lambda r: [
        shutil.rmtree(r / "labeled" / c) or os.makedirs(r / "labeled" / c) for c in CLASSES
      ],
      r"labeled has no labeled images",
    ),
    (lambda r: os.makedirs(r / "test" / "eel"), r"class folder .*test/eel holds no images"),
    (
      lambda r: (r / "labeled" / "dog" / "bad.png").write_bytes(b"not an image"),
      r"cannot read image .*labeled/dog/bad.png",
    ),
    (
      lambda r: Image.fromarray(_flat(0)).save(r / "labeled" / "stray.png"),
      r"labeled/stray.png is not in a class folder",
    ),
    (
      lambda r: os.rename(r / "labeled" / "dog", r / "labeled" / "Skip"),
      r"labeled/Skip clashes with the label 'skip'",
    ),
    (
      lambda r: os.rename(r / "test" / "dog", r / "test" / "eel"),
      r"test class folder .*test/eel is not a class of .*labeled: "
      r"expected test classes among cat, dog",
    ),
    (
      lambda r: os.rename(r / "test" / "dog", r / "unlabeled" / "dog"),
      r"test has no class folders",
    ),
  ],
)
def test_labeling_folder_errors(tmp_path, change, message):
  root = _labeling_folder(tmp_path, test=True)
  moved = change(root)
  with pytest.raises(ConfigError, match=message):
    _load(moved if isinstance(moved, os.PathLike) else root)
