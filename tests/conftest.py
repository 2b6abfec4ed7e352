"""Shared fixtures: a tiny digits configuration, one campaign run shared by many tests, and
the command line run as a subprocess."""

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lplgrad_jax import launch
from lplgrad_jax import models
from lplgrad_jax import optimizer
from lplgrad_jax import train

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One persistent compilation cache for the tests: their CLI subprocesses (most run the same
# tiny digits configuration) and the xdist workers themselves (tests that build the same
# model and program anew) compile a program once instead of once per test. The controller
# sets it up before the workers start (they inherit the variable); entries are read and
# written under JAX's file lock (the cache is bounded), so concurrent processes are safe.
# It is kept between runs in the checkout: a later run loads what an earlier one compiled.
# A load is what that run would compile: JAX's key holds the program, the compile options,
# XLA_FLAGS, jaxlib's version and the device topology, which on the CPU holds the target
# machine's features (a checkout used on another CPU misses and compiles). A run that did
# not end green may have been killed while writing an entry, which every later run would
# warn about: the next run starts empty. A run that finds another one using the kept cache
# (a lock), or a jaxlib whose CPU cache warns on loads (launch.cpu_cache_loads), takes a
# temporary one. LPLGRAD_TEST_COMPILATION_CACHE names another directory, left as it is.
_SESSION_CACHE = "LPLGRAD_TEST_COMPILATION_CACHE"
_KEPT = os.path.join(REPO_ROOT, ".jax_test_cache")
_PROGRAMS = os.path.join(_KEPT, "programs")
_GREEN = os.path.join(_KEPT, "last-run-green")
_CACHE_BYTES = 1 << 30  # a whole run writes about 50 MB; the least recently used go beyond


def pytest_configure(config):
  if hasattr(config, "workerinput") or _SESSION_CACHE in os.environ:
    return
  directory = _kept_cache(config) if launch.cpu_cache_loads() else None
  if directory is None:
    directory = tempfile.mkdtemp(prefix="lplgrad-jax-cache-")
    config.add_cleanup(lambda: shutil.rmtree(directory, True))
  os.environ[_SESSION_CACHE] = directory


def _kept_cache(config) -> str | None:
  """The kept cache, locked for this run (released when it ends); None while another run in
  this checkout holds it."""
  os.makedirs(_KEPT, exist_ok=True)
  lock = open(os.path.join(_KEPT, "lock"), "w")
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    lock.close()
    return None
  config.add_cleanup(lock.close)
  if os.path.exists(_GREEN):
    os.remove(_GREEN)  # back when this run ends green
  else:
    shutil.rmtree(_PROGRAMS, ignore_errors=True)
  os.makedirs(_PROGRAMS, exist_ok=True)
  return _PROGRAMS


def pytest_sessionfinish(session, exitstatus):
  kept = os.environ.get(_SESSION_CACHE) == _PROGRAMS
  clean = exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)
  if not hasattr(session.config, "workerinput") and kept and clean:
    open(_GREEN, "w").close()


if os.environ.get(_SESSION_CACHE):  # an xdist worker (the controller imports this first)
  jax.config.update("jax_compilation_cache_dir", os.environ[_SESSION_CACHE])
  jax.config.update("jax_compilation_cache_max_size", _CACHE_BYTES)
  # In-process, only programs that are worth a file: eager operations compile too.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

SHARED_CIFAR = os.path.join(REPO_ROOT, "..", "shared", "data", "cifar10_subset.npz")
sys.path.insert(0, REPO_ROOT)  # `configs` is imported from the repo root, as the CLI does


# pytest-xdist hands out whole files (`make test`: --dist loadfile, for the module-scoped
# campaigns), in collection order (--no-loadscope-reorder). The files with long runs go first so
# that the short ones fill the end and both workers finish together.
_LONG_FILES_FIRST = (
  "test_multihost.py",
  "test_faults.py",
  "test_pergrad.py",
  "test_backbones.py",
  "test_resume.py",
  "test_cli.py",
  "test_torch_parity.py",
  "test_sharding.py",
  "test_query.py",
  "test_pretrained.py",
  "test_accelerator_check.py",
  "test_train.py",
  "test_experiments.py",
  "test_strategies.py",
)


def pytest_report_header(config):
  """The CPU that computed the results: float32 rounding depends on its instruction set
  (docs/cpu_numerics.md), so a log from another machine says which one it was."""
  del config
  from lplgrad_jax import reporting

  flags_env = os.environ.get("XLA_FLAGS", "")
  return f"cpu: {reporting.cpu_description()}; XLA_FLAGS={flags_env!r}"


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_LONG_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order


def built(module_type, *args, seed: int = 0, **kwargs):
  """`module_type(*args, **kwargs, rngs=nnx.Rngs(seed))`, its weights drawn by one compiled
  program (models.initialised): eagerly, each initialiser compiles once per shape."""
  return models.initialised(
    lambda key: module_type(*args, **kwargs, rngs=nnx.Rngs(key)), jax.random.key(seed)
  )


