"""Times a checkpoint save/restore of the full CIFAR-10 ResNet-18 + loss-head training state.

  python experiments/bench_checkpoint.py [--workdir=/tmp/ckpt_bench] [--repeats=3]

Prints and writes JSON: seconds for the blocking part of a save, the save
until committed on disk, a restore, and the bytes one checkpoint takes.
"""

import json
import os
import shutil
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/lplgrad_ckpt_bench", "Scratch directory.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Saves to time.")


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(p, f)) for p, _, files in os.walk(path) for f in files)


def main(_):
  import jax

  from lplgrad_jax import models
  from lplgrad_jax import train
  from lplgrad_jax.checkpoint import Checkpointer
  from lplgrad_jax.configs import cifar10

  config = cifar10.get_config()
  learner = models.create_learner(config.model, 10, use_aux=True, key=jax.random.key(0))
  cfg = train.StepConfig.from_config(config.train, 10000, use_aux=True)
  _, state = train.create_train_state(learner, cfg)
  # A trained state has non-zero momentum: fill every array with noise so that the
  # measured size is not flattered by compressible zeros.
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  state = jax.tree.unflatten(
    treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  )
  shutil.rmtree(_WORKDIR.value, ignore_errors=True)
  checkpointer = Checkpointer(_WORKDIR.value, keep=2)
  campaign = {"round": 0, "labeled_ids": list(range(10000))}
  blocking, committed = [], []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    checkpointer.save(state, campaign)
    blocking.append(time.perf_counter() - start)
    checkpointer.manager.wait_until_finished()
    committed.append(time.perf_counter() - start)
  step_dir = os.path.join(checkpointer.directory, str(checkpointer.manager.latest_step()))
  start = time.perf_counter()
  checkpointer.restore(state)
  restore_seconds = time.perf_counter() - start
  checkpointer.close()
  report = {
    "device": str(jax.devices()[0]),
    "parameters": sum(x.size for x in jax.tree.leaves(state.params)),
    "save_blocking_seconds": min(blocking),
    "save_committed_seconds": min(committed),
    "restore_seconds": restore_seconds,
    "checkpoint_bytes": _dir_bytes(step_dir),
    "kept_checkpoints_bytes": _dir_bytes(checkpointer.directory),
  }
  print(json.dumps(report, indent=1))
  with open(os.path.join(_WORKDIR.value, "bench_checkpoint.json"), "w") as f:
    json.dump(report, f, indent=1, allow_nan=False)


if __name__ == "__main__":
  app.run(main)
