"""What a campaign leaves in its workdir and prints: results.json, the plot, TensorBoard
scalars, the summary table; and the atomic writes every output file goes through."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile

RESULTS_FILE = "results.json"
PLOT_FILE = "accuracy.png"
TENSORBOARD_DIR = "tensorboard"


def write_atomic(path: str, write_fn, mode: str = "w") -> None:
  """Writes through a temporary file in the same directory, then renames it over `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(
    dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp"
  )
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


def write_csv(path: str, header, rows) -> None:
  """Writes a UTF-8 CSV file (header, then rows) atomically, creating its folder."""
  text = io.StringIO()
  writer = csv.writer(text, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  write_atomic(path, lambda f: f.write(text.getvalue().encode("utf-8")), mode="wb")


def read_results(workdir: str, needed, *, of: str = "a campaign") -> dict:
  """`workdir`'s results.json; ConfigError if it is missing or `needed(results)` fails on it.

  `needed` reads the fields its caller uses (a KeyError or TypeError: not this tool's file);
  `of` says what kind of campaign the caller expects in the message.
  """
  from lplgrad_jax.errors import ConfigError

  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.isfile(path):
    raise ConfigError(
      f"{path} is missing: expected the --workdir of {of} (python -m lplgrad_jax.main)"
    )
  try:
    with open(path) as f:
      results = json.load(f)
    needed(results)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError(
      f"{path} is not a results file this tool can use ({type(e).__name__}: "
      f"{e}): expected one written by lplgrad_jax.main of this version "
      "(resuming the campaign rewrites it)"
    ) from None
  return results


def write_results(path: str, results: dict) -> None:
  # Strict JSON: a NaN or inf is a bug to surface here, not an unreadable file.
  write_atomic(path, lambda f: json.dump(results, f, indent=1, allow_nan=False))


def plot_accuracy(path: str, rounds: list[dict], title: str) -> None:
  """Test accuracy against the number of labeled images, one point per round."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  rounds = [r for r in rounds if r["test_accuracy"] is not None]  # None: no test split
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(
    [r["num_labeled"] for r in rounds], [100 * r["test_accuracy"] for r in rounds], marker="o"
  )
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
    lines.append(
      f"{r['round'] + 1:>5}  {r['num_labeled']:>8}  {accuracy:>8}"
      f"  {r['train_seconds']:>8.1f}  {r['query_seconds']:>8.1f}"
    )
  return "\n".join(lines)


class MetricsLogger:
  """TensorBoard scalars (tensorboardX) and the per-epoch summary of training metrics."""

  def __init__(self, workdir: str, enabled: bool, epochs_done: int):
    self.writer = None
    if enabled:
      self.writer = _summary_writer_class()(os.path.join(workdir, TENSORBOARD_DIR))
    self.epochs_done = epochs_done

  def epoch(self, metrics: dict) -> dict:
    """Logs an epoch's summed metrics; returns the progress bar's short form."""
    count = max(float(metrics["count"]), 1.0)
    summary = {name: float(metrics[name]) / count for name in ("loss", "main_loss", "aux_loss")}
    summary["accuracy"] = float(metrics["correct"]) / count
    if self.writer is not None:
      for name, value in summary.items():
        self.writer.add_scalar(f"train/{name}", value, self.epochs_done)
    self.epochs_done += 1
    return {"loss": f"{summary['loss']:.3f}", "acc": f"{summary['accuracy']:.3f}"}

  def round(self, record: dict) -> None:
    if self.writer is not None and record["test_accuracy"] is not None:
      self.writer.add_scalar("test/accuracy", record["test_accuracy"], record["num_labeled"])
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def cpu_description() -> str:
  """ "AMD EPYC, 2 cores, AVX-512": the CPU that computed a result. Its vector instruction set
  decides float32 rounding (docs/cpu_numerics.md) and speed."""
  fields = {}
  try:
    with open("/proc/cpuinfo") as f:
      fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
  except OSError:
    pass
  model = fields.get("model name\t", "?").strip()
  flags = set(fields.get("flags\t\t", "").split())
  isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "below AVX2"
  return f"{model}, {os.cpu_count()} cores, {isa}"


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch
  wherever it is installed (2 s of every start-up) only to accept torch tensors, and this
  project passes floats."""
  hidden = "torch" not in sys.modules
  if hidden:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX allows
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hidden:
      del sys.modules["torch"]
  return SummaryWriter