# A module's forward pass as one compiled program: op by op, every operation compiles once per
# shape, seconds for a ResNet. In training mode it updates the module's BatchNorm statistics.
forward = nnx.jit(lambda module, x, *args: module(x, *args))


def train_state_in(learner, cfg, dtype):
  """(graphdef, TrainState) of `learner` computing in `dtype`. float32: the campaign's own
  path; float64 (under jax.enable_x64()): every parameter and statistic cast, as PyTorch's
  `.double()`, the reference against which float32 tolerances are measured."""
  if dtype == jnp.float32:
    return train.create_train_state(nnx.clone(learner), cfg)
  learner = nnx.clone(learner)
  learner.train()
  graphdef, params, stats = nnx.split(learner, nnx.Param, nnx.BatchStat)
  params, stats = jax.tree.map(lambda a: jnp.asarray(a, dtype), (params, stats))
  return graphdef, train.TrainState(params, stats, optimizer.make_optimizer(0.0, cfg).init(params))


def relative_distance(actual, reference, start) -> float:
  """||actual - reference|| / ||reference - start|| over all leaves of the pytrees: how far
  a result is from a reference, relative to how far the reference moved from the start."""

  def sq(a, b):
    return sum(
      float(np.sum(np.square(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )

  return (sq(actual, reference) / sq(reference, start)) ** 0.5


def cli_env(**extra) -> dict:
  """This process's environment for a CLI subprocess: JAX on the CPU, no TensorFlow notices,
  unbuffered output, the tests' compilation cache (every program, however fast it
  compiles), and `extra` on top."""
  cache = {}
  if os.environ.get(_SESSION_CACHE):
    cache = {
      "JAX_COMPILATION_CACHE_DIR": os.environ[_SESSION_CACHE],
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
      "JAX_COMPILATION_CACHE_MAX_SIZE": str(_CACHE_BYTES),
    }
  return (
    dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **cache)
    | extra
  )


def killable_env(**extra) -> dict:
  """cli_env() for a run that may be killed: it loads programs from the tests' compilation
  cache but writes none (one killed while it writes an entry would leave a truncated one,
  which later runs warn about). An uninterrupted run of the same configuration before it (a
  module's reference run) has written its programs; what it compiles beyond them, the next
  run compiles again."""
  return cli_env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1e9", **extra)


def run_cli(*args, env=None, cwd=REPO_ROOT, timeout=600, module="lplgrad_jax.main"):
  """`python -m module *args` run to its end, stdout and stderr captured as text; `env`
  defaults to cli_env(). `module=None`: `args` starts with the script to run."""
  return subprocess.run(
    [sys.executable, *(["-m", module] if module else []), *args],
    cwd=cwd,
    env=cli_env() if env is None else env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def campaign_outcome(workdir):
  """What a campaign decided and measured, round by round, from its results.json."""
  with open(os.path.join(workdir, "results.json")) as f:
    rounds = json.load(f)["rounds"]
  return [
    (
      r["num_labeled"],
      r["labeled_ids"],
      r["queried_ids"],
      r["test_accuracy"],
      r["per_class_accuracy"],
    )
    for r in rounds
  ]


def tiny_config(**overrides):
  """The digits demo configuration shrunk to seconds: width 4, 2 epochs, 3 rounds."""
  from lplgrad_jax.configs import digits

  config = digits.get_config()
  config.model.width = 4
  config.model.loss_head_width = 8
  config.train.epochs = 2
  config.train.batch_size = 16
  config.train.detach_features_epoch = 1
  config.train.lr_milestones = (1,)
  config.train.eval_batch_size = 128
  config.al.initial_size = 20
  config.al.query_size = 10
  config.al.subset_size = 40
  config.al.num_rounds = 3
  config.query.chunk_size = 20
  config.log.progress = False
  config.log.tensorboard = False
  for key, value in overrides.items():
    section = config
    *path, leaf = key.split(".")
    for p in path:
      section = section[p]
    section[leaf] = value
  return config


@pytest.fixture(scope="session")
def tiny_campaign(tmp_path_factory):
  """(config, workdir, results) of one tiny LPLgrad campaign on digits."""
  from lplgrad_jax import campaign

  config = tiny_config()
  workdir = str(tmp_path_factory.mktemp("campaign"))
  return config, workdir, campaign.run(config, workdir)


@contextlib.contextmanager
def local_proxy(monkeypatch, reachable: bool):
  """Routes HTTP(S) through a proxy on localhost: a listening socket (a data host probe
  succeeds) or a closed port (every connection is refused), so no test reaches the network."""
  with socket.socket() as proxy:
    proxy.bind(("127.0.0.1", 0))
    port = proxy.getsockname()[1]
    if reachable:
      proxy.listen()
    else:
      proxy.close()
    for var in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
      monkeypatch.delenv(var, raising=False)
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
      monkeypatch.setenv(var, f"http://127.0.0.1:{port}")
    yield port
