"""Start-up: what a campaign compiles, and the persistent compilation cache beside the workdir."""

import collections
import json
import os
import re

from conftest import cli_env
from conftest import run_cli

from lplgrad_jax import launch

# Two rounds (train, query, train) of a tiny digits campaign.
ARGS = (
  "--config=configs/digits.py",
  "--config.model.width=4",
  "--config.train.epochs=1",
  "--config.al.num_rounds=2",
  "--config.al.subset_size=100",
  "--config.log.progress=False",
  "--config.log.tensorboard=False",
)
# Every program the campaign above compiles (measured 2026-12-05): the learner's
# initialisation, the optimizer state (once per sharding), the train step, the evaluation,
# the query, and small bookkeeping programs. Eager initialisers would add ~70 (one per
# parameter shape); a step that recompiles per round would add one per round.
MAX_PROGRAMS = 24
_INITIALISERS = ("_uniform", "_normal", "_truncated_normal", "broadcast_in_dim", "multiply")


def _env():
  # Every program is cached, however fast this machine compiles it.
  env = cli_env(JAX_LOG_COMPILES="1", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env.pop("JAX_COMPILATION_CACHE_MAX_SIZE", None)
  return env


def _run(workdir, *extra):
  proc = run_cli(*ARGS, f"--workdir={workdir}", *extra, env=_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _compiled(proc) -> collections.Counter:
  return collections.Counter(re.findall(r"Finished XLA compilation of jit\((\w+)\)", proc.stderr))


def _cache_hits(proc) -> set:
  return set(re.findall(r"Persistent compilation cache hit for 'jit_(\w+)'", proc.stderr))


def _outcome(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    rounds = json.load(f)["rounds"]
  return [(r["test_accuracy"], r["labeled_ids"], r.get("query_scores")) for r in rounds]


def test_compiled_programs_and_the_cache_beside_the_workdir(tmp_path):
  uncached = _run(tmp_path / "plain" / "run", "--nocompilation_cache")
  assert not (tmp_path / "plain" / ".jax_cache").exists()
  compiled = _compiled(uncached)
  assert sum(compiled.values()) <= MAX_PROGRAMS, compiled
  assert not [name for name in compiled if name in _INITIALISERS], compiled
  assert compiled["initial_state"] == 1 and compiled["_train_batch"] == 1, compiled
  assert compiled["score_shard"] == 1, compiled

  cold = _run(tmp_path / "cached" / "first")
  cache = tmp_path / "cached" / ".jax_cache"
  if not launch.cpu_cache_loads():  # this jaxlib would reject what it cached: no cache
    assert not cache.exists()
    return
  stored = {name.rsplit("-", 2)[0] for name in os.listdir(cache)}
  assert {"jit__train_batch", "jit_initial_state", "jit_score_shard"} <= stored, stored
  assert "_train_batch" not in _cache_hits(cold)
  # Bounded, so entries are read and written under a file lock (access times kept for the
  # eviction): a campaign started beside a running one never reads half an entry.
  assert any(name.endswith("-atime") for name in os.listdir(cache))

  warm = _run(tmp_path / "cached" / "second")
  assert "Machine type used for XLA:CPU compilation" not in warm.stderr  # loaded, not refused
  assert {"_train_batch", "initial_state", "score_shard", "_outputs_batch"} <= _cache_hits(warm)
  # Loaded programs compute what compiled ones do: the same accuracies, picks and scores.
  reference = _outcome(tmp_path / "plain" / "run")
  assert _outcome(tmp_path / "cached" / "first") == reference
  assert _outcome(tmp_path / "cached" / "second") == reference


def test_the_cpu_cache_only_with_a_jaxlib_that_loads_it():
  assert not launch.cpu_cache_loads("0.10.1") and not launch.cpu_cache_loads("0.9.2")
  assert launch.cpu_cache_loads("0.10.2") and launch.cpu_cache_loads("0.11.0.dev20261201")
  assert not launch.cpu_cache_loads("unknown")
