"""Checkpoint-resume: kill the CLI anywhere, rerun the same command, get the same campaign."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO_ROOT
from conftest import campaign_outcome
from conftest import killable_env
from conftest import run_cli
from conftest import tiny_config

from lplgrad_jax import campaign
from lplgrad_jax import config_checks
from lplgrad_jax.errors import ConfigError

CLI_ARGS = [
  "--config=configs/digits.py",
  "--config.model.width=4",
  "--config.model.loss_head_width=8",
  "--config.train.epochs=6",
  "--config.train.batch_size=16",
  "--config.train.lr_milestones=(4,)",
  "--config.train.detach_features_epoch=3",
  "--config.al.initial_size=20",
  "--config.al.query_size=10",
  "--config.al.subset_size=40",
  "--config.al.num_rounds=3",
  "--config.query.chunk_size=20",
  "--config.checkpoint.every_epochs=2",
  "--config.log.progress=False",
]


def _run(workdir):
  proc = run_cli(*CLI_ARGS, f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _run_until(workdir, trigger: str, sig: int, delay: float = 0.0):
  """Starts the CLI and sends `sig` once a stdout line contains `trigger`."""
  proc = subprocess.Popen(
    [sys.executable, "-m", "lplgrad_jax.main", *CLI_ARGS, f"--workdir={workdir}"],
    cwd=REPO_ROOT,
    env=killable_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if trigger in line:
      time.sleep(delay)
      proc.send_signal(sig)
      break
  rest, _ = proc.communicate(timeout=600)
  assert any(trigger in line for line in seen), "".join(seen)
  return proc.returncode, "".join(seen) + rest


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  _run(workdir)
  return campaign_outcome(workdir)


@pytest.mark.parametrize(
  "trigger, delay",
  [
    # During the query of round 2. In training, test_faults kills at random times; these two
    # fixed points run with -m slow.
    ("round 2/3: querying", 0.0),
    pytest.param("checkpoint saved: round 2, epoch 2", 0.5, marks=pytest.mark.slow),
    pytest.param("checkpoint saved: round 1, epoch 4", 0.0, marks=pytest.mark.slow),
  ],
)
def test_kill_9_then_rerun_gives_the_same_results(trigger, delay, reference, tmp_path):
  returncode, _ = _run_until(tmp_path, trigger, signal.SIGKILL, delay)
  assert returncode == -signal.SIGKILL
  resumed = _run(tmp_path)
  assert "resuming from" in resumed.stdout
  assert campaign_outcome(tmp_path) == reference


def test_sigterm_saves_and_exits_cleanly(reference, tmp_path):
  returncode, output = _run_until(tmp_path, "checkpoint saved: round 2, epoch 4", signal.SIGTERM)
  assert returncode == 0
  assert "stopped by SIGTERM" in output and "rerun the same command to resume" in output
  assert os.listdir(tmp_path / "checkpoints")
  resumed = _run(tmp_path)
  assert "resuming from" in resumed.stdout
  assert campaign_outcome(tmp_path) == reference


def _copy_campaign(tiny_campaign, tmp_path):
  _, workdir, results = tiny_campaign
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  return str(copy), results


def _strip_times(results):
  return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in results["rounds"]]


def test_rerunning_a_finished_campaign_changes_nothing(tiny_campaign, tmp_path, capsys):
  workdir, results = _copy_campaign(tiny_campaign, tmp_path)
  again = campaign.run(tiny_config(), workdir)
  assert again["rounds"] == results["rounds"]
  assert "is complete (3 rounds): nothing to train" in capsys.readouterr().out


def _latest_step_dir(workdir):
  root = os.path.join(workdir, "checkpoints")
  return os.path.join(root, str(max(int(d) for d in os.listdir(root) if d.isdigit())))


def _truncate_array_files(step_dir):
  for parent, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(parent, name)
      if os.path.getsize(path) > 64:
        with open(path, "r+b") as f:
          f.truncate(16)


@pytest.mark.parametrize("damage", ["truncate", "remove_state_dir"])
def test_corrupt_latest_checkpoint_falls_back(damage, tiny_campaign, tmp_path, capsys):
  workdir, results = _copy_campaign(tiny_campaign, tmp_path)
  latest = _latest_step_dir(workdir)
  if damage == "truncate":
    _truncate_array_files(latest)
  else:
    shutil.rmtree(os.path.join(latest, "state"))
  again = campaign.run(tiny_config(), workdir)
  warnings = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(warnings) == 1 and "cannot be restored" in warnings[0]  # one line, no noise
  assert _strip_times(again) == _strip_times(results)  # the last round was trained again


def test_no_restorable_checkpoint_is_refused(tiny_campaign, tmp_path):
  workdir, _ = _copy_campaign(tiny_campaign, tmp_path)
  root = os.path.join(workdir, "checkpoints")
  for step in os.listdir(root):
    if step.isdigit():
      _truncate_array_files(os.path.join(root, step))
  steps = sorted(os.listdir(root))
  with pytest.raises(ConfigError, match="none was deleted.*--restart"):
    campaign.run(tiny_config(), workdir)
  assert sorted(os.listdir(root)) == steps  # nothing deleted: --restart is the user's call


def test_other_configuration_is_refused_unless_restart(tiny_campaign, tmp_path):
  workdir, _ = _copy_campaign(tiny_campaign, tmp_path)
  with pytest.raises(ConfigError, match=r"differing: model.width, strategy"):
    campaign.run(tiny_config(strategy="random", **{"model.width": 8}), workdir)
  fresh = campaign.run(
    tiny_config(strategy="random", **{"al.num_rounds": 2}), workdir, restart=True
  )
  assert len(fresh["rounds"]) == 2 and fresh["config"]["strategy"] == "random"


def test_a_campaign_of_an_earlier_version_resumes_and_a_changed_one_does_not():
  new = tiny_config(**{"data.normalization": "auto"}).to_dict()
  old = json.loads(json.dumps(new))  # as a checkpoint of the version before these keys held it
  for section, key in (
    ("model", "pretrained"),
    ("model", "train_mode"),
    ("train", "backbone_learning_rate"),
  ):
    del old[section][key]
  old["data"]["normalization"], old["train"]["reinit_each_round"] = "fixed", False
  config_checks.check_same_campaign("w", old, new)
  new["model"]["pretrained"] = "resnet18.safetensors"
  with pytest.raises(
    ConfigError,
    match=r"differing: data.normalization, model.pretrained, train.reinit_each_round\)",
  ):
    config_checks.check_same_campaign("w", old, new)


def test_a_save_killed_midway_leaves_nothing_that_a_resume_reports(tiny_campaign, tmp_path, caplog):
  workdir, _ = _copy_campaign(tiny_campaign, tmp_path)
  checkpoints = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(checkpoints) if n.isdigit()]
  unfinished = os.path.join(checkpoints, f"{max(steps) + 1}.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(unfinished, "state"))  # as a kill -9 during that save leaves it
  extended = campaign.run(tiny_config(**{"al.num_rounds": 4}), workdir)
  assert len(extended["rounds"]) == 4 and not os.path.exists(unfinished)
  assert "already exists" not in caplog.text  # Orbax had nothing to remove with a warning


def test_extending_num_rounds_continues_the_campaign(tiny_campaign, tmp_path):
  workdir, results = _copy_campaign(tiny_campaign, tmp_path)
  extended = campaign.run(tiny_config(**{"al.num_rounds": 4}), workdir)
  assert len(extended["rounds"]) == 4
  assert _strip_times(extended)[:2] == _strip_times(results)[:2]
  # The round that used to be last now also queries; the new round trains on the result.
  third = extended["rounds"][2]
  assert len(third["queried_ids"]) == 10
  assert set(extended["rounds"][3]["labeled_ids"]) == set(third["labeled_ids"]) | set(
    third["queried_ids"]
  )
  straight = campaign.run(tiny_config(**{"al.num_rounds": 4}), str(tmp_path / "straight"))
  assert _strip_times(extended) == _strip_times(straight)


def test_results_file_is_never_half_written(tiny_campaign):
  _, workdir, _ = tiny_campaign
  assert not [f for f in os.listdir(workdir) if f.endswith(".tmp")]
  np.testing.assert_equal(len(json.load(open(os.path.join(workdir, "results.json")))["rounds"]), 3)
