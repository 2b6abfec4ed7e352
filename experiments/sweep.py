"""Runs strategies x seeds x budgets of one data set config, each in its own (resumable) workdir.

  python experiments/sweep.py --config=configs/cifar10.py --budgets=high,low \
      --strategies=lplgrad,ent_gradnorm,learning_loss,coreset,entropy,random --seeds=0,1,2 \
      --root=runs/cifar10 [--set=model.width=16 --set=train.epochs=50] [--shard=0/4]

Workdirs: ROOT/<budget>/<strategy>/seed<k>. Finished runs are skipped and
interrupted ones resume (the campaign's own checkpoints). A first SIGTERM / Ctrl-C
checkpoints the running campaign and ends the sweep (exit 0); a diverged run is reported
and the others go on (exit 3 at the end). Runs execute one
after another in this process, so they share compiled functions; `--shard=i/n`
takes every n-th run, to spread a sweep over processes or machines.
Then: python experiments/aggregate.py --root=ROOT
"""

import os
import sys
import time

from absl import flags

from lplgrad_jax import cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep_common import apply_override  # noqa: E402
from sweep_common import is_finished  # noqa: E402
from sweep_common import load_config  # noqa: E402

_CONFIG = flags.DEFINE_string("config", None, "Data set config file (configs/NAME.py).")
_BUDGETS = flags.DEFINE_list("budgets", ["high"], "Budget rows: high, low.")
_STRATEGIES = flags.DEFINE_list(
  "strategies",
  [
    "lplgrad",
    "ent_gradnorm",
    "learning_loss",
    "coreset",
    "entropy",
    "random",
    "margin",
    "least_confidence",
    "badge",
  ],
  "Strategies to run.",
)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (trials).")
_ROOT = flags.DEFINE_string("root", None, "Directory holding the sweep's workdirs.")
_SET = flags.DEFINE_multi_string("set", [], "Config override KEY=VALUE (Python literal), repeated.")
_SHARD = flags.DEFINE_string("shard", "0/1", "i/n: run every n-th run starting at i.")
flags.mark_flags_as_required(["config", "root"])


def main(argv):
  cli.start(argv)  # Orbax logs every save at INFO
  from lplgrad_jax import campaign
  from lplgrad_jax.errors import ConfigError
  from lplgrad_jax.errors import Diverged

  index, count = (int(x) for x in _SHARD.value.split("/"))
  runs = [
    (b, s, int(seed)) for b in _BUDGETS.value for s in _STRATEGIES.value for seed in _SEEDS.value
  ][index::count]
  diverged = []
  for number, (budget, strategy, seed) in enumerate(runs, 1):
    config = load_config(_CONFIG.value, budget)
    for assignment in _SET.value:
      apply_override(config, assignment)
    config.strategy, config.seed = strategy, seed
    config.log.progress = False
    workdir = os.path.join(_ROOT.value, budget, strategy, f"seed{seed}")
    label = f"[{number}/{len(runs)}] {budget} {strategy} seed {seed}"
    if is_finished(workdir, config.al.num_rounds):
      print(f"{label}: finished, skipped", flush=True)
      continue
    print(f"{label}: {workdir}", flush=True)
    start = time.perf_counter()
    try:
      campaign.run(config, workdir)
    except ConfigError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except Diverged as e:  # the other runs are independent: go on, and say so at the end
      print(f"{label}: error: {e}", file=sys.stderr, flush=True)
      diverged.append(label)
      continue
    if not is_finished(workdir, config.al.num_rounds):
      # A first SIGTERM / Ctrl-C checkpointed this campaign: the sweep stops too.
      print(f"{label}: stopped; rerun the same command to resume the sweep", flush=True)
      return
    print(f"{label}: done in {time.perf_counter() - start:.0f}s", flush=True)
  if diverged:
    print(f"error: {len(diverged)} run(s) diverged: {', '.join(diverged)}", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  cli.run(main)  # Ctrl-C between campaigns: one line, exit 130, no traceback
