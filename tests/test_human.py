"""The human oracle end to end: a test plays the person, filling each query file with labels."""

import csv
import os
import shutil

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from lplgrad_jax import campaign
from lplgrad_jax import errors
from lplgrad_jax import query_files
from lplgrad_jax import seeds
from lplgrad_jax.data import load_digits
from lplgrad_jax.errors import ConfigError


def _write_png(path, image):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image).save(path)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
  """The digits pool as a labeling folder: the simulated campaign's seed set in labeled/,
  the rest in unlabeled/ (file names = pool ids, so ids match), the test split in test/."""
  config = tiny_config()
  digits = load_digits(config.data)
  root = tmp_path_factory.mktemp("photos")
  for name in digits.class_names:  # a class may have no seed image yet
    os.makedirs(root / "labeled" / name)
  seed = set(
    seeds.initial_labeled_set(config.seed, digits.num_train, config.al.initial_size).tolist()
  )
  for i, (image, label) in enumerate(zip(digits.x_train, digits.y_train)):
    where = f"labeled/{label}" if i in seed else "unlabeled"
    _write_png(str(root / where / f"{i:05d}.png"), image)
  for i, (image, label) in enumerate(zip(digits.x_test, digits.y_test)):
    _write_png(str(root / "test" / str(label) / f"t{i:05d}.png"), image)
  return str(root), digits


def _human_config(root, **overrides):
  return tiny_config(
    **{"oracle": "human", "data.source": "image_folder", "data.root": root, **overrides}
  )


def _fill(csv_path, label_of):
  """Writes each row's label as `label_of(id)` returns it (what the person does)."""
  with open(csv_path, newline="") as f:
    rows = list(csv.DictReader(f))
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
      writer.writerow({**row, "label": label_of(int(row["id"]))})
  return rows


def test_human_loop_equals_the_simulated_campaign(photo_folder, tiny_campaign, tmp_path, capsys):
  root, digits = photo_folder
  _, _, simulated = tiny_campaign
  workdir = str(tmp_path / "human")
  config = _human_config(root)
  for round_number in (1, 2):
    results = campaign.run(config, workdir)
    csv_path = query_files.query_csv_path(workdir, round_number)
    assert results["awaiting_labels"] == csv_path
    assert os.path.exists(query_files.contact_sheet_path(workdir, round_number))
    out = capsys.readouterr().out
    assert f"label column of every row of {csv_path}" in out and "rerun the same command" in out
    rows = _fill(csv_path, lambda i: str(digits.y_train[i]))
    expected = simulated["rounds"][round_number - 1]["queried_ids"]
    assert [int(r["id"]) for r in rows] == expected  # best score first, as the simulation
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert rows[0]["file"].endswith(f"{expected[0]:05d}.png")
  human = campaign.run(config, workdir)
  assert "awaiting_labels" not in human
  assert "read 10 labels and 0 skips" in capsys.readouterr().out
  for h, s in zip(human["rounds"], simulated["rounds"], strict=True):
    for key in ("num_labeled", "labeled_ids", "queried_ids", "test_accuracy", "per_class_accuracy"):
      assert h[key] == s[key], key


def test_bad_labels_change_nothing_then_skips_leave_the_pool(photo_folder, tmp_path, capsys):
  root, digits = photo_folder
  workdir = str(tmp_path / "human")
  config = _human_config(root, **{"al.num_rounds": 2})
  campaign.run(config, workdir)
  csv_path = query_files.query_csv_path(workdir, 1)
  queried = [int(r["id"]) for r in _fill(csv_path, lambda i: "seven")]
  checkpoints = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(query_files.LabelFileError) as error:
    campaign.run(config, workdir)
  assert len(error.value.problems) == len(queried)  # one line per bad row
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == checkpoints
  with pytest.raises(SystemExit) as exit_info:  # the command line prints every line
    errors.exit_with(error.value)
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 + len(queried) and all(line.startswith("error: ") for line in lines)
  assert "unknown label 'seven'" in lines[1]

  skipped = queried[:2]
  _fill(csv_path, lambda i: query_files.SKIP if i in skipped else str(digits.y_train[i]))
  results = campaign.run(config, workdir)
  first, second = results["rounds"]
  assert second["num_labeled"] == first["num_labeled"] + len(queried) - len(skipped)
  assert set(second["labeled_ids"]) == set(first["labeled_ids"]) | (set(queried) - set(skipped))
  assert first["skipped_ids"] == skipped

  # Extended by a round: the skipped images are never queried again.
  extended = campaign.run(_human_config(root, **{"al.num_rounds": 3}), workdir)
  new_query = extended["rounds"][1]["queried_ids"]
  assert new_query and not set(new_query) & (set(skipped) | set(second["labeled_ids"]))


def test_human_oracle_needs_an_image_folder(tmp_path):
  with pytest.raises(ConfigError, match="oracle 'human' reads an image folder"):
    campaign.run(tiny_config(oracle="human"), str(tmp_path / "w"))
  with pytest.raises(ConfigError, match="unknown oracle 'crowd'"):
    campaign.run(tiny_config(oracle="crowd"), str(tmp_path / "w"))


def test_without_a_test_folder_rounds_have_no_accuracy(photo_folder, tmp_path):
  root, digits = photo_folder
  no_test = tmp_path / "no_test"
  os.makedirs(no_test)
  for part in ("labeled", "unlabeled"):
    os.symlink(os.path.join(root, part), no_test / part)
  config = _human_config(str(no_test), **{"al.num_rounds": 1})
  results = campaign.run(config, str(tmp_path / "w"))
  assert results["rounds"][0]["test_accuracy"] is None
  assert np.all(np.isfinite(results["data"]["normalization"]["mean"]))


def test_filled_labels_survive_a_restart_and_a_changed_folder_is_refused(photo_folder, tmp_path):
  root, digits = photo_folder
  copy = tmp_path / "photos"
  shutil.copytree(root, copy)
  workdir = str(tmp_path / "w")
  config = _human_config(str(copy), **{"al.num_rounds": 2})
  campaign.run(config, workdir)
  csv_path = query_files.query_csv_path(workdir, 1)
  _fill(csv_path, lambda i: str(digits.y_train[i]))
  filled = open(csv_path).read()
  # --restart repeats the same query: the person's labels are kept, not blanked.
  results = campaign.run(config, workdir, restart=True)
  assert results["awaiting_labels"] == csv_path and open(csv_path).read() == filled
  # A photo added to the folder would shift every later id: refused, nothing changed.
  photo = sorted(os.listdir(copy / "unlabeled"))[0]
  extra = copy / "unlabeled" / f"{photo[:-4]}b.png"
  shutil.copy(copy / "unlabeled" / photo, extra)
  with pytest.raises(ConfigError, match=f"{extra.name} was added; 1 added, 0 removed"):
    campaign.run(config, workdir)
  os.remove(extra)
  assert len(campaign.run(config, workdir)["rounds"]) == 2
