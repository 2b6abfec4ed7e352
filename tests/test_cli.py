"""The command line, as a user runs it: a real subprocess from the repo root."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def _run_cli(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-m", "lplgrad_jax.main", *args], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_campaign_on_digits_learns(tmp_path):
  workdir = tmp_path / "demo"
  proc = _run_cli("--config=configs/digits.py", f"--workdir={workdir}",
                  "--config.model.width=8", "--config.train.epochs=10",
                  "--config.train.lr_milestones=(8,)", "--config.train.detach_features_epoch=6",
                  "--config.al.num_rounds=3", "--config.al.subset_size=150",
                  "--config.log.progress=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  accuracies = [r["test_accuracy"] for r in results["rounds"]]
  assert [r["num_labeled"] for r in results["rounds"]] == [50, 100, 150]
  assert accuracies[-1] > max(0.35, accuracies[0])  # 10 classes: chance is 0.1
  assert "round 3/3" in proc.stdout and "test acc" in proc.stdout  # progress and summary table
  assert (workdir / "accuracy.png").exists()
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))


@pytest.mark.parametrize("args, message", [
    (["--config=configs/digits.py", "--config.strategy=bald"], "unknown strategy 'bald'"),
    (["--config=configs/digits.py", "--config.data.source=csv"], "unknown data source 'csv'"),
    (["--config=configs/digits.py", "--config.al.initial_size=99999"], "exceeds the pool"),
    (["--config=configs/digits.py", "--config.al.subset_size=10"], "is smaller than al.query_size"),
    (["--config=configs/cdd.py", "--config.data.root=/nonexistent/cdd"], "is not a directory"),
    (["--config=configs/cifar10.py", "--config.data.data_dir=/nonexistent/tfds"], "does not exist"),
    (["--config=configs/cifar10.py:medium"], "unknown budget 'medium'"),
    (["--config=configs/digits.py", "--config.nonsense=1"], "unknown configuration key 'nonsense'"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
  proc = _run_cli(*args, f"--workdir={tmp_path / 'w'}", timeout=120)
  assert proc.returncode == 2
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
