"""XLA:CPU levers against the training gap to PyTorch: each one a fresh bench.py process.

  python experiments/cpu_levers.py --width=64 --batch=64 \
      --out=experiments/results/cpu_levers_width64.json

Every lever runs `experiments/bench.py` (train step, "fast" query, plain forward+backward)
in its own process with its XLA_FLAGS, one after another on an otherwise idle machine;
PyTorch's eager step runs in the first and the last process, so the ratios are against
the PyTorch rate measured on either side of the levers (their mean). A .md table is written
beside the JSON. A lever that XLA does not know or cannot compile is recorded with its error.
"""

import json
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np
from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lplgrad_jax import reporting  # noqa: E402
from lplgrad_jax import xla_flags  # noqa: E402

_WIDTH = flags.DEFINE_integer("width", 64, "ResNet-18 width.")
_BATCH = flags.DEFINE_integer("batch", 64, "Images per step.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement.")
_LEVERS = flags.DEFINE_list("levers", None, "Names of the levers to run (default: all).")
_ROUNDS = flags.DEFINE_integer(
  "rounds", 3, "Runs of every lever, interleaved (this machine drifts); the median is reported."
)
_OUT = flags.DEFINE_string("out", None, "JSON path (a .md table is written beside it).")

YNN = "--xla_cpu_experimental_ynn_fusion_type="
# (name, XLA_FLAGS, what it changes). "xla_default" spells out XLA's own default, since the
# package adds its own setting (lplgrad_jax/xla_flags.py) to XLA_FLAGS that do not set it.
LEVERS = (
  ("xla_default", YNN + xla_flags.XLA_DEFAULT, "XLA:CPU's defaults (jaxlib 0.10.2)"),
  ("project", "", f"lplgrad_jax's setting: {xla_flags.FLAG}={xla_flags.VALUE}"),
  ("ynn_off", YNN, "no YNNPACK fusions: Eigen convolutions and dots, XLA's own loops"),
  (
    "ynn_reduce_dot",
    YNN + "reduce,individual_dot",
    "YNNPACK for reductions and dots, Eigen convolutions",
  ),
  (
    "ynn_all",
    YNN + "dot,eltwise,reduce,individual_dot,individual_convolution",
    "every YNNPACK fusion kind",
  ),
  ("onednn", "--xla_cpu_use_onednn=true", "oneDNN (as PyTorch), where this jaxlib has it"),
  ("xnnpack_off", "--xla_cpu_use_xnnpack=false", "no XNNPACK"),
  ("fast_math", "--xla_cpu_enable_fast_math=true", "LLVM fast math (not exact: timing only)"),
  ("vector_512", "--xla_cpu_prefer_vector_width=512", "512-bit vectors in XLA's own loops"),
)


def _bench(flags_value: str, torch: bool) -> dict:
  here = os.path.dirname(os.path.abspath(__file__))
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "bench.json")
    args = [
      sys.executable,
      os.path.join(here, "bench.py"),
      f"--width={_WIDTH.value}",
      f"--batch={_BATCH.value}",
      f"--repeats={_REPEATS.value}",
      "--methods=fast",
      "--query_chunks=1",
      f"--out={out}",
      *(["--torch"] if torch else []),
    ]
    env = dict(os.environ, XLA_FLAGS=flags_value, JAX_PLATFORMS="cpu")
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
      return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    with open(out) as f:
      return json.load(f)


def _median(reports: list) -> dict:
  """Per measurement, the median rate over the runs of one lever (the first error otherwise)."""
  errors = [r for r in reports if "error" in r]
  if errors:
    return errors[0]
  keys = ("train_step_float32", "forward_backward", "query_fast_float32")
  return {
    k: {"images_per_s": float(np.median([r[k]["images_per_s"] for r in reports]))} for k in keys
  }


def _row(name, flags_value, what, report, torch_rate):
  if "error" in report:
    return {"lever": name, "xla_flags": flags_value, "what": what, "error": report["error"]}
  rate = lambda key: report[key]["images_per_s"]
  return {
    "lever": name,
    "xla_flags": flags_value,
    "what": what,
    "train_step": rate("train_step_float32"),
    "forward_backward": rate("forward_backward"),
    "query_fast": rate("query_fast_float32"),
    "train_vs_torch": rate("train_step_float32") / torch_rate,
  }


def _markdown(rows, torch_rates, machine) -> str:
  lines = [
    f"Machine: {machine}. ResNet-18 width {_WIDTH.value}, batch {_BATCH.value}, images/s; "
    f"PyTorch eager train step {torch_rates[0]:.1f} (before) and {torch_rates[1]:.1f} (after).",
    "",
    "| lever | XLA_FLAGS | train step | vs PyTorch | fwd+bwd | query fast |",
    "|---|---|---|---|---|---|",
  ]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['lever']} | `{r['xla_flags']}` | error: {r['error']} | | | |")
    else:
      lines.append(
        f"| {r['lever']} | `{r['xla_flags']}` | {r['train_step']:.1f} | "
        f"{r['train_vs_torch']:.2f}x | {r['forward_backward']:.1f} | {r['query_fast']:.1f} |"
      )
  return "\n".join(lines) + "\n"


def main(_):
  chosen = [lever for lever in LEVERS if _LEVERS.value is None or lever[0] in _LEVERS.value]
  if not chosen:
    sys.exit(f"error: --levers={_LEVERS.value}: expected names from {[n for n, *_ in LEVERS]}")
  runs = {name: [] for name, *_ in chosen}
  last = (_ROUNDS.value - 1, len(chosen) - 1)
  for r in range(_ROUNDS.value):
    for i, (name, flags_value, _) in enumerate(chosen):
      runs[name].append(_bench(flags_value, torch=(r, i) in ((0, 0), last)))
      print(f"{name}: {json.dumps(runs[name][-1].get('train_step_float32', runs[name][-1]))}")
  torch_rates = [
    run["torch_train_step"]["images_per_s"]
    for run in (runs[chosen[0][0]][0], runs[chosen[-1][0]][-1])
    if "torch_train_step" in run
  ]
  if len(torch_rates) != 2:
    sys.exit("error: no PyTorch rate was measured (is torch installed?)")
  torch_rate = sum(torch_rates) / 2
  reports = [_median(runs[name]) for name, *_ in chosen]
  rows = [_row(*lever, report, torch_rate) for lever, report in zip(chosen, reports)]
  machine = f"{reporting.cpu_description()}, jax {jax.__version__}"
  result = {
    "machine": machine,
    "rounds": _ROUNDS.value,
    "torch_train_step": torch_rates,
    "levers": rows,
    "train_step_runs": {
      name: [r.get("train_step_float32", {}).get("images_per_s") for r in reports_of]
      for name, reports_of in runs.items()
    },
  }
  print(_markdown(rows, torch_rates, machine))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1, allow_nan=False)
    with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
      f.write(_markdown(rows, torch_rates, machine))


if __name__ == "__main__":
  app.run(main)
