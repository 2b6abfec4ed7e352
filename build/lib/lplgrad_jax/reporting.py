"""What a campaign leaves in its workdir and prints: results.json, the plot, the summary table."""

from __future__ import annotations

import json
import os
import tempfile


def write_atomic(path: str, write_fn, mode: str = "w") -> None:
  """Writes through a temporary file in the same directory, then renames it over `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      write_fn(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_results(path: str, results: dict) -> None:
  write_atomic(path, lambda f: json.dump(results, f, indent=1))


def plot_accuracy(path: str, rounds: list[dict], title: str) -> None:
  """Test accuracy against the number of labeled images, one point per round."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  rounds = [r for r in rounds if r["test_accuracy"] is not None]  # None: no test split
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([r["num_labeled"] for r in rounds], [100 * r["test_accuracy"] for r in rounds],
          marker="o")
  ax.set_xlabel("labeled images")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
  plt.close(fig)


def summary_table(rounds: list[dict]) -> str:
  header = f"{'round':>5}  {'labeled':>8}  {'test acc':>8}  {'train s':>8}  {'query s':>8}"
  lines = [header, "-" * len(header)]
  for r in rounds:
    accuracy = "-" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.2f}%"
    lines.append(f"{r['round'] + 1:>5}  {r['num_labeled']:>8}  {accuracy:>8}"
                 f"  {r['train_seconds']:>8.1f}  {r['query_seconds']:>8.1f}")
  return "\n".join(lines)
