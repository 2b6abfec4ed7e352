"""experiments/accelerator_check.py: the smoke mode walks every section without TensorFlow;
the real mode refuses a machine without an accelerator; the report judges targets exactly."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from conftest import cli_env
from conftest import killable_env

sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))
import accelerator_report  # noqa: E402

SCRIPT = os.path.join(REPO_ROOT, "experiments", "accelerator_check.py")
# The GPU machines have no TensorFlow nor TFDS: the check runs with both made unimportable.
WITHOUT_TF = (
  "import runpy, sys; sys.modules['tensorflow'] = None; "
  "sys.modules['tensorflow_datasets'] = None; sys.argv = sys.argv[1:]; "
  "runpy.run_path(sys.argv[0], run_name='__main__')"
)
TARGETS = {"query_R25k", "train_bf16", "train_vs_torch", "fast_vs_vmap", "campaign_cifar10_high"}


def _run(*args, timeout=900, env=None):
  """The check as a subprocess, with the tests' compilation cache (`env`: cli_env())."""
  return subprocess.run(
    [sys.executable, "-c", WITHOUT_TF, SCRIPT, *args],
    cwd=REPO_ROOT,
    env=cli_env() if env is None else env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _numbers(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _numbers(v)
  elif isinstance(tree, list):
    for v in tree:
      yield from _numbers(v)
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield tree


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("accelerator")
  result = _run("--smoke", f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  return out, result


def test_smoke_measures_every_section_into_strict_json(smoke):
  out, result = smoke
  assert sorted(os.listdir(out)) == ["accelerator_cpu.json", "accelerator_cpu.md"]
  report = json.loads(
    (out / "accelerator_cpu.json").read_text(),
    parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"),
  )
  assert all(math.isfinite(x) for x in _numbers(report))
  assert report["header"]["mode"] == "smoke" and report["header"]["device_count"] >= 1
  assert report["skipped"] == [] and report["failed"] == []
  assert report["tensorflow_modules_loaded"] == []
  rows = report["query"]["rows"]
  assert {(r["kind"], r["dtype"]) for r in rows} == {
    ("floor", "float32"),
    ("fast", "float32"),
    ("fast", "bfloat16"),
    ("vmap", "float32"),
  }
  timed = rows + report["train"]["steps"] + report["train"]["epochs"]
  assert [e["loop"] for e in report["train"]["epochs"]] == ["host"]
  for row in timed:
    assert row["images_per_s"] > 0 and row["seconds"] > 0 and row["compile_s"] >= 0
    assert row["images_per_s"] == pytest.approx(row["images"] / row["seconds"])
  for row in rows:
    if row["kind"] == "fast":  # scored end to end, as a campaign scores R
      assert row["R_measured"] and row["seconds_for_R"] == row["seconds"]
      assert row["images"] == row["R"] == report["header"]["sizes"]["subset"]
  floor = next(r for r in rows if r["kind"] == "floor")
  assert floor["vs_floor"] == 1.0


def test_smoke_campaign_phases_and_targets(smoke):
  out, _ = smoke
  report = json.loads((out / "accelerator_cpu.json").read_text())
  campaign = report["campaign"]
  assert [r["num_labeled"] for r in campaign["rounds"]] == [8, 16]
  # Train and query seconds are the campaign's own round records (results.json), the rest
  # is its wall clock less those: the phases add up to the wall clock.
  phases, rounds = campaign["phases_s"], campaign["rounds"]
  assert all(v >= 0 for v in phases.values())
  for phase, key in (("train", "train_seconds"), ("query", "query_seconds")):
    assert phases[f"{phase} (round records)"] == pytest.approx(sum(r[key] for r in rounds))
  assert rounds[0]["train_seconds"] > 0 and rounds[0]["query_seconds"] > 0
  assert rounds[-1]["query_seconds"] == 0  # the last round does not query
  assert sum(v for k, v in phases.items() if not k.startswith("process")) == pytest.approx(
    campaign["wall_s"]
  )
  assert phases["the rest: set-up, eval, checkpoints, results, logging"] > 0
  # Timed on the trained model: eval over the test split, one checkpoint save a call; the
  # extrapolation scales both, and counts the data's load and placement once.
  assert campaign["eval"]["images"] == campaign["num_test"] > 0
  assert campaign["eval"]["seconds"] > 0 and campaign["checkpoint_save"]["seconds"] > 0
  assert campaign["checkpoint_save"]["images"] == 1
  assert report["data"]["name"] == "digits" and report["data"]["load_s"] > 0
  (extrapolation,) = report["extrapolation"]
  assert extrapolation["parts_s"]["eval"] == pytest.approx(
    10 * campaign["eval"]["seconds"] * 10_000 / campaign["num_test"]
  )
  assert extrapolation["parts_s"]["checkpoint (upper bound: each save waited for)"] == (
    pytest.approx(10 * 21 * campaign["checkpoint_save"]["seconds"])
  )
  error = campaign["bf16_error"]
  assert -1 <= error["spearman"] <= 1 and 0 <= error["top_k_overlap"] <= 1
  assert (
    error["relative_error_median"] <= error["relative_error_p99"] <= error["relative_error_max"]
  )
  targets = {t["name"]: t for t in report["targets"]}
  assert set(targets) == TARGETS
  for name in ("query_R25k", "fast_vs_vmap", "campaign_cifar10_high"):
    value, threshold = targets[name]["value"], targets[name]["threshold"]
    # Seconds are met at or below the threshold, rates and ratios at or above it.
    expected = value <= threshold if targets[name]["unit"] == "s" else value >= threshold
    assert value > 0 and targets[name]["met"] is expected, targets[name]
  if not report["torch"]["available"]:
    assert targets["train_vs_torch"]["met"] is None
  markdown = (out / "accelerator_cpu.md").read_text()
  for heading in (
    "## Targets",
    "## Query",
    "## Training",
    "## PyTorch reference",
    "## Short campaign",
    "## Recommendations",
    "## Skipped and failed",
  ):
    assert heading in markdown
  assert all(t["description"] in markdown for t in report["targets"])
  assert "TensorFlow modules loaded: none" in markdown


def test_refuses_a_cpu_without_force_and_bad_values(tmp_path):
  refused = _run(f"--out={tmp_path}", timeout=300)
  assert refused.returncode == 2
  assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
  assert refused.stderr.startswith("error: no accelerator: JAX sees only CPU devices")
  bad = _run("--smoke", "--chunks=0,16", f"--out={tmp_path}", timeout=300)
  assert bad.returncode == 2
  assert bad.stderr.strip() == (
    "error: --chunks='0,16': expected positive integers separated by commas"
  )
  assert os.listdir(tmp_path) == []


def test_watchdog_writes_what_was_measured_and_exits_3(tmp_path):
  # The watchdog ends the process wherever it is: in a compile, or writing its result to the cache.
  result = _run(
    "--smoke",
    "--budget_s=0.5",
    "--grace_s=0.5",
    f"--out={tmp_path}",
    timeout=300,
    env=killable_env(),
  )
  assert result.returncode == 3, result.stderr[-2000:]
  assert (tmp_path / "accelerator_cpu.json").exists(), result.stderr[-2000:]
  report = json.loads(
    (tmp_path / "accelerator_cpu.json").read_text(),
    parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"),
  )
  assert [f["name"] for f in report["failed"]][-1] == "hard time limit"
  assert "hard time limit" in (tmp_path / "accelerator_cpu.md").read_text()


def _hand_made_report():
  query = [
    {
      "kind": "fast",
      "dtype": "float32",
      "chunk": 1024,
      "images_per_s": 100_000.0,
      "seconds_for_R": 0.25,
      "R": 25_000,
      "R_measured": True,
      "compile_s": 3.0,
    },
    {
      "kind": "floor",
      "dtype": "float32",
      "chunk": 1024,
      "images_per_s": 200_000.0,
      "seconds_for_R": 0.125,
      "R": 25_000,
      "R_measured": False,
      "compile_s": 1.0,
    },
    {
      "kind": "vmap",
      "dtype": "float32",
      "chunk": 256,
      "images_per_s": 10_000.0,
      "seconds_for_R": 2.5,
      "R": 25_000,
      "R_measured": False,
      "compile_s": 1.0,
    },
  ]
  steps = [
    {"dtype": "bfloat16", "batch": 128, "images_per_s": 40_000.0, "compile_s": 2.0},
    {"dtype": "float32", "batch": 128, "images_per_s": 20_000.0, "compile_s": 2.0},
  ]
  epochs = [
    {
      "loop": "host",
      "dtype": "float32",
      "batch": 128,
      "steps": 10,
      "seconds": 1.0,
      "images_per_s": 1280.0,
      "compile_s": 4.0,
    },
    {
      "loop": "scan",
      "dtype": "float32",
      "batch": 128,
      "steps": 10,
      "seconds": 0.5,
      "images_per_s": 2560.0,
      "compile_s": 6.0,
    },
  ]
  torch = {
    "available": True,
    "rows": [{"name": "train_eager", "dtype": "bfloat16", "images_per_s": 32_000.0}],
  }
  return {
    "header": {
      "platform": "gpu",
      "startup_s": 5.0,
      "sizes": {"batches": [128]},
      "defaults": {"query.chunk_size": 64, "train.epoch_loop": "host"},
    },
    "query": {"rows": query},
    "train": {"steps": steps, "epochs": epochs},
    "torch": torch,
  }


def test_targets_and_extrapolation_are_exact_on_a_hand_made_report():
  report = accelerator_report.judge(_hand_made_report())
  targets = {t["name"]: t for t in report["targets"]}
  assert targets["query_R25k"]["value"] == 0.25 and targets["query_R25k"]["met"] is True
  assert targets["train_bf16"]["value"] == 40_000.0 and targets["train_bf16"]["met"] is True
  assert targets["train_vs_torch"]["value"] == 1.25 and targets["train_vs_torch"]["met"] is False
  assert targets["fast_vs_vmap"]["value"] == 10.0 and targets["fast_vs_vmap"]["met"] is True
  # Only float32 has an epoch and a fast row: the faster loop, scan, at 0.05 s per step.
  # Steps per epoch over the rounds' labeled sets 1000..10000 at batch 128:
  # 8+16+24+32+40+47+55+63+71+79 = 435; 200 epochs -> 200 * 435 * 0.05 = 4350 s.
  (extrapolation,) = report["extrapolation"]
  assert extrapolation["parts_s"]["train"] == pytest.approx(4350.0)
  assert extrapolation["parts_s"]["query"] == pytest.approx(9 * 0.25)
  once = extrapolation["parts_s"]["once: start-up, data, placement, compiles"]
  assert once == pytest.approx(5.0 + 6.0 + 3.0)  # start-up, scan and fast compiles
  assert targets["campaign_cifar10_high"]["met"] is False
  assert any("'scan' (now 'host')" in r and "2.00x" in r for r in report["recommendations"])
  assert any(
    "query.chunk_size=1024" in r and "0.50x the fwd+bwd floor" in r
    for r in report["recommendations"]
  )


def test_extrapolation_scales_the_campaign_model_eval_and_checkpoint_save():
  report = _hand_made_report()
  report["data"] = {"name": "cifar10_subset", "load_s": 1.0, "placement_s": 0.5}
  report["campaign"] = {
    "eval": {"seconds": 0.5, "images": 1000, "compile_s": 2.0},
    "checkpoint_save": {"seconds": 0.1, "images": 1, "compile_s": 0.0},
  }
  (extrapolation,) = accelerator_report.judge(report)["extrapolation"]
  parts = extrapolation["parts_s"]
  assert parts["eval"] == pytest.approx(10 * 0.5 * 10)  # 10 rounds, 10,000 test images
  # A save every 10 of 200 epochs and two commits a round: 21 saves a round.
  assert parts["checkpoint (upper bound: each save waited for)"] == pytest.approx(10 * 21 * 0.1)
  once = parts["once: start-up, data, placement, compiles"]
  assert once == pytest.approx(5.0 + 1.0 + 0.5 + 6.0 + 3.0 + 2.0)  # + eval's compile
  assert extrapolation["total_s"] == pytest.approx(sum(parts.values()))
