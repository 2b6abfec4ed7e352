"""Where a CPU training step's time goes, by kind of XLA:CPU thunk (a profiler trace).

  python experiments/step_trace.py --width=64 --batch=64 \
      --out=experiments/results/step_trace_w64_b64.json

Traces `--steps` calls of one jitted forward+backward of the CIFAR ResNet-18 (BatchNorm in
training mode, cross-entropy) with `jax.profiler` and sums the trace's thunk events by kind
(the HLO name without its number: `transpose_copy_fusion.32` counts as
`transpose_copy_fusion`), per step. Thunks that XLA:CPU runs on its own thread pool (most
convolutions) leave no event: their time is the step's wall time less the events' sum.
A .md table is written beside the JSON.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lplgrad_jax import models  # noqa: E402 - also sets the project's XLA:CPU flag
from lplgrad_jax import reporting  # noqa: E402

_WIDTH = flags.DEFINE_integer("width", 64, "ResNet-18 width.")
_BATCH = flags.DEFINE_integer("batch", 64, "Images per step.")
_STEPS = flags.DEFINE_integer("steps", 3, "Traced steps.")
_OUT = flags.DEFINE_string("out", None, "JSON path (a .md table is written beside it).")


def _step(width: int, batch: int):
  model = models.ResNet18(10, width=width, rngs=nnx.Rngs(0))
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch))

  @jax.jit
  def grads(params, rest, x, y):
    def loss(p):
      learner = nnx.merge(graphdef, p, rest, copy=True)
      logits, _ = learner(x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, nnx.state(learner, nnx.BatchStat)

    return jax.value_and_grad(loss, has_aux=True)(params)

  return lambda: grads(params, rest, x, y)


def _thunk_totals(trace_dir: str, steps: int) -> dict:
  # The profiler writes the Perfetto trace beside its own (.trace.json.gz) one.
  (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  totals = collections.Counter()
  for event in events:
    name = event.get("name", "")
    if event.get("ph") != "X" or name.startswith("$") or "Thunk" in name or "Pjit" in name:
      continue  # Python frames and the executor's own spans
    totals[re.sub(r"\.\d+$", "", name)] += event.get("dur", 0) / 1e3 / steps
  return dict(totals.most_common())


def main(_):
  step = _step(_WIDTH.value, _BATCH.value)
  jax.block_until_ready(step())
  jax.block_until_ready(step())
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    jax.block_until_ready(step())
  step_ms = 1e3 * (time.perf_counter() - start) / _STEPS.value
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(_STEPS.value):
        jax.block_until_ready(step())
    totals = _thunk_totals(trace_dir, _STEPS.value)
  report = {
    "machine": reporting.cpu_description(),
    "width": _WIDTH.value,
    "batch": _BATCH.value,
    "step_ms_untraced": step_ms,
    "thunk_ms_per_step": totals,
  }
  print(json.dumps(report, indent=1))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=1)
    rows = [f"| {name} | {ms:.1f} |" for name, ms in totals.items() if ms >= 0.5]
    untraced = step_ms - sum(totals.values())
    with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
      f.write(
        f"Machine: {report['machine']}, jax {jax.__version__}. ResNet-18 width {_WIDTH.value}, "
        f"batch {_BATCH.value}: one training forward+backward, {step_ms:.1f} ms per step "
        f"untraced; thunk time by kind, ms per step (mean of {_STEPS.value} traced steps).\n\n"
        "| thunk kind | ms |\n|---|---|\n" + "\n".join(rows) + "\n"
        f"| no event (convolutions on XLA's thread pool, and the rest) | {untraced:.1f} |\n"
      )


if __name__ == "__main__":
  app.run(main)
