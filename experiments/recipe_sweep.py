"""Compares training recipes of one config over seeds: which learns best on a given data set.

  python experiments/recipe_sweep.py --config=configs/cdd.py --root=runs/recipes \
      --recipes=faithful,he_detached --seeds=0,1,2 \
      --set=data.root=/data/folder --set=model.width=16 --set=train.epochs=15 \
      --out=experiments/results/own_data_recipe/folder.json

A recipe is a named set of overrides (experiments/recipes.py) applied on top of --set. Each
campaign runs in ROOT/<recipe>/seed<k> (finished ones are skipped, interrupted ones
resume). The summary (strict JSON, and a Markdown table beside it) holds every run's
test accuracy per round and, per recipe, the mean and sample standard deviation over
seeds of the final and the round-averaged accuracy.
"""

import json
import os
import sys

from absl import flags

from lplgrad_jax import cli

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep_common  # noqa: E402  (experiments/sweep_common.py)
from recipes import RECIPES  # noqa: E402
from recipes import markdown  # noqa: E402
from recipes import summarize  # noqa: E402

_CONFIG = flags.DEFINE_string("config", None, "Data set config file (configs/NAME.py).")
_RECIPES = flags.DEFINE_list("recipes", ["faithful", "he", "aux_decay", "earlier"], "Recipes.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_ROOT = flags.DEFINE_string("root", None, "Directory holding the campaigns' workdirs.")
_SET = flags.DEFINE_multi_string("set", [], "Config override KEY=VALUE (Python literal), repeated.")
_OUT = flags.DEFINE_string("out", None, "Summary JSON path (a .md table is written beside it).")
flags.mark_flags_as_required(["config", "root", "out"])
flags.register_validator(
  "recipes",
  lambda names: set(names) <= set(RECIPES),
  message=f"expected recipe names among {', '.join(RECIPES)}",
)


def main(argv):
  cli.start(argv)
  from lplgrad_jax import campaign

  accuracies = {}
  for recipe in _RECIPES.value:
    for seed in (int(s) for s in _SEEDS.value):
      config = sweep_common.load_config(_CONFIG.value, "high")
      for assignment in _SET.value:
        sweep_common.apply_override(config, assignment)
      for key, value in RECIPES[recipe].items():
        sweep_common.apply_override(config, f"{key}={value!r}")
      config.seed, config.log.progress = seed, False
      workdir = os.path.join(_ROOT.value, recipe, f"seed{seed}")
      if not sweep_common.is_finished(workdir, config.al.num_rounds):
        campaign.run(config, workdir)
      with open(os.path.join(workdir, "results.json")) as f:
        rounds = json.load(f)["rounds"]
      accuracies.setdefault(recipe, {})[seed] = [r["test_accuracy"] for r in rounds]
      print(f"{recipe} seed {seed}: {accuracies[recipe][seed][-1]:.3f}", flush=True)
  summary = summarize(accuracies)
  command = " ".join(["python", *sys.argv])
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump({"command": command, "summary": summary, "accuracy": accuracies}, f, indent=1)
  with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
    f.write(markdown(summary, command))
  print(markdown(summary, command))


if __name__ == "__main__":
  cli.run(main)
