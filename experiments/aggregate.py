"""Turns a sweep's workdirs into the paper's tables and figures.

  python experiments/aggregate.py --root=runs/cifar10 --out=experiments/results/cifar10

Reads ROOT/<budget>/<strategy>/seed<k>/results.json and writes to OUT:
  accuracy_<budget>.md/.csv   Table III style: mean +- std test accuracy (%) per labeled count
  curves_<budget>.png         Figs 3-4 style: accuracy vs labeled images, std bands
  times_<budget>.md           Table IV style: mean train / query seconds per round
  aux_<budget>.md             Tables V-VI style: LPLgrad with vs without the loss-prediction module,
                              and their difference paired by seed
  comparison_<budget>.md      lplgrad minus each strategy, paired by seed, with a paired t-test

Runs with the same seed share the initial labeled set and the main model's initialisation, so
differences are taken seed by seed ("paired"); one is marked beyond noise where a two-sided
paired t-test over the seeds gives p < 0.05.
"""

import collections
import csv
import glob
import json
import os
import sys

import numpy as np
from absl import app
from absl import flags
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Strategies that train the loss-prediction module unless told otherwise (see strategies.py).
_AUX_BY_DEFAULT = ("lplgrad", "learning_loss")


def _uses_aux(results: dict) -> bool:
  if "use_aux" in results:
    return bool(results["use_aux"])
  configured = results["config"]["train"].get("use_aux")
  return configured if configured is not None else results["config"]["strategy"] in _AUX_BY_DEFAULT


def load_runs(root: str) -> dict:
  """{budget: {variant: [results, ...]}}; lplgrad without its module is 'lplgrad (no aux)'."""
  runs = collections.defaultdict(lambda: collections.defaultdict(list))
  for path in sorted(glob.glob(os.path.join(root, "*", "*", "*", "results.json"))):
    budget = path.split(os.sep)[-4]
    with open(path) as f:
      results = json.load(f)
    if len(results.get("rounds", [])) < results["config"]["al"]["num_rounds"]:
      print(f"skipping unfinished run {os.path.dirname(path)}", file=sys.stderr)
      continue
    strategy = results["config"]["strategy"]
    if strategy == "lplgrad" and not _uses_aux(results):
      strategy = "lplgrad (no aux)"
    runs[budget][strategy].append(results)
  return runs


def accuracy_table(runs_of_budget: dict):
  """(labeled counts, {strategy: (means, stds, number of seeds)}) in percent."""
  counts = sorted(
    {r["num_labeled"] for rs in runs_of_budget.values() for res in rs for r in res["rounds"]}
  )
  table = {}
  for strategy, results in sorted(runs_of_budget.items()):
    per_count = collections.defaultdict(list)
    for res in results:
      for r in res["rounds"]:
        per_count[r["num_labeled"]].append(100 * r["test_accuracy"])
    means = [float(np.mean(per_count[c])) if per_count[c] else float("nan") for c in counts]
    stds = [float(np.std(per_count[c])) if per_count[c] else float("nan") for c in counts]
    table[strategy] = (means, stds, len(results))
  return counts, table


