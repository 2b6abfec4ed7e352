"""The reproduction harness: sweep runner and aggregator."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT
from conftest import cli_env
from conftest import run_cli

sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))
import aggregate  # noqa: E402
import recipes  # noqa: E402
import sweep  # noqa: E402
import sweep_common  # noqa: E402


def _write_run(root, budget, strategy, seed, accuracies, use_aux=None, num_rounds=None):
  workdir = os.path.join(root, budget, strategy, f"seed{seed}")
  os.makedirs(workdir)
  rounds = [
    {
      "round": i,
      "num_labeled": 100 * (i + 1),
      "test_accuracy": a,
      "per_class_accuracy": [a],
      "train_seconds": 2.0,
      "query_seconds": 0.5,
      "labeled_ids": [],
      "queried_ids": [1] if i < len(accuracies) - 1 else [],
    }
    for i, a in enumerate(accuracies)
  ]
  results = {
    "config": {
      "strategy": strategy,
      "seed": seed,
      "train": {"use_aux": use_aux},
      "al": {"num_rounds": num_rounds or len(accuracies)},
    },
    "data": {"name": "toy"},
    "rounds": rounds,
  }
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f)


@pytest.fixture
def sweep_root(tmp_path):
  root = tmp_path / "sweep"
  _write_run(root, "high", "lplgrad", 0, [0.50, 0.70])
  _write_run(root, "high", "lplgrad", 1, [0.52, 0.72])
  _write_run(root, "high", "random", 0, [0.50, 0.60])
  _write_run(root, "high", "random", 1, [0.52, 0.61])
  _write_run(root, "high", "ent_gradnorm", 0, [0.49, 0.69])
  _write_run(root, "high", "ent_gradnorm", 1, [0.53, 0.70])
  _write_run(root, "high", "lplgrad", 5, [0.4, 0.5], use_aux=False)
  _write_run(root, "high", "random", 7, [0.9], num_rounds=2)  # unfinished: left out
  return root


def test_aggregator_writes_the_tables_and_curves(sweep_root, tmp_path):
  out = tmp_path / "out"
  files = aggregate.aggregate(str(sweep_root), str(out))
  assert {
    "accuracy_high.md",
    "accuracy_high.csv",
    "curves_high.png",
    "times_high.md",
    "aux_high.md",
    "comparison_high.md",
  } <= set(files)
  table = (out / "accuracy_high.md").read_text()
  assert "| lplgrad | 2 | 51.00 ± 1.00 | 71.00 ± 1.00 | 61.00 |" in table
  assert "| random | 2 | 51.00 ± 1.00 | 60.50 ± 0.50 | 55.75 |" in table
  assert "| lplgrad (no aux) | 1 | 40.00 ± 0.00 | 50.00 ± 0.00 | 45.00 |" in table
  comparison = (out / "comparison_high.md").read_text()
  # Paired by seed: differences 10 and 11 points (t = 21, 1 df: p = 0.03) are beyond noise;
  # +1 / -1 and +1 / +2 (p = 0.21) are not.
  assert "| random | 2 | +0.00 ± 0.00 | +10.50 ± 0.71 * | +5.25 ± 0.35 * |" in comparison
  assert "| ent_gradnorm | 2 | +0.00 ± 1.41 | +1.50 ± 0.71 | +0.75 ± 0.35 |" in comparison
  aux = (out / "aux_high.md").read_text()
  assert "| lplgrad: with loss-prediction module | 51.00 ± 1.00 | 71.00 ± 1.00 |" in aux
  assert "| with minus ent_gradnorm, per seed | +1.00 / -1.00 | +1.00 / +2.00 |" in aux
  assert "| with minus lplgrad (no aux), paired by seed | - | - |" in aux  # no seed in common
  assert "| lplgrad | 2.0 | 0.50 | 2 |" in (out / "times_high.md").read_text()
  rows = (out / "accuracy_high.csv").read_text().splitlines()
  assert rows[0] == "strategy,num_labeled,mean,std,seeds" and len(rows) == 1 + 4 * 2


@pytest.mark.parametrize("diffs", [[1.0, 2.0, 4.0], [-0.5, 0.25, -2.0, -1.0, -0.75], [3.0, -3.0]])
def test_paired_test_agrees_with_scipy_ttest_rel(diffs):
  from scipy import stats

  mean, std, p = aggregate.paired_test(diffs)
  reference = stats.ttest_rel(np.asarray(diffs), np.zeros(len(diffs)))
  np.testing.assert_allclose(
    [mean, std, p], [np.mean(diffs), np.std(diffs, ddof=1), reference.pvalue]
  )


def test_paired_test_edge_cases():
  assert aggregate.paired_test([2.0, 2.0])[2] == 0.0  # identical nonzero differences
  assert aggregate.paired_test([0.0, 0.0])[2] == 1.0
  mean, std, p = aggregate.paired_test([1.5])
  assert mean == 1.5 and np.isnan(std) and np.isnan(p)


def _sweep_args(root, *overrides):
  """A sweep of random and entropy, seed 0, on a width-4 digits campaign of two rounds."""
  return [
    os.path.join(REPO_ROOT, "experiments", "sweep.py"),
    "--config=configs/digits.py",
    f"--root={root}",
    "--strategies=random,entropy",
    "--seeds=0",
    "--set=model.width=4",
    "--set=al.num_rounds=2",
    "--set=log.tensorboard=False",
    *(f"--set={o}" for o in overrides),
  ]


def test_sweep_runs_skips_finished_and_shards(tmp_path):
  root = tmp_path / "runs"
  args = _sweep_args(
    root, "train.epochs=1", "al.initial_size=20", "al.query_size=10", "al.subset_size=30"
  )
  first = run_cli(*args, "--shard=1/2", module=None)
  assert first.returncode == 0, first.stderr[-2000:]
  assert os.path.exists(root / "high" / "entropy" / "seed0" / "results.json")
  assert not os.path.exists(root / "high" / "random")  # the other shard
  again = run_cli(*args, "--shard=1/2", module=None)
  assert "finished, skipped" in again.stdout
  results = json.loads((root / "high" / "entropy" / "seed0" / "results.json").read_text())
  assert results["config"]["model"]["width"] == 4 and len(results["rounds"]) == 2


def test_sweep_stops_at_the_first_sigint(tmp_path):
  """Ctrl-C checkpoints the running campaign and ends the sweep (it used to go on)."""
  root = tmp_path / "runs"
  args = [sys.executable, *_sweep_args(root, "train.epochs=40")]
  sweep_process = subprocess.Popen(
    args, cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  for line in sweep_process.stdout:  # the campaign's handler is installed before this line
    if line.startswith("recipe:"):
      break
  sweep_process.send_signal(signal.SIGINT)
  out, err = sweep_process.communicate(timeout=600)
  assert sweep_process.returncode == 0, err[-2000:]
  assert "[1/2] high random seed 0: stopped; rerun the same command" in out
  assert os.listdir(root / "high" / "random" / "seed0" / "checkpoints")
  assert not os.path.exists(root / "high" / "entropy")  # the sweep did not go on


def test_override_parsing():
  from conftest import tiny_config

  config = tiny_config()
  sweep.apply_override(config, "train.lr_milestones=(3, 4)")
  sweep.apply_override(config, "data.name=cifar10")
  sweep.apply_override(config, "train.epochs=7")
  assert config.train.lr_milestones == (3, 4) and config.data.name == "cifar10"
  assert config.train.epochs == 7
  np.testing.assert_equal(
    sweep.load_config(os.path.join(REPO_ROOT, "configs", "cifar10.py"), "low").al.initial_size, 500
  )


def test_recipe_summary_is_mean_and_sample_sd_over_seeds():
  summary = recipes.summarize(
    {"a": {0: [0.2, 0.5], 1: [0.4, 0.7], 2: [0.6, 0.9]}, "b": {0: [0.1, 0.6]}}
  )
  a = summary["a"]
  np.testing.assert_allclose(
    [a["final_mean"], a["final_sd"], a["round_mean"], a["round_sd"]],
    [0.7, 0.2, 0.55, 0.2],  # finals 0.5/0.7/0.9; round means 0.35/0.55/0.75
    rtol=1e-12,
  )
  np.testing.assert_allclose(a["per_round_mean"], [0.4, 0.7], rtol=1e-12)
  assert summary["b"]["seeds"] == 1 and summary["b"]["final_sd"] == 0.0
  table = recipes.markdown(summary, "python x")
  assert table.index("| a |") < table.index("| b |")  # best final accuracy first


def test_own_data_config_is_cdd_with_the_measured_recipe():
  """configs/own_data.py is the paper's CDD config at its low budget (same loader, schedule and
  budget) but for its name and the recipe that experiments/results/own_data_recipe measured."""
  configs = os.path.join(REPO_ROOT, "configs")
  own = sweep_common.load_config(os.path.join(configs, "own_data.py"), "low")
  paper = sweep_common.load_config(os.path.join(configs, "cdd.py"), "low")

  def flat(tree, prefix=""):
    for key, value in tree.items():
      if hasattr(value, "items"):
        yield from flat(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}", value

  own_values, paper_values = dict(flat(own)), dict(flat(paper))
  assert own_values.keys() == paper_values.keys()
  changed = {k: v for k, v in own_values.items() if v != paper_values[k]}
  recipe = recipes.RECIPES["he_detached"]
  assert {k: changed.pop(k) for k in recipe} == recipe
  assert changed == {"data.name": "own_data"}  # the budget is CDD's low one
  results = os.path.join(REPO_ROOT, "experiments", "results", "own_data_recipe")
  for name in ("image_folder", "image_folder_6seeds", "digits"):
    with open(os.path.join(results, f"{name}.json")) as f:
      summary = json.load(f)["summary"]
    assert summary["he_detached"]["final_mean"] >= summary["faithful"]["final_mean"] - 1e-9


def test_image_folder_from_an_npz_holds_its_images(tmp_path):
  import make_image_folder
  from PIL import Image

  rng = np.random.default_rng(0)
  x_train = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
  x_test = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  source = tmp_path / "small.npz"
  np.savez(source, x_train=x_train, y_train=[0, 3, 0, 9, 3], x_test=x_test, y_test=[9, 0])
  make_image_folder.main(str(source), str(tmp_path / "folder"))
  for split, images, expected in (
    ("train", x_train, {"airplane": [0, 2], "cat": [1, 4], "truck": [3]}),
    ("test", x_test, {"truck": [0], "airplane": [1]}),
  ):
    written = {
      name: sorted(os.listdir(tmp_path / "folder" / split / name))
      for name in make_image_folder.CLASSES
    }
    assert {n: f for n, f in written.items() if f} == {
      n: [f"{i:05d}.png" for i in ids] for n, ids in expected.items()
    }
    for name, ids in expected.items():
      for i in ids:
        png = Image.open(tmp_path / "folder" / split / name / f"{i:05d}.png")
        np.testing.assert_array_equal(np.asarray(png), images[i])


# The subprocess compiles the pytest process's program again, in a cache of its own.
_TINY_SUITE = """
import os, subprocess, sys
import jax, jax.numpy as jnp

