"""The fault suite (docs/reliability.md): each fault played as a user meets it, on the CLI.

Every case asserts the exit status, that stderr holds exactly the expected line(s)
and nothing else, and that the workdir is unchanged or resumes to the result of
an uninterrupted run. The subprocesses share the tests' JAX compilation cache, so
that only the first campaign of the module compiles; those that are killed only read it.
"""

import fcntl
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from conftest import REPO_ROOT
from conftest import campaign_outcome
from conftest import killable_env
from conftest import run_cli
from conftest import tiny_config

from lplgrad_jax import campaign
from lplgrad_jax import config_checks
from lplgrad_jax import reporting
from lplgrad_jax import strategies
from lplgrad_jax import workdirs
from lplgrad_jax.campaign_state import CampaignState
from lplgrad_jax.checkpoint import Checkpointer
from lplgrad_jax.errors import ConfigError
from lplgrad_jax.errors import Diverged

# 2 rounds of 2 epochs (2 steps each), a checkpoint every epoch: 6 checkpoints in all.
ARGS = [
  "--config=configs/digits.py",
  "--config.model.width=4",
  "--config.model.loss_head_width=8",
  "--config.train.epochs=2",
  "--config.train.batch_size=16",
  "--config.train.lr_milestones=(1,)",
  "--config.train.detach_features_epoch=1",
  "--config.al.initial_size=20",
  "--config.al.query_size=10",
  "--config.al.subset_size=40",
  "--config.al.num_rounds=2",
  "--config.query.chunk_size=20",
  "--config.checkpoint.every_epochs=1",
  "--config.log.progress=False",
  "--config.log.tensorboard=False",
]
# The randomized kill -9 test: CI runs 2 kills; `pytest -m slow` the 10 the issue asks for.
KILLS = [2, pytest.param(10, marks=pytest.mark.slow)]


def _cli(workdir, *extra, args=ARGS):
  return run_cli(*args, *extra, f"--workdir={workdir}")


def _stderr_lines(proc):
  return [line for line in proc.stderr.splitlines() if line.strip()]


def _one_error(proc, status, *fragments):
  """The process exited with `status` and wrote one `error:` line (holding `fragments`) alone."""
  lines = _stderr_lines(proc)
  assert proc.returncode == status and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
  assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr, lines
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


def _snapshot(workdir):
  """Every file of a workdir with its size and modification time."""
  files = {}
  for parent, _, names in os.walk(workdir):
    for name in names:
      stat = os.stat(os.path.join(parent, name))
      files[os.path.relpath(os.path.join(parent, name), workdir)] = (stat.st_size, stat.st_mtime_ns)
  return files


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(workdir, outcome) of the uninterrupted campaign."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = _cli(workdir)
  assert proc.returncode == 0 and not _stderr_lines(proc), proc.stderr[-3000:]
  return workdir, campaign_outcome(workdir)


