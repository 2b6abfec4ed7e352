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
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import measure  # noqa: E402 - the timing, shared with bench.py and query_profile.py

from lplgrad_jax import reporting  # noqa: E402 - also its XLA:CPU setting (xla_flags.py)
from lplgrad_jax.pergrad import ghost_norm  # noqa: E402

_SHAPES = flags.DEFINE_list("shapes", ["32x64x64", "16x128x128"], "Side x inputs x outputs.")
_BATCH = flags.DEFINE_integer("batch", 64, "Examples per call.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved timed rounds (median).")
_OUT = flags.DEFINE_string("out", None, "JSON path (a .md table is written beside it).")

_NUMBERS = ("NHWC", "HWIO", "NHWC")
_dot = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def _example_forms(conv) -> dict:
  """(x, g) of one example -> its squared kernel-gradient norm, three ways."""
  rule = functools.partial(measure.kernel_rule, conv)

  def per_offset(x, g):  # pergrad's own route: nine (C, O) products
    return ghost_norm.squared_norm([rule(x, g)])

  def concatenated(x, g):  # one (9C, O) product over the patch matrix
    part = rule(x, g)
    patches = jnp.concatenate(part.shifted, axis=-1)[:, 0]
    return jnp.sum(jnp.square(_dot("tp,to->po", patches, part.grads[:, 0])))

  def conv_gradient(x, g):  # XLA's kernel-gradient convolution on a batch of one
    return jnp.sum(jnp.square(measure.kernel_gradient(x[None], conv.kernel[...], g[None])))

  return {"per-offset": per_offset, "concatenated": concatenated, "conv": conv_gradient}


def _grouped(x, g):
  """All examples at once as one convolution with the examples as feature groups."""
  n, side, _, c = x.shape
  lhs = jnp.transpose(x, (3, 1, 2, 0))  # (C, S, S, N): the inputs' channels as the batch
  rhs = jnp.transpose(g, (1, 2, 0, 3)).reshape(side, side, 1, -1)  # (S, S, 1, N O)
  out = jax.lax.conv_general_dilated(
    lhs, rhs, (1, 1), [(1, 1), (1, 1)], dimension_numbers=_NUMBERS, feature_group_count=n
  )
  return jnp.sum(jnp.square(out.reshape(c, 3, 3, n, -1)), axis=(0, 1, 2, 4))


def _forms(conv):
  example, steps = _example_forms(conv), measure.in_steps
  forms = {"per-offset, whole batch (vmap)": jax.vmap(example["per-offset"])}
  forms |= {f"per-offset, steps of {k}": steps(example["per-offset"], k) for k in (1, 2, 4, 8)}
  forms |= {f"concatenated, steps of {k}": steps(example["concatenated"], k) for k in (2, 4)}
  forms["grouped convolution"] = _grouped
  forms["kernel-gradient convolution, steps of 2"] = steps(example["conv"], 2)
  return {name: jax.jit(fn) for name, fn in forms.items()}


def _row(shape, n):
  side, c, o = (int(v) for v in shape.split("x"))
  x = jax.random.normal(jax.random.key(0), (n, side, side, c))
  g = jax.random.normal(jax.random.key(1), (n, side, side, o))
  conv = nnx.Conv(c, o, (3, 3), use_bias=False, rngs=nnx.Rngs(0))
  calls = {name: (fn, (x, g)) for name, fn in _forms(conv).items()}
  reference = next(iter(calls.values()))[0](x, g)
  for name, (fn, args) in calls.items():
    error = float(jnp.max(jnp.abs(fn(*args) - reference) / reference))
    assert error < 1e-5, (name, error)
  weight_gradient = jax.jit(lambda x, g: measure.kernel_gradient(x, conv.kernel[...], g))
  calls["batch weight gradient"] = (weight_gradient, (x, g))
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
