"""Start-up: the wall time of a 1-round x 1-epoch digits campaign, cold and warm cache.

  git worktree add /tmp/before <commit>   # the code to compare against
  python experiments/bench_startup.py --checkouts=/tmp/before,. --repeats=3 \
      --out=experiments/results/startup_cpu.json

For each checkout and repeat: a "cold" run (a new parent directory: no compilation cache
yet) and a "warm" run (a second workdir beside it, the first run's cache in place), each a
fresh `python -m lplgrad_jax.main` process, one after another on an otherwise idle machine.
Code that predates the cache compiles everything in both runs. Each process runs the
checkout's own code with this interpreter (`PYTHONPATH`).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app
from absl import flags

from lplgrad_jax import reporting

_CHECKOUTS = flags.DEFINE_list("checkouts", ["."], "Repository checkouts to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Cold + warm pairs per checkout.")
_OUT = flags.DEFINE_string("out", None, "JSON path (a .md table is written beside it).")
ARGS = (
  "--config=configs/digits.py",
  "--config.al.num_rounds=1",
  "--config.train.epochs=1",
  "--config.log.progress=False",
)


def _timed_run(checkout: str, workdir: str) -> float:
  env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout), JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  start = time.perf_counter()
  proc = subprocess.run(
    [sys.executable, "-m", "lplgrad_jax.main", *ARGS, f"--workdir={workdir}"],
    cwd=checkout,
    env=env,
    capture_output=True,
    text=True,
  )
  seconds = time.perf_counter() - start
  if proc.returncode != 0:
    sys.exit(f"error: {checkout}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
  return seconds


def _revision(checkout: str) -> str:
  proc = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True
  )
  dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=checkout).returncode != 0
  return proc.stdout.strip() + (" + changes" if dirty else "")


def main(argv):
  del argv
  results = []
  for checkout in _CHECKOUTS.value:
    cold, warm = [], []
    for _ in range(_REPEATS.value):
      with tempfile.TemporaryDirectory() as parent:
        cold.append(_timed_run(checkout, os.path.join(parent, "first")))
        warm.append(_timed_run(checkout, os.path.join(parent, "second")))
    results.append(
      {"checkout": checkout, "revision": _revision(checkout), "cold_s": cold, "warm_s": warm}
    )
    print(f"{checkout} ({results[-1]['revision']}): cold {cold}, warm {warm}", flush=True)
  report = {
    "command": " ".join(["python", *sys.argv]),
    "machine": f"{reporting.cpu_description()}, jax {jax.__version__}",
    "date": time.strftime("%Y-%m-%d"),
    "runs": results,
  }

  def cell(runs):
    return f"{np.median(runs):.1f} ({', '.join(f'{s:.1f}' for s in runs)})"

  lines = ["| code | cold cache: median (runs), s | warm cache: median (runs), s |"]
  lines.append("|---|---|---|")
  for r in results:
    lines.append(f"| {r['revision']} | {cell(r['cold_s'])} | {cell(r['warm_s'])} |")
  table = (
    f"{report['machine']}, {report['date']}\n\n"
    + "\n".join(lines)
    + f"\n\nCommand: `{report['command']}`\n"
  )
  print(table)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=1)
    with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
      f.write(table)


if __name__ == "__main__":
  app.run(main)