def test_compiles_here_and_in_a_subprocess(tmp_path):
  jax.jit(lambda x: x * 2)(jnp.ones(3))
  code = ("import jax, jax.numpy as jnp; jax.jit(lambda x: x * 2)(jnp.ones(3)); "
          "jax.jit(lambda x: x + 1)(jnp.ones(2))")
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path))
  subprocess.run([sys.executable, "-c", code], check=True, env=env)
"""


def test_suite_profile_counts_the_programs_of_the_tests_and_their_subprocesses(tmp_path):
  (tmp_path / "test_tiny.py").write_text(_TINY_SUITE)
  out = tmp_path / "profile.json"
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO_ROOT, "experiments", "suite_profile.py"),
      f"--out={out}",
      "--",
      "-q",
      "-s",  # the tests' output and their subprocesses' stderr reach this process
      "-p",
      "no:cacheprovider",
      str(tmp_path / "test_tiny.py"),
    ],
    cwd=tmp_path,
    # Every compile recorded by test; a cache of its own, so that the first compile of x * 2
    # is not a load from the tests' cache.
    env=cli_env(SUITE_PROFILE_LARGE_S="0", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache")),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  output = proc.stdout + proc.stderr
  # The compile log and the cache's DEBUG records are read by the recorder and dropped.
  assert "Finished XLA compilation" not in output and "get_cache_key" not in output
  result = json.loads(out.read_text())
  assert result["pytest_exit"] == 0 and result["unreadable_lines"] == 0
  assert result["processes"] == 2  # pytest and its subprocess
  programs = {name: count for name, count, _ in result["programs"]}
  assert programs["jit(<lambda>)"] == 3  # x * 2 in each, x + 1 in the subprocess
  again = {name: (count, tests) for name, count, _, tests in result["compiled_again"]}
  assert again["jit(<lambda>)"][0] == 2  # x * 2, not x + 1
  assert again["jit(<lambda>)"][1] == ["test_tiny.py::test_compiles_here_and_in_a_subprocess"]
  assert result["compiles"] >= 2 and result["compile_s"] > 0
  [(name, row)] = result["files"]
  assert name.endswith("test_tiny.py") and row["tests"] == 1 and row["subprocess_cpu_s"] > 0
  [(nodeid, cpu_s, subprocess_cpu_s, _)] = result["tests"]
  assert (
    nodeid.endswith("test_tiny.py::test_compiles_here_and_in_a_subprocess")
    and cpu_s > 0
    and subprocess_cpu_s > 0
  )
  by_test = {(test, name): count for test, name, count, _ in result["large_by_test"]}
  assert by_test["test_tiny.py::test_compiles_here_and_in_a_subprocess", "jit(<lambda>)"] == 3
  assert (tmp_path / "profile.md").read_text().startswith("# Test suite profile")
