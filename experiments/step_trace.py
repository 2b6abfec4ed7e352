"""Where a CPU training step's time goes, by kind of XLA:CPU thunk (a profiler trace).

  python experiments/step_trace.py --width=64 --batch=64 \
      --out=experiments/results/step_trace_w64_b64.json

Traces `--steps` calls of bench.py's training step (`measure.make_train_step`: main model and
loss head, augmentation, SGD) with `jax.profiler` and sums the trace's thunk events by kind
(the HLO name without its number: `transpose_copy_fusion.32` counts as
`transpose_copy_fusion`), per step. The sums are thread time: XLA:CPU runs independent thunks
at once on its threads, so they can add up to more than the wall time, and thunks run on its
own thread pool (most convolutions) leave no event. They say where the threads work, not a
share of the step's wall time. A .md table is written beside the JSON.
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
import numpy as np
from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import measure  # noqa: E402 - bench.py's training step

from lplgrad_jax import models  # noqa: E402 - also sets the project's XLA:CPU flag
from lplgrad_jax import reporting  # noqa: E402
from lplgrad_jax import sharding  # noqa: E402
from lplgrad_jax.configs import default  # noqa: E402

_WIDTH = flags.DEFINE_integer("width", 64, "ResNet-18 width.")
_BATCH = flags.DEFINE_integer("batch", 64, "Images per step.")
_STEPS = flags.DEFINE_integer("steps", 3, "Traced steps.")
_OUT = flags.DEFINE_string("out", None, "JSON path (a .md table is written beside it).")
# The executor's own spans and Python frames, not thunks.
_NOT_THUNKS = re.compile(r"^\$|Thunk|Pjit|PjRt|ThreadPool|ParseArguments|^end: ")


def _train_step(width: int, batch: int):
  config = default.get_config()
  config.model.width, config.train.batch_size = width, batch
  learner = models.create_learner(config.model, 10, use_aux=True, key=jax.random.key(0))
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, batch).astype(np.int32)
  pool = sharding.replicate((images, labels), sharding.data_mesh())
  mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
  return measure.make_train_step(learner, config.train, pool, mean, std)


def _thunk_totals(trace_dir: str, steps: int) -> dict:
  # The profiler writes the Perfetto trace beside its own (.trace.json.gz) one.
  (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  totals = collections.Counter()
  for event in events:
    name = event.get("name", "")
    if event.get("ph") != "X" or _NOT_THUNKS.search(name):
      continue
    totals[re.sub(r"\.\d+$", "", name)] += event.get("dur", 0) / 1e3 / steps
  return dict(totals.most_common())


def main(_):
  step = _train_step(_WIDTH.value, _BATCH.value)
  jax.block_until_ready(step())
  jax.block_until_ready(step())
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    jax.block_until_ready(step())
  step_ms = 1e3 * (time.perf_counter() - start) / _STEPS.value
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(_STEPS.value):
        jax.block_until_ready(step())
      traced_ms = 1e3 * (time.perf_counter() - start) / _STEPS.value
    totals = _thunk_totals(trace_dir, _STEPS.value)
  report = {
    "machine": reporting.cpu_description(),
    "width": _WIDTH.value,
    "batch": _BATCH.value,
    "step_ms": step_ms,
    "traced_step_ms": traced_ms,
    "thunk_thread_ms_per_step": totals,
  }
  print(json.dumps(report, indent=1))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=1)
    rows = [f"| {name} | {ms:.1f} |" for name, ms in totals.items() if ms >= 0.5]
    with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
      f.write(
        f"Machine: {report['machine']}, jax {jax.__version__}. ResNet-18 width {_WIDTH.value}, "
        f"batch {_BATCH.value}: bench.py's training step, {step_ms:.1f} ms untraced, "
        f"{traced_ms:.1f} ms traced. Thread time of the thunk events by kind, ms per step "
        f"(mean of {_STEPS.value} traced steps; thunks overlap on XLA:CPU's threads, and "
        "those on its own pool, most convolutions, leave no event).\n\n"
        "| thunk kind | thread ms |\n|---|---|\n" + "\n".join(rows) + "\n"
        f"| all events | {sum(totals.values()):.1f} |\n"
      )


if __name__ == "__main__":
  app.run(main)