def _copy(reference, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(reference[0], copy)
  return copy


# Bad input: one error line, exit 2, nothing written.
def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def _npz(tmp_path, name, num_train_labels):
  rng = np.random.default_rng(0)
  path = tmp_path / name
  np.savez(
    path,
    x_train=rng.integers(0, 255, (30, 8, 8, 3), np.uint8),
    y_train=np.arange(num_train_labels) % 3,
    x_test=rng.integers(0, 255, (6, 8, 8, 3), np.uint8),
    y_test=np.arange(6) % 3,
  )
  return str(path)


def _config_file(tmp_path, text):
  return "--config=" + _write(tmp_path, "bad.py", text)


def _npz_root(tmp_path, path):
  return ["--config.data.source=npz", f"--config.data.root={path}"]


BAD_INPUT = {
  "learning_rate_0": (
    lambda t: ["--config.train.learning_rate=0"],
    ["train.learning_rate=0", "expected a number > 0"],
  ),
  "syntax_error": (
    lambda t: [_config_file(t, "def get_config(:\n  pass\n")],
    ["bad.py, line 1: SyntaxError"],
  ),
  "name_error": (
    lambda t: [_config_file(t, "def get_config():\n  return x\n")],
    ["bad.py, line 2: NameError: name 'x' is not defined"],
  ),
  "budget_on_digits": (
    lambda t: ["--config=configs/digits.py:low"],
    ["configs/digits.py:low", "takes no ':budget' suffix"],
  ),
  "budget_on_subset": (
    lambda t: ["--config=configs/cifar10_subset.py:low"],
    ["cifar10_subset.py has one budget row"],
  ),
  "unknown_key_hint": (
    lambda t: ["--config.Train.epochs=3"],
    ["unknown configuration key 'Train' (did you mean 'train'?)"],
  ),
  "npz_lengths": (
    lambda t: _npz_root(t, _npz(t, "d.npz", 29)),
    ["30 x_train images but 29 y_train labels"],
  ),
  "npz_not_npz": (
    lambda t: _npz_root(t, _write(t, "d.npz", "not an archive")),
    ["is not an .npz file"],
  ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_error_line(case, tmp_path):
  extra, fragments = BAD_INPUT[case]
  extra = extra(tmp_path)
  args = [
    a
    for a in ARGS
    if not (a.startswith("--config=") and any(e.startswith("--config=") for e in extra))
  ]
  workdir = tmp_path / "w"
  _one_error(_cli(workdir, *extra, args=args), 2, *fragments)
  assert not os.path.exists(workdir / "results.json")
  assert not os.path.exists(workdir / "checkpoints")


@pytest.mark.parametrize(
  "where, fragment",
  [("file", "is a file, not a directory"), ("/proc/lplgrad_w", "is not a writable directory")],
)
def test_unusable_workdir_is_one_error_line(where, fragment, tmp_path):
  workdir = where if where.startswith("/") else tmp_path / "a_file"
  if where == "file":
    workdir.write_text("keep me")
  _one_error(_cli(workdir), 2, fragment)
  if where == "file":
    assert workdir.read_text() == "keep me"


def test_workdir_checks_refuse_read_only_and_full_disks(tmp_path, monkeypatch):
  def read_only(*args, **kwargs):
    raise OSError(30, "Read-only file system")

  with monkeypatch.context() as m:
    m.setattr(workdirs.tempfile, "mkstemp", read_only)
    with pytest.raises(ConfigError, match="not a writable directory .Read-only file system"):
      workdirs.check_workdir(str(tmp_path))
  full = os.statvfs_result((4096, 4096, 100, 0, 3, 100, 0, 0, 0, 255))
  monkeypatch.setattr(workdirs.os, "statvfs", lambda path: full)
  with pytest.raises(ConfigError, match=r"has 0.0 MiB free: expected at least 64 MiB"):
    workdirs.check_workdir(str(tmp_path))


@pytest.mark.parametrize(
  "key, value, expected",
  [
    ("train.learning_rate", -0.1, "expected a number > 0"),
    ("train.learning_rate", float("nan"), "expected a number > 0"),
    ("train.lr_decay", 0.0, "expected a number > 0"),
    ("train.momentum", -0.5, "between 0.0 and 1.0"),
    ("train.weight_decay", -1e-4, ">= 0.0"),
    ("checkpoint.keep", -1, "an integer >= 0"),
    ("checkpoint.every_epochs", -1, "an integer >= 0"),
    ("seed", -3, "an integer >= 0"),
    ("train.crop_padding", -1, "an integer >= 0"),
    ("distributed.process_id", -2, "an integer >= -1"),
  ],
)
def test_config_ranges_are_checked_before_loading(key, value, expected):
  config = tiny_config(**{key: value})
  with pytest.raises(ConfigError, match=rf"{key}=.*{expected}"):
    config_checks.validate_config(config)


def test_keep_zero_keeps_every_checkpoint(tmp_path):
  checkpointer = Checkpointer(str(tmp_path), keep=0)
  for i in range(4):
    checkpointer.save({"w": np.full(3, float(i))}, {"i": i})
  checkpointer.close()
  assert sorted(Checkpointer(str(tmp_path), keep=0).manager.all_steps()) == [1, 2, 3, 4]


def test_results_are_strict_json(tmp_path):
  with pytest.raises(ValueError, match="not JSON compliant"):
    reporting.write_results(str(tmp_path / "results.json"), {"accuracy": float("nan")})
  assert not os.path.exists(tmp_path / "results.json")


def test_non_finite_query_scores_never_reach_a_query(monkeypatch):
  """A round whose scores hold a NaN stops with Diverged before anything is selected."""

  def nan_scores(context):
    scores = np.arange(len(context.subset_ids), dtype=np.float64)
    scores[3] = np.nan
    return strategies.Selection(context.subset_ids[: context.query_size], scores)

  monkeypatch.setattr(strategies, "get_strategy", lambda name: strategies.Strategy(nan_scores))
  config = tiny_config()
  fake = types.SimpleNamespace(
    state=CampaignState(list(range(20)), config.to_dict()),
    config=config,
    dataset=types.SimpleNamespace(num_train=100),
    inputs=None,
    learner=None,
    normalization=None,
    pool=None,
    mesh=None,
    _progress=False,
    checkpointer=Checkpointer("/nowhere", keep=2),
  )
  fake._diverged = functools.partial(campaign.Campaign._diverged, fake)
  with pytest.raises(
    Diverged,
    match=r"training diverged: 1 of 40 query scores of round 1 "
    r"are not finite.*learning_rate=0.005.*--restart",
  ):
    campaign.Campaign._select(fake, fake.state.labeled)
  assert fake.state.rounds == []  # nothing recorded


# One live campaign per workdir.
def test_locked_workdir_is_refused_and_untouched(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  before = _snapshot(workdir)
  with open(workdir / workdirs.LOCK_FILE, "r+") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live campaign holds it
    lock.truncate()
    lock.write("host testhost, pid 4242, started 2026-01-01 00:00:00 UTC\n")
    lock.flush()
    held = _snapshot(workdir)
    for extra in ([], ["--restart"]):  # --restart must not delete a live campaign either
      _one_error(
        _cli(workdir, *extra),
        2,
        "is in use by a running campaign",
        "host testhost, pid 4242, started 2026-01-01",
      )
      assert _snapshot(workdir) == held
  assert {k: v for k, v in before.items() if k != workdirs.LOCK_FILE} == {
    k: v for k, v in held.items() if k != workdirs.LOCK_FILE
  }


def test_every_checkpoint_corrupt_is_reported_in_a_few_lines(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  root = workdir / "checkpoints"
  rng = np.random.default_rng(0)
  for parent, _, names in os.walk(root):
    if parent.endswith(f"{os.sep}d"):  # the arrays' data (TensorStore's errors are the noisiest)
      for name in names:
        path = os.path.join(parent, name)
        with open(path, "r+b") as f:
          f.write(rng.bytes(max(os.path.getsize(path), 1)))
  steps = sorted(os.listdir(root))
  proc = _cli(workdir)
  lines = _stderr_lines(proc)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines[-1].startswith("error: no checkpoint in") and "--restart" in lines[-1]
  assert len(lines) == 1 + len([s for s in steps if s.isdigit()])
  assert all(line.startswith("warning: checkpoint ") for line in lines[:-1]), lines
  assert sorted(os.listdir(root)) == steps  # nothing deleted


# Divergence: exit 3, nothing non-finite saved, and the workdir resumes.
def test_divergence_stops_with_exit_3_and_resumes_with_a_lower_rate(reference, tmp_path):
  workdir = tmp_path / "w"
  first = _cli(workdir, "--config.al.num_rounds=1")
  assert first.returncode == 0, first.stderr[-3000:]
  # Extended with a learning rate that diverges (both keys may change on resume), and no
  # checkpoint inside the round: the last good checkpoint is then the one after round 1's query.
  before = [d for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
  diverged = _cli(workdir, "--config.train.learning_rate=1e6", "--config.checkpoint.every_epochs=0")
  _one_error(
    diverged,
    3,
    "training diverged",
    "non-finite in round 2, ",
    "lower learning rate",
    "--config.train.learning_rate=100000",
    "--restart",
  )
  after = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert after[-1] == int(max(before, key=int)) + 1  # round 1's query, nothing of round 2
  results = json.loads((workdir / "results.json").read_text())
  assert len(results["rounds"]) == 1  # round 1 only: nothing of round 2 was published
  resumed = _cli(workdir)  # the newest checkpoint is good: it resumes and finishes
  assert resumed.returncode == 0 and not _stderr_lines(resumed), resumed.stderr[-3000:]
  assert campaign_outcome(workdir) == reference[1]


# Signals.
def _start(workdir):
  return subprocess.Popen(
    [sys.executable, "-m", "lplgrad_jax.main", *ARGS, f"--workdir={workdir}"],
    cwd=REPO_ROOT,
    env=killable_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _wait_for(proc, text):
  for line in proc.stdout:
    if text in line:
      return
  raise AssertionError(f"no line with {text!r}: {proc.stderr.read()[-3000:]}")


@pytest.mark.parametrize(
  "trigger",
  [
    "digits: ",  # set up: training's compilation starts
    "checkpoint saved: round 1, epoch 1",  # a save being written, the next one follows
  ],
)
def test_fast_double_sigint_exits_at_once_and_resumes(trigger, reference, tmp_path):
  # The second signal must land while the campaign is still stopping; a loaded machine can
  # delay it past the end of a short graceful stop (the stop then completed, exit 0, or the
  # signal met the exit path, exit 130). Such an attempt says nothing here: another one runs.
  for attempt in range(3):
    workdir = tmp_path / f"attempt{attempt}"
    proc = _start(workdir)
    _wait_for(proc, trigger)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.04)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)  # not the 300 s of an Orbax barrier
    if "stopped by SIGINT: checkpoint saved" not in stdout:
      break
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("stopped at once by a second SIGINT"), lines
  resumed = _cli(workdir)
  assert resumed.returncode == 0 and not _stderr_lines(resumed), resumed.stderr[-3000:]
  assert campaign_outcome(workdir) == reference[1]


@pytest.mark.parametrize("kills", KILLS)
def test_random_kill_9_then_resume_gives_the_uninterrupted_result(kills, reference, tmp_path):
  """`kills` runs killed at random times over the campaign's span, each resumed by the next."""
  seed = int(os.environ.get("LPLGRAD_KILL_SEED", "0"))
  rng = random.Random(seed)
  timed = tmp_path / "timed"  # how long a campaign takes once compiled (the cache is warm)
  start = time.monotonic()
  assert _cli(timed).returncode == 0
  span = time.monotonic() - start
  assert campaign_outcome(timed) == reference[1]
  tmp_path = tmp_path / "killed"
  for k in range(kills):
    proc = _start(tmp_path)
    try:
      proc.wait(timeout=rng.uniform(0.5, span))
    except subprocess.TimeoutExpired:
      proc.kill()  # SIGKILL
      proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    if proc.returncode == 0:
      break  # the campaign finished before its kill time
    assert proc.returncode == -signal.SIGKILL, (seed, k, proc.returncode)
  final = _cli(tmp_path)
  assert final.returncode == 0 and not _stderr_lines(final), (seed, final.stderr[-3000:])
  assert campaign_outcome(tmp_path) == reference[1], f"kill seed {seed}"
