"""The training recipes `recipe_sweep.py` compares, and the summary of its runs over seeds."""

import numpy as np

# The fidelity points (docs/fidelity.md) where the authors' code and common practice differ.
RECIPES = {
  "faithful": {},  # the authors' PyTorch recipe: today's defaults
  "he": {"model.init": "he"},
  "aux_decay": {"train.aux_lr_schedule": "decay"},
  "earlier": {  # the defaults before the faithful recipe (issue #12)
    "model.init": "he",
    "train.aux_lr_schedule": "decay",
    "model.bn_running_var": "biased",
    "train.detach_rule": "from",
  },
  # The ranking loss never reaches the main model (the loss head still trains on its features).
  "he_detached": {
    "model.init": "he",
    "train.detach_features_epoch": 0,
    "train.detach_rule": "from",
  },
}


def summarize(accuracies: dict) -> dict:
  """Per recipe: mean and sample sd over seeds of the final and the round-mean accuracy."""
  summary = {}
  for recipe, by_seed in accuracies.items():
    curves = np.array(list(by_seed.values()))
    final, average = curves[:, -1], curves.mean(axis=1)
    sd = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    summary[recipe] = {
      "seeds": len(curves),
      "final_mean": float(final.mean()),
      "final_sd": sd(final),
      "round_mean": float(average.mean()),
      "round_sd": sd(average),
      "per_round_mean": curves.mean(axis=0).tolist(),
    }
  return summary


def markdown(summary: dict, command: str) -> str:
  lines = [
    "| recipe | seeds | final accuracy (mean ± sd) | mean over rounds | per round |",
    "|---|---|---|---|---|",
  ]
  for recipe, s in sorted(summary.items(), key=lambda item: -item[1]["final_mean"]):
    rounds = " / ".join(f"{a:.3f}" for a in s["per_round_mean"])
    lines.append(
      f"| {recipe} | {s['seeds']} | {s['final_mean']:.3f} ± {s['final_sd']:.3f}"
      f" | {s['round_mean']:.3f} ± {s['round_sd']:.3f} | {rounds} |"
    )
  return "\n".join(lines) + f"\n\nCommand: `{command}`\n"
