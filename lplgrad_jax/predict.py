"""Classifies new images with the newest model of a campaign.

  python -m lplgrad_jax.predict --workdir=runs/mine --images=new_photos/ [--out=preds.csv]

Writes `file,class,confidence` (confidence: the softmax probability of the
predicted class) for every readable image; unreadable files are reported and
passed over. Images are prepared as the campaign prepared its pool (RGB,
resized to its image size, normalized with its channel statistics), all of
which, with the model's configuration, results.json records.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import ml_collections
import numpy as np
from absl import flags
from flax import nnx

from lplgrad_jax import cli
from lplgrad_jax import errors
from lplgrad_jax import linear_probe
from lplgrad_jax import models
from lplgrad_jax import query
from lplgrad_jax import reporting
from lplgrad_jax import train
from lplgrad_jax.checkpoint import Checkpointer
from lplgrad_jax.data import IMAGE_SUFFIXES
from lplgrad_jax.data import image_files
from lplgrad_jax.data import read_image
from lplgrad_jax.errors import ConfigError

PREDICTIONS_FILE = "predictions.csv"


@dataclasses.dataclass(frozen=True)
class Model:
  learner: models.ActiveLearner
  class_names: tuple[str, ...]
  image_size: int
  normalization: tuple[np.ndarray, np.ndarray]  # per-channel mean and std, [0, 1] units
  rounds_trained: int  # rounds finished before the checkpoint (later training may be partial)


def load_model(workdir: str) -> Model:
  """The learner of the newest checkpoint in `workdir`, and how to feed it images."""
  results = reporting.read_results(
    workdir,
    lambda r: (
      r["config"]["checkpoint"]["keep"],
      r["config"]["model"],
      r["use_aux"],
      [r["data"][k] for k in ("class_names", "image_size", "normalization")],
    ),
  )
  config, data = results["config"], results["data"]
  class_names = tuple(data["class_names"])
  image_size = int(data["image_size"])
  normalization = tuple(np.asarray(data["normalization"][k], np.float32) for k in ("mean", "std"))
  use_aux, keep = bool(results["use_aux"]), config["checkpoint"]["keep"]
  checkpointer = Checkpointer(workdir, keep=keep)
  if not checkpointer.exists():
    raise ConfigError(
      f"{checkpointer.directory} holds no checkpoint: expected the workdir of "
      "a campaign that has trained at least one round"
    )
  # The restore target: same structure as the saved state. max_labeled only
  # sizes training buffers, which prediction has none of.
  model_config = ml_collections.ConfigDict(config["model"])
  linear = model_config.get("train_mode") == "linear"
  if not linear:  # the checkpoint holds every weight: the pretrained file is not needed
    model_config.pretrained = ""
  learner = models.create_learner(
    model_config, len(class_names), use_aux=use_aux, key=jax.random.key(0), image_size=image_size
  )
  # Linear mode saved the probe alone; its head is the learner's, which then classifies images
  # with the pretrained backbone.
  trained = linear_probe.probe_of(learner) if linear else learner
  step_config = train.StepConfig.from_config(
    ml_collections.ConfigDict(config["train"]), max_labeled=1, use_aux=use_aux
  )
  _, state = train.create_train_state(trained, step_config)
  try:
    state, position = checkpointer.restore(state, delete_corrupt=False)
  finally:
    checkpointer.close()
  nnx.update(trained, state.params, state.batch_stats)
  return Model(learner, class_names, image_size, normalization, len(position["rounds"]))


def image_paths(path: str) -> list[str]:
  """`path` itself if it is a file (whatever its suffix: the user named it), else the
  images under the folder, recursively, sorted."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise ConfigError(
      f"--images={path} does not exist: expected an image file or a folder of images"
    )
  paths = [os.path.join(path, f) for f in image_files(path)]
  if not paths:
    raise ConfigError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
  return paths


def classify(model: Model, paths: list[str], batch_size: int) -> list[tuple[str, str, float]]:
  """(file, class name, confidence) per readable image of `paths`, in order.

  An unreadable file gets a warning on stderr and no row, so that one bad
  file does not cost the predictions of a whole folder; ConfigError if no file
  is readable. Files are read `batch_size` at a time, so memory does not grow
  with the folder.
  """
  batch_size = max(1, min(batch_size, len(paths)))  # one compiled shape, no needless padding
  rows = []
  for start in range(0, len(paths), batch_size):
    files, images = [], []
    for path in paths[start : start + batch_size]:
      try:
        images.append(read_image(path, model.image_size))
        files.append(path)
      except ConfigError as e:
        print(f"warning: {e}; skipped", file=sys.stderr, flush=True)
    if not images:
      continue
    logits = query.model_outputs(model.learner, np.stack(images), model.normalization, batch_size)[
      "logits"
    ]
    probabilities = np.asarray(jax.nn.softmax(logits, axis=-1))
    for file, p in zip(files, probabilities):
      k = int(np.argmax(p))
      rows.append((file, model.class_names[k], float(p[k])))
  if not rows:
    raise ConfigError(f"none of the {len(paths)} files is an image that can be read")
  return rows


def predict(workdir: str, paths: list[str], batch_size: int = 256) -> list[tuple[str, str, float]]:
  """(file, class name, confidence) of each readable image of `paths`, by `workdir`'s
  newest model."""
  return classify(load_model(workdir), paths, batch_size)


def write_predictions(path: str, rows: list[tuple[str, str, float]]) -> None:
  reporting.write_csv(
    path,
    ("file", "class", "confidence"),
    [(file, name, f"{confidence:.4f}") for file, name, confidence in rows],
  )


def _define_flags() -> None:
  """Defined only when run as a program: `lplgrad_jax.main` defines --workdir as well, and
  importing this module for `predict()` must not clash with it."""
  flags.DEFINE_string(
    "workdir",
    None,
    "Workdir of a campaign (holds results.json and checkpoints/); its newest checkpoint is used.",
  )
  flags.DEFINE_string(
    "images",
    None,
    f"An image file, or a folder searched recursively for images ({', '.join(IMAGE_SUFFIXES)}).",
  )
  flags.DEFINE_string("out", None, f"CSV to write (default: WORKDIR/{PREDICTIONS_FILE}).")
  flags.DEFINE_integer("batch_size", 256, "Images read and classified at a time.", lower_bound=1)
  flags.mark_flags_as_required(["workdir", "images"])


def main(argv):
  cli.start(argv)
  workdir = flags.FLAGS.workdir
  out = flags.FLAGS.out or os.path.join(workdir, PREDICTIONS_FILE)
  try:
    paths = image_paths(flags.FLAGS.images)
    model = load_model(workdir)
    rows = classify(model, paths, flags.FLAGS.batch_size)
    write_predictions(out, rows)
  except ConfigError as e:
    errors.exit_with(e)
  print(
    f"{len(rows)} of {len(paths)} files classified by the model after "
    f"{model.rounds_trained} trained round(s): {out}"
  )


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
