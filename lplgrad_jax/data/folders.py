"""Sources that are folders of image files: a train/test image folder, and the human oracle's
labeling folder (labeled seed images, unlabeled photos, an optional test set)."""

from __future__ import annotations

import os

import numpy as np

from lplgrad_jax.data.dataset import Dataset
from lplgrad_jax.data.dataset import RowRange
from lplgrad_jax.data.npy_folder import Split
from lplgrad_jax.errors import ConfigError
from lplgrad_jax.query_files import SKIP

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


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


def _labeled_files(split_dir: str, class_names: list[str]) -> list[tuple[str, int]]:
  """(path, label) of every image of `split_dir/<class>/`, in id order."""
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
  return files


def _read_image_folder(
  split_dir: str, class_names: list[str], size: int, rows: RowRange | None = None
):
  """(images, labels, number of files, first row read): the files of rows `rows(N)` alone."""
  files = _labeled_files(split_dir, class_names)
  start, end = rows(len(files)) if rows is not None else (0, len(files))
  images = [read_image(path, size) for path, _ in files[start:end]]
  shape = (0, size, size, 3)
  return (
    np.stack(images) if images else np.zeros(shape, np.uint8),
    np.asarray([label for _, label in files[start:end]], np.int32),
    len(files),
    start,
  )


def _image_folder_layout(data_config) -> tuple[str, str, str, list[str]]:
  """(root, train folder, test folder, class names) of `data.root`, checked."""
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
  return root, train_dir, test_dir, classes


def load_image_folder(data_config, rows: RowRange | None = None) -> Dataset:
  """`root/train/<class>/*` and `root/test/<class>/*`, RGB, resized to image_size."""
  root, train_dir, test_dir, classes = _image_folder_layout(data_config)
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


def image_folder_splits(data_config) -> tuple[str, tuple[str, ...], dict[str, Split]]:
  """(name, class names, {"train", "test": Split}) of an image folder, read a chunk at a time
  (the converter: a folder larger than memory)."""
  root, train_dir, test_dir, classes = _image_folder_layout(data_config)
  size = data_config.image_size

  def split(split_dir: str) -> Split:
    files = _labeled_files(split_dir, classes)

    def chunks(n):
      for start in range(0, len(files), n):
        part = files[start : start + n]
        yield (
          np.stack([read_image(path, size) for path, _ in part]),
          np.asarray([label for _, label in part], np.int32),
        )

    return Split(len(files), chunks)

  name = data_config.get("name") or os.path.basename(os.path.normpath(root))
  return name, tuple(classes), {"train": split(train_dir), "test": split(test_dir)}


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
