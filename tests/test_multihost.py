"""Multi-host: two processes on localhost (jax.distributed, gloo), two CPU devices each.

Each process runs the real command line, as on two hosts; the run must equal
one process with four devices, and survive both processes being killed.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT
from conftest import cli_env
from conftest import killable_env
from conftest import run_cli
from test_resume import CLI_ARGS as RESUME_ARGS

# test_resume's tiny campaign, two rounds of 3 epochs at a gentle learning rate. The
# processes sum over gloo in another order than one process does; one step agrees to 4e-7,
# but a width-4 network trained on 20-30 images amplifies that noise within a round or two
# (as going from 1 to 2 or 4 devices in one process does): the first query's scores agree
# to ~1e-2 (measured: 6e-3 on the largest), about the spacing of 40 scores, so a near-tied
# pair at the boundary of the 10 picks may swap.
_CHANGED = {
  "--config.train.epochs": "3",
  "--config.train.lr_milestones": "(2,)",
  "--config.train.detach_features_epoch": "2",
  "--config.checkpoint.every_epochs": "1",
  "--config.train.learning_rate": "0.01",
  "--config.al.num_rounds": "2",
}
CLI_ARGS = [a for a in RESUME_ARGS if a.split("=")[0] not in _CHANGED] + [
  f"{k}={v}" for k, v in _CHANGED.items()
]
TIMEOUT_S = 600


def _env(num_devices: int, signalled: bool = False) -> dict:
  env = (killable_env if signalled else cli_env)(JAX_NUM_CPU_DEVICES=str(num_devices))
  # The device count comes from JAX_NUM_CPU_DEVICES alone; other XLA flags (CI's AVX2 rerun)
  # stay.
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_hosts(workdir, logs, extra_args, env):
  """Starts the two processes of one campaign; their output goes to `logs`[i]."""
  port = _free_port()
  procs = []
  for process_id, log in enumerate(logs):
    args = [
      sys.executable,
      "-m",
      "lplgrad_jax.main",
      *CLI_ARGS,
      f"--workdir={workdir}",
      "--config.distributed.initialize=True",
      f"--config.distributed.coordinator_address=127.0.0.1:{port}",
      "--config.distributed.num_processes=2",
      f"--config.distributed.process_id={process_id}",
      "--config.distributed.initialization_timeout_seconds=60",
      "--config.distributed.heartbeat_timeout_seconds=20",
      "--config.distributed.shutdown_timeout_seconds=30",
      *extra_args,
    ]
    with open(log, "w") as out:
      procs.append(
        subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
      )
  return procs


def _output(log):
  with open(log) as f:
    return f.read()


def _wait(procs, logs, when=None, signal_to=(), sig=signal.SIGKILL):
  """Waits for all processes. Once `when` shows in process 0's output, sends `sig` to
  the processes `signal_to`; once one fails, kills all (a survivor would otherwise wait
  for its peer until a timeout); never leaves one running."""
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while any(p.poll() is None for p in procs):
      if when is not None and when in _output(logs[0]):
        for i in signal_to:
          procs[i].send_signal(sig)
        when = None
      if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
        break
      time.sleep(0.05)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  return [p.returncode for p in procs]


def _run_hosts(workdir, tmp_path, name, extra_args=(), **signal_args):
  logs = [str(tmp_path / f"{name}_process{i}.log") for i in range(2)]
  env = _env(2, signalled=bool(signal_args.get("signal_to")))
  codes = _wait(_start_hosts(workdir, logs, extra_args, env), logs, **signal_args)
  return codes, [_output(log) for log in logs]


def _assert_same_selections(run, expected_run):
  """The same initial set exactly; the first query the same picks but for at most one
  near-tied swap (see above), from scores that agree within their drift; the last one
  follows another round of training, in which the drift has grown: most ids shared.
  `run`, `expected_run`: (results, selections) of two campaigns (`_rounds`)."""
  (results, selections), (expected_results, expected) = run, expected_run
  assert selections[0][0] == expected[0][0]
  first, expected_first = set(selections[0][1]), set(expected[0][1])
  assert len(first) == len(expected_first) and len(first ^ expected_first) <= 2
  assert set(selections[1][0]) == set(selections[0][0]) | first
  scores = results["rounds"][0]["query_scores"]
  for name, expected_score in expected_results["rounds"][0]["query_scores"].items():
    assert scores[name] == pytest.approx(expected_score, rel=1e-2), name
  last, expected_last = set(selections[-1][1]), set(expected[-1][1])
  assert len(last) == len(expected_last) and len(last & expected_last) >= len(last) // 2


def _rounds(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  return results, [(r["labeled_ids"], sorted(r["queried_ids"])) for r in results["rounds"]]


@pytest.fixture(scope="module")
def one_process_four_devices(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("single")
  proc = run_cli(*CLI_ARGS, f"--workdir={workdir}", env=_env(4), timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return _rounds(workdir)


@pytest.fixture(scope="module")
def npy_pool(tmp_path_factory):
  """The digits pool in the npy layout (lplgrad_jax.convert), for the streamed runs."""
  from lplgrad_jax import convert
  from lplgrad_jax.configs import digits

  root = str(tmp_path_factory.mktemp("pool") / "npy")
  convert.convert(digits.get_config().data, root, 500, progress=False)
  return root


# The pool: on every device ("replicated"); split by rows, each process loading only its part
# ("split"; batches gathered across the processes, query and test images read by the process
# holding them); split and streamed
# ("split_streamed": each process reads its own rows from its memory-mapped part, for the
# query and the training cache alike: the most that crosses processes, batches gathered by the
# same all-reduce as "split"'s). CI runs "split_streamed" (test_sharding runs the others on
# four devices in one process); the other two, kill -9 of both processes and SIGTERM to one
# (the two-process variant of test_resume's SIGTERM test) run with `-m slow`.
_POOLS = {
  "replicated": [],
  "split": ["--config.data.shard_pool=True"],
  "split_streamed": ["--config.data.shard_pool=True", "--config.data.stream=True"],
}


@pytest.mark.numerics
@pytest.mark.parametrize(
  "pool",
  [
    pytest.param("replicated", marks=pytest.mark.slow),
    pytest.param("split", marks=pytest.mark.slow),
    "split_streamed",
  ],
)
def test_two_processes_equal_one_process_with_four_devices(
  pool, one_process_four_devices, request, tmp_path
):
  extra_args = list(_POOLS[pool])
  if pool == "split_streamed":
    root = request.getfixturevalue("npy_pool")
    extra_args += ["--config.data.source=npy", f"--config.data.root={root}"]
  codes, outputs = _run_hosts(tmp_path / "w", tmp_path, "run", extra_args=extra_args)
  assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
  results, _ = run = _rounds(tmp_path / "w")
  single, _ = one_process_four_devices
  assert results["num_processes"] == 2 and results["num_devices"] == 4
  assert single["num_processes"] == 1 and single["num_devices"] == 4
  _assert_same_selections(run, one_process_four_devices)
  assert results["rounds"][0]["test_accuracy"] == pytest.approx(
    single["rounds"][0]["test_accuracy"], abs=0.01
  )
  if pool != "replicated":
    cache = "the pool stays on disk" if pool == "split_streamed" else "split by rows over 4 devices"
    assert cache in outputs[0]
  # Process 0 reports; process 1 prints no progress of its own.
  assert "round 2/2" in outputs[0] and "in 2 processes" in outputs[0]
  assert not [line for line in outputs[1].splitlines() if line.startswith("round")]


@pytest.mark.slow
def test_both_processes_killed_then_rerun_resumes(one_process_four_devices, tmp_path):
  # Killed after the second checkpoint, so the first one is surely committed.
  codes, _ = _run_hosts(
    tmp_path / "w", tmp_path, "killed", signal_to=(0, 1), when="checkpoint saved: round 1, epoch 2"
  )
  assert codes == [-signal.SIGKILL, -signal.SIGKILL]
  codes, outputs = _run_hosts(tmp_path / "w", tmp_path, "resumed")
  assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
  assert "resuming from" in outputs[0]
  _assert_same_selections(_rounds(tmp_path / "w"), one_process_four_devices)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_with_a_checkpoint(one_process_four_devices, tmp_path):
  # Preemption of one host: the processes agree to stop at the next epoch boundary,
  # save together and exit 0; rerunning resumes.
  codes, outputs = _run_hosts(
    tmp_path / "w",
    tmp_path,
    "stopped",
    signal_to=(0,),
    sig=signal.SIGTERM,
    when="checkpoint saved: round 1, epoch 1",
  )
  assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
  assert "stopped by SIGTERM" in outputs[0]
  codes, outputs = _run_hosts(tmp_path / "w", tmp_path, "resumed")
  assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
  assert "resuming from" in outputs[0]
  _assert_same_selections(_rounds(tmp_path / "w"), one_process_four_devices)
