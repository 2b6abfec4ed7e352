"""The predictor: the newest model of a finished campaign classifies image files."""

import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

from lplgrad_jax import data
from lplgrad_jax import predict
from lplgrad_jax.errors import ConfigError


@pytest.fixture(scope="module")
def digits_files(tiny_campaign, tmp_path_factory):
  """(folder, {file: label}): the campaign's test images as PNGs, plus a corrupt and a text file."""
  config, _, _ = tiny_campaign
  dataset = data.load_dataset(config.data)
  folder = tmp_path_factory.mktemp("new_images")
  labels = {}
  for k, (image, label) in enumerate(zip(dataset.x_test, dataset.y_test)):
    path = folder / "digits" / f"{k:04d}.png"
    os.makedirs(path.parent, exist_ok=True)
    Image.fromarray(image).save(path)
    labels[str(path)] = dataset.class_names[label]
  (folder / "digits" / "bad.png").write_bytes(b"not an image")
  (folder / "readme.txt").write_text("not an image either")
  return folder, labels


def _accuracy(rows, labels) -> float:
  return float(np.mean([labels[file] == name for file, name, _ in rows]))


def test_predict_reproduces_the_campaigns_evaluation(tiny_campaign, digits_files, capsys):
  config, workdir, results = tiny_campaign
  folder, labels = digits_files
  paths = predict.image_paths(str(folder))
  assert paths == sorted(labels) + [str(folder / "digits" / "bad.png")]  # readme.txt: no suffix
  rows = predict.predict(workdir, paths, batch_size=config.train.eval_batch_size)
  warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
  assert len(warnings) == 1 and warnings[0].startswith(
    f"warning: cannot read image {folder / 'digits' / 'bad.png'}: "
  )
  assert warnings[0].endswith("; skipped")
  assert [file for file, _, _ in rows] == sorted(labels)
  assert all(1 / 10 <= confidence <= 1 for _, _, confidence in rows)
  # The newest checkpoint is the final model; the PNGs hold the test images
  # exactly; same batch size, so the same compiled computation as the campaign's.
  assert _accuracy(rows, labels) == results["rounds"][-1]["test_accuracy"]


def test_predict_refuses_when_nothing_is_readable(tiny_campaign, digits_files):
  _, workdir, _ = tiny_campaign
  folder, _ = digits_files
  with pytest.raises(ConfigError, match="none of the 2 files is an image that can be read"):
    predict.predict(workdir, [str(folder / "digits" / "bad.png"), str(folder / "readme.txt")])


def _run_predict(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run(
    [sys.executable, "-m", "lplgrad_jax.predict", *args],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_cli_writes_predictions(tiny_campaign, digits_files, tmp_path):
  config, workdir, results = tiny_campaign
  folder, labels = digits_files
  out = tmp_path / "out" / "predictions.csv"
  proc = _run_predict(
    f"--workdir={workdir}",
    f"--images={folder}",
    f"--out={out}",
    f"--batch_size={config.train.eval_batch_size}",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"{len(labels)} of {len(labels) + 1} files classified" in proc.stdout
  assert f"cannot read image {folder / 'digits' / 'bad.png'}" in proc.stderr
  with open(out, newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["file", "class", "confidence"] and len(rows) == len(labels) + 1
  assert (
    _accuracy([(file, name, float(c)) for file, name, c in rows[1:]], labels)
    == results["rounds"][-1]["test_accuracy"]
  )


def test_cli_bad_input_is_one_line_and_exit_2(tiny_campaign, digits_files, tmp_path):
  _, workdir, _ = tiny_campaign
  folder, _ = digits_files
  no_checkpoint = tmp_path / "copied"
  os.makedirs(no_checkpoint)
  shutil.copy(os.path.join(workdir, "results.json"), no_checkpoint)
  cases = [
    ([f"--workdir={tmp_path / 'absent'}", f"--images={folder}"], "results.json is missing"),
    ([f"--workdir={no_checkpoint}", f"--images={folder}"], "holds no checkpoint"),
    ([f"--workdir={workdir}", f"--images={tmp_path / 'nope'}"], "nope does not exist"),
  ]
  for args, message in cases:
    proc = _run_predict(*args)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
  assert os.listdir(no_checkpoint) == ["results.json"]  # nothing created
  assert not os.path.exists(os.path.join(workdir, predict.PREDICTIONS_FILE))
