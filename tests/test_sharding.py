"""Sharded query and data-parallel training on 4 (simulated) CPU devices."""

import json
import os

import numpy as np
import pytest
from conftest import REPO_ROOT
from conftest import cli_env
from conftest import run_cli


@pytest.fixture(scope="module")
def four_device_run(tmp_path_factory):
  env = cli_env(
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
    PYTHONPATH=os.pathsep.join([os.path.join(REPO_ROOT, "tests"), REPO_ROOT]),
  )
  script = os.path.join(REPO_ROOT, "tests", "sharded_checks.py")
  proc = run_cli(script, str(tmp_path_factory.mktemp("four")), env=env, timeout=900, module=None)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(json.loads(proc.stdout.strip().splitlines()[-1]), log=proc.stdout)


@pytest.mark.parametrize("method", ["fast", "vmap"])
def test_sharded_scores_equal_single_device_scores(method, four_device_run):
  sharded, single = four_device_run["query"][method]
  np.testing.assert_allclose(sharded, single, rtol=1e-5)


def test_data_parallel_training_equals_single_device(four_device_run):
  # BatchNorm statistics are those of the global batch, so 4 devices train like 1.
  four, one = four_device_run["train"]
  for a, b in zip(four, one):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_four_device_campaign_records_its_devices(four_device_run):
  assert four_device_run["campaigns"]["False"]["num_devices"] == 4


def test_rows_gathered_from_a_pool_split_over_devices(four_device_run):
  gathered, expected = four_device_run["gather"]
  assert gathered == expected


def test_a_pool_split_by_rows_runs_the_same_campaign(four_device_run):
  # data.shard_pool: each device holds a quarter of the pool; batches are gathered from the
  # shards, the query and test images split over the devices as each process reads them, the
  # channel statistics summed over the shards.
  replicated, split = (four_device_run["campaigns"][k]["rounds"] for k in ("False", "True"))
  assert split == replicated


def test_a_streamed_campaign_on_four_devices_is_the_replicated_one(four_device_run):
  # data.stream: the labeled images alone, replicated over the devices, appended each round.
  replicated, streamed = (four_device_run["campaigns"][k]["rounds"] for k in ("False", "stream"))
  assert streamed == replicated


def test_a_streamed_pool_split_by_rows_runs_the_same_campaign(four_device_run):
  # data.stream with data.shard_pool: newly labeled images are read by the process holding
  # them and gathered into the replicated cache; the query and the test set are split
  # over the devices as each process reads them.
  replicated, split = (four_device_run["campaigns"][k]["rounds"] for k in ("False", "split_stream"))
  assert split == replicated
  described = "the pool stays in host memory, the devices cache up to 30 labeled rows, each"
  assert f"stream mode: {described} process reading its own rows" in four_device_run["log"]