def _markdown(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def write_accuracy(out: str, budget: str, counts, table) -> None:
  header = ["strategy", "seeds"] + [str(c) for c in counts] + ["mean"]
  rows = [
    [s, n] + [f"{m:.2f} ± {d:.2f}" for m, d in zip(means, stds)] + [f"{np.nanmean(means):.2f}"]
    for s, (means, stds, n) in table.items()
  ]
  with open(os.path.join(out, f"accuracy_{budget}.md"), "w") as f:
    f.write(
      f"Test accuracy (%) by number of labeled images, mean ± std over seeds ({budget} budget)\n\n"
    )
    f.write(_markdown(header, rows))
  with open(os.path.join(out, f"accuracy_{budget}.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["strategy", "num_labeled", "mean", "std", "seeds"])
    for s, (means, stds, n) in table.items():
      for c, m, d in zip(counts, means, stds):
        writer.writerow([s, c, f"{m:.4f}", f"{d:.4f}", n])


def paired_differences(runs_of_budget: dict, counts, first: str, second: str) -> list:
  """Per labeled count, the accuracy points `first` minus `second` for each seed both ran."""

  def by_seed(strategy):
    return {
      res["config"]["seed"]: {r["num_labeled"]: 100 * r["test_accuracy"] for r in res["rounds"]}
      for res in runs_of_budget.get(strategy, [])
    }

  a, b = by_seed(first), by_seed(second)
  seeds = sorted(set(a) & set(b))
  return [[a[s][c] - b[s][c] for s in seeds if c in a[s] and c in b[s]] for c in counts]


def paired_test(diffs) -> tuple[float, float, float]:
  """(mean, std over seeds, two-sided paired t-test p-value; nan below two seeds)."""
  d = np.asarray(diffs, float)
  if len(d) < 2:
    return (float(d.mean()) if len(d) else float("nan")), float("nan"), float("nan")
  mean, std = float(d.mean()), float(d.std(ddof=1))
  if std == 0:
    return mean, std, 0.0 if mean else 1.0
  t = mean / (std / np.sqrt(len(d)))
  return mean, std, float(2 * stats.t.sf(abs(t), len(d) - 1))


def _paired_cell(diffs) -> str:
  if not len(diffs):
    return "-"
  mean, std, p = paired_test(diffs)
  if np.isnan(std):
    return f"{mean:+.2f}"
  return f"{mean:+.2f} ± {std:.2f}{' *' if p < 0.05 else ''}"


def write_comparison(out: str, budget: str, counts, runs_of_budget: dict) -> None:
  if "lplgrad" not in runs_of_budget:
    return
  rows = []
  for s in sorted(runs_of_budget):
    if s == "lplgrad":
      continue
    diffs = paired_differences(runs_of_budget, counts, "lplgrad", s)
    over_rounds = [float(np.mean(seeds)) for seeds in zip(*diffs)] if diffs else []
    rows.append([s, len(over_rounds)] + [_paired_cell(d) for d in diffs + [over_rounds]])
  with open(os.path.join(out, f"comparison_{budget}.md"), "w") as f:
    f.write(
      "LPLgrad minus each strategy, accuracy points, paired by seed: mean ± std of the per-seed "
      "differences; * = beyond noise (paired t-test over the seeds, p < 0.05)\n\n"
    )
    header = ["strategy", "seeds"] + [str(c) for c in counts] + ["mean over rounds"]
    f.write(_markdown(header, rows))


def write_curves(out: str, budget: str, counts, table, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for s, (means, stds, _) in table.items():
    means, stds = np.asarray(means), np.asarray(stds)
    style = {"linewidth": 2.5} if s == "lplgrad" else {"linewidth": 1.2}
    ax.plot(counts, means, marker="o", markersize=3, label=s, **style)
    ax.fill_between(counts, means - stds, means + stds, alpha=0.15)
  ax.set_xlabel("labeled images")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, f"curves_{budget}.png"), dpi=110)
  plt.close(fig)


def write_times(out: str, budget: str, runs_of_budget: dict) -> None:
  rows = []
  for s, results in sorted(runs_of_budget.items()):
    train_s = [r["train_seconds"] for res in results for r in res["rounds"]]
    query_s = [r["query_seconds"] for res in results for r in res["rounds"] if r["queried_ids"]]
    rows.append(
      [s, f"{np.mean(train_s):.1f}", f"{np.mean(query_s):.2f}" if query_s else "-", len(results)]
    )
  with open(os.path.join(out, f"times_{budget}.md"), "w") as f:
    f.write("Mean seconds per round (training) and per query, over rounds and seeds\n\n")
    f.write(_markdown(["strategy", "train s / round", "query s / round", "seeds"], rows))


def write_aux(out: str, budget: str, counts, runs_of_budget: dict, table) -> None:
  pairs = [
    (name, label)
    for name, label in (
      ("lplgrad", "with loss-prediction module"),
      ("ent_gradnorm", "without (Ent-GradNorm)"),
      ("lplgrad (no aux)", "without (lplgrad, train.use_aux=False)"),
    )
    if name in table
  ]
  if len(pairs) < 2 or pairs[0][0] != "lplgrad":
    return
  rows = [
    [f"{name}: {label}"] + [f"{m:.2f} ± {d:.2f}" for m, d in zip(*table[name][:2])]
    for name, label in pairs
  ]
  for name, _ in pairs[1:]:
    diffs = paired_differences(runs_of_budget, counts, "lplgrad", name)
    rows.append([f"with minus {name}, paired by seed"] + [_paired_cell(d) for d in diffs])
    rows.append(
      [f"with minus {name}, per seed"] + [" / ".join(f"{x:+.2f}" for x in d) for d in diffs]
    )
  with open(os.path.join(out, f"aux_{budget}.md"), "w") as f:
    f.write(
      "The entropy-gradient-norm query with and without joint training of the "
      "loss-prediction module, accuracy (%); differences in points, mean ± std over seeds, "
      "* = beyond noise (paired t-test, p < 0.05)\n\n"
    )
    f.write(_markdown(["training"] + [str(c) for c in counts], rows))


def aggregate(root: str, out: str) -> list[str]:
  runs = load_runs(root)
  if not runs:
    raise SystemExit(f"error: no results.json under {root}/<budget>/<strategy>/<seed>/")
  os.makedirs(out, exist_ok=True)
  for budget, runs_of_budget in sorted(runs.items()):
    counts, table = accuracy_table(runs_of_budget)
    name = next(iter(runs_of_budget.values()))[0].get("data", {}).get("name", "")
    write_accuracy(out, budget, counts, table)
    write_comparison(out, budget, counts, runs_of_budget)
    write_curves(out, budget, counts, table, f"{name} ({budget} budget)")
    write_times(out, budget, runs_of_budget)
    write_aux(out, budget, counts, runs_of_budget, table)
  return sorted(os.listdir(out))


def main(argv):
  del argv
  root = flags.FLAGS.root
  out = flags.FLAGS.out or os.path.join(root, "summary")
  for name in aggregate(root, out):
    print(os.path.join(out, name))


if __name__ == "__main__":
  # Defined here, not at import, so that tests can import this module beside sweep.py.
  flags.DEFINE_string("root", None, "The sweep's root directory.", required=True)
  flags.DEFINE_string("out", None, "Output directory (default: ROOT/summary).")
  app.run(main)
