"""Ways to take one convolution's per-example squared kernel-gradient norms on XLA:CPU.

  python experiments/norm_forms.py --shapes=32x64x64,16x128x128 --batch=64 \
      --out=experiments/results/norm_forms_intel.json

For a 3x3 stride-1 convolution of side S with C inputs and O outputs (--shapes, SxCxO) on
--batch examples, with random layer inputs x and output gradients g, every form computes
||sum_t x_{k,t} g_t^T||^2 summed over the kernel offsets k, per example, and all equal the
first to 1e-5; they differ in how the work reaches XLA:CPU's kernels. The batch weight
gradient (XLA's kernel-gradient convolution, the same multiply-adds summed over the batch)
is the rate to match. Interleaved rounds, medians, milliseconds.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import measure  # noqa: E402 - the timing, shared with bench.py and query_profile.py

from lplgrad_jax import reporting  # noqa: E402 - also its XLA:CPU setting (xla_flags.py)

_SHAPES = flags.DEFINE_list("shapes", ["32x64x64", "16x128x128"], "Side x inputs x outputs.")
_BATCH = flags.DEFINE_integer("batch", 64, "Examples per call.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved timed rounds (median).")
_OUT = flags.DEFINE_string("out", None, "JSON path (a .md table is written beside it).")

_NUMBERS = ("NHWC", "HWIO", "NHWC")
_dot = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def _shifted(x):
  """One example's (T, C) input under each of the nine kernel offsets (pergrad's layer rule)."""
  side = x.shape[0]
  padded = jnp.pad(x, [(1, 1), (1, 1), (0, 0)])
  offsets = [(i, j) for i in range(3) for j in range(3)]
  return [padded[i : i + side, j : j + side].reshape(side * side, -1) for i, j in offsets]


def _per_offset(x, g):  # the products of pergrad's layer rule, written out: nine (C, O)
  g = g.reshape(-1, g.shape[-1])
  return sum(jnp.sum(jnp.square(_dot("tp,to->po", a, g))) for a in _shifted(x))


def _concatenated(x, g):  # one (9C, O) product over the patch matrix
  patches = jnp.concatenate(_shifted(x), axis=-1)
  return jnp.sum(jnp.square(_dot("tp,to->po", patches, g.reshape(-1, g.shape[-1]))))


def _conv_gradient(x, g):  # XLA's kernel-gradient convolution on a batch of one
  return jnp.sum(jnp.square(_batch_weight_gradient(x[None], g[None])))


def _grouped(x, g):
  """All examples at once as one convolution with the examples as feature groups."""
  n, side, _, c = x.shape
  lhs = jnp.transpose(x, (3, 1, 2, 0))  # (C, S, S, N): the inputs' channels as the batch
  rhs = jnp.transpose(g, (1, 2, 0, 3)).reshape(side, side, 1, -1)  # (S, S, 1, N O)
  out = jax.lax.conv_general_dilated(
    lhs, rhs, (1, 1), [(1, 1), (1, 1)], dimension_numbers=_NUMBERS, feature_group_count=n
  )
  return jnp.sum(jnp.square(out.reshape(c, 3, 3, n, -1)), axis=(0, 1, 2, 4))


def _forms():
  steps = measure.in_steps
  forms = {"per-offset, whole batch (vmap)": jax.vmap(_per_offset)}
  forms |= {f"per-offset, steps of {k}": steps(_per_offset, k) for k in (1, 2, 4, 8)}
  forms |= {f"concatenated, steps of {k}": steps(_concatenated, k) for k in (2, 4)}
  forms["grouped convolution"] = _grouped
  forms["kernel-gradient convolution, steps of 2"] = steps(_conv_gradient, 2)
  return {name: jax.jit(fn) for name, fn in forms.items()}


def _batch_weight_gradient(x, g):
  kernel = jnp.zeros((3, 3, x.shape[-1], g.shape[-1]))
  conv = lambda k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=_NUMBERS)
  return jax.vjp(conv, kernel)[1](g)[0]


def _row(shape, n):
  side, c, o = (int(v) for v in shape.split("x"))
  x = jax.random.normal(jax.random.key(0), (n, side, side, c))
  g = jax.random.normal(jax.random.key(1), (n, side, side, o))
  calls = {name: (fn, (x, g)) for name, fn in _forms().items()}
  reference = next(iter(calls.values()))[0](x, g)
  for name, (fn, args) in calls.items():
    error = float(jnp.max(jnp.abs(fn(*args) - reference) / reference))
    assert error < 1e-5, (name, error)
  calls["batch weight gradient"] = (jax.jit(_batch_weight_gradient), (x, g))
  gflop = 2 * n * side * side * 9 * c * o / 1e9
  return {"shape": shape, "gflop": gflop, "ms": measure.interleaved_median_ms(calls, _ROUNDS.value)}


def main(_):
  rows = [_row(shape, _BATCH.value) for shape in _SHAPES.value]
  result = {
    "machine": f"{reporting.cpu_description()}, jax {jax.__version__}",
    "batch": _BATCH.value,
    "rounds": _ROUNDS.value,
    "rows": rows,
  }
  names = list(rows[0]["ms"])
  lines = [
    f"Machine: {result['machine']}. Batch {result['batch']}, 3x3 stride 1, median of "
    f"{result['rounds']} interleaved calls: milliseconds (GFLOP/s of the products' "
    "multiply-adds).",
    "",
    "| form | " + " | ".join(f"S x C x O = {r['shape']}" for r in rows) + " |",
    "|---|" + "---|" * len(rows),
  ]
  for name in names:
    cells = [f"{r['ms'][name]:.1f} ({r['gflop'] / r['ms'][name] * 1e3:.0f})" for r in rows]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  text = "\n".join(lines) + "\n"
  print(text)
  if _OUT.value:
    measure.write_result(_OUT.value, result, text)


if __name__ == "__main__":
  app.run(main)
