"""Where the fast query's time goes, layer by layer, against what a plain backward pays.

  python experiments/query_profile.py --width=64 --batch=64 \
      --out=experiments/results/query_profile_w64_b64_loop_intel.json
  python experiments/query_profile.py --width=16,32,64 --batch=32,64,128 --nolayers \
      --out=experiments/results/query_grid_intel.json
  python experiments/query_profile.py --width=16,64 --batch=32,128 --nolayers --steps=1,2,4,8 \
      --out=experiments/results/query_steps_intel.json

The query ("fast", pergrad) costs a forward pass, a backward pass to every layer's output,
and per layer and example the squared norm of that example's kernel gradient. A plain
forward+backward (bench.py's floor) pays the same passes and, instead of the per-example
norms, one weight gradient per layer summed over the batch. For every convolution shape of a
CIFAR ResNet-18 of each width at each batch (--layers), this script times both of those last
parts in isolation on random inputs: `pergrad`'s per-example squared norm (the route it
chooses: per-offset products or the Gram form), over the whole batch at once and in the CPU's
steps of `pergrad.CPU_EXAMPLES_PER_STEP` examples, and the batch weight gradient; where the
route is the products, both do the same multiply-adds, so their rates compare the two ways of
running them. For the whole model it times the floor, the query's passes without the norms,
and the whole query with its norms taken both ways (the whole batch at once is what pergrad
did on every platform before 2026-12-07), and with --steps at other numbers of images per step.
"""

import os
import sys
from unittest import mock

import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import measure  # noqa: E402 - the timing, shared with bench.py and conv_layout.py

from lplgrad_jax import models  # noqa: E402
from lplgrad_jax import pergrad  # noqa: E402
from lplgrad_jax import query  # noqa: E402
from lplgrad_jax import reporting  # noqa: E402
from lplgrad_jax.configs import default  # noqa: E402
from lplgrad_jax.pergrad import ghost_norm  # noqa: E402
from lplgrad_jax.pergrad import passes  # noqa: E402

_WIDTHS = flags.DEFINE_list("width", ["16"], "ResNet-18 width, or widths (a grid with --batch).")
_BATCHES = flags.DEFINE_list("batch", ["128"], "Images per call, or several.")
_STEPS = flags.DEFINE_list("steps", [], "Also time the whole query at these images per CPU step.")
_LAYERS = flags.DEFINE_bool("layers", True, "Also time every convolution shape on its own.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per measurement (median).")
_OUT = flags.DEFINE_string("out", None, "JSON path (a .md table is written beside it).")


def _conv_shapes(width):
  """(side, in, out, kernel, stride, count) of every convolution of a CIFAR ResNet-18."""
  shapes = [(32, 3, width, 3, 1, 1), (32, width, width, 3, 1, 4)]
  for stage in range(1, 4):
    side, c = 32 >> (stage - 1), width << (stage - 1)
    shapes += [(side, c, 2 * c, 3, 2, 1), (side, c, 2 * c, 1, 2, 1)]  # first conv, shortcut
    shapes += [(side // 2, 2 * c, 2 * c, 3, 1, 3)]
  return shapes


def _whole_batch_at_once():
  """While tracing, pergrad takes its norms over the whole batch at once on the CPU too (its
  branch for accelerators): the query as it was before the CPU's loop."""
  return mock.patch.object(jax.lax, "platform_dependent", lambda *a, default, **_: default(*a))


def _layer_row(side, c_in, c_out, kernel, stride, count, n):
  conv = nnx.Conv(c_in, c_out, (kernel, kernel), strides=stride, use_bias=False, rngs=nnx.Rngs(0))
  key = jax.random.key(side * c_in + kernel)
  x = jax.random.normal(key, (n, side, side, c_in))
  g = jax.random.normal(key, (n, side // stride, side // stride, c_out))

  def norm(xi, gi):
    return ghost_norm.squared_norm([measure.kernel_rule(conv, xi, gi)])

  @jax.jit
  def whole_batch(x, g):
    return jax.vmap(norm)(x, g)

  cpu_steps = jax.jit(measure.in_steps(norm, pergrad.CPU_EXAMPLES_PER_STEP))

  @jax.jit
  def batch_weight_gradient(x, g):
    return measure.kernel_gradient(x, conv.kernel[...], g, stride, conv.padding)

  tokens = (side // stride) ** 2
  gram = pergrad.gram_is_cheaper(tokens, kernel * kernel * c_in, c_out)
  calls = {
    "per_example_whole_batch_ms": (whole_batch, (x, g)),
    "per_example_cpu_steps_ms": (cpu_steps, (x, g)),
    "batch_weight_gradient_ms": (batch_weight_gradient, (x, g)),
  }
  return {
    "layer": f"{side}x{side} {c_in}->{c_out} k{kernel} s{stride}",
    "count": count,
    "route": "Gram" if gram else "per-offset products",
    # The products' and the batch weight gradient's multiply-adds, x2 for flops.
    "gflop": 2 * n * tokens * kernel * kernel * c_in * c_out / 1e9,
    **measure.interleaved_median_ms(calls, _REPEATS.value),
  }


def _model_row(width, n):
  config = default.get_config()
  config.model.width = width
  learner = models.create_learner(config.model, 10, use_aux=False, key=jax.random.key(0))
  graphdef, params, rest = nnx.split(pergrad.inference_view(learner.classifier), nnx.Param, ...)
  x = jax.random.normal(jax.random.key(1), (n, 32, 32, 3))
  entropy = query.output_entropy

  @jax.jit
  def floor(params, rest, x):
    loss = lambda p: jnp.sum(entropy(nnx.merge(graphdef, p, rest)(x)))
    return jax.grad(loss)(params)

  @jax.jit
  def capture_pass(params, rest, x):
    plan = pergrad.make_plan(graphdef, params, rest, x[0], pergrad.example_loss(entropy))
    model = nnx.merge(graphdef, params, rest)
    return passes.batched_pass(model, plan, x, entropy)[:2]

  def scores(params, rest, x):
    return pergrad.squared_norms(graphdef, params, rest, x, entropy)

  args = (params, rest, x)
  now = jax.jit(scores).lower(*args).compile()
  with _whole_batch_at_once():  # its own function: jit must not reuse this trace for "query"
    whole_batch = jax.jit(lambda *a: scores(*a)).lower(*args).compile()
  if "while" not in now.as_text() or "while" in whole_batch.as_text():
    raise RuntimeError("expected the CPU's loop in the query and none in the whole-batch one")
  # Interleaved, one call of each per round: this machine's speed drifts between minutes.
  programs = {
    "floor": floor,
    "query_passes": capture_pass,
    "query": now,
    "query_whole_batch": whole_batch,
  }
  for k in _STEPS.value:
    with mock.patch.object(pergrad, "CPU_EXAMPLES_PER_STEP", int(k)):
      programs[f"query_steps_{k}"] = jax.jit(lambda *a: scores(*a)).lower(*args).compile()
  calls = {name: (fn, args) for name, fn in programs.items()}
  return {"width": width, "batch": n, **measure.interleaved_median_ms(calls, _REPEATS.value)}


def _layer_lines(layers) -> list[str]:
  lines = [
    "| convolution | count | route | per-example norms, whole batch | in steps of "
    f"{pergrad.CPU_EXAMPLES_PER_STEP} | batch weight gradient | steps / weight gradient | "
    "GFLOP/s: steps, weight gradient |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in layers:
    steps, wgrad = r["per_example_cpu_steps_ms"], r["batch_weight_gradient_ms"]
    rates = f"{r['gflop'] / steps * 1e3:.0f}, " if r["route"] != "Gram" else "(Gram), "
    lines.append(
      f"| {r['layer']} | {r['count']} | {r['route']} | {r['per_example_whole_batch_ms']:.2f} | "
      f"{steps:.2f} | {wgrad:.2f} | {steps / wgrad:.1f}x | {rates}{r['gflop'] / wgrad * 1e3:.0f} |"
    )
  return lines


def _model_lines(models_ms) -> list[str]:
  lines = [
    "| width | batch | floor | query passes | query, norms in steps (now on the CPU) | "
    "query, norms over the whole batch (before) | floor / query: now, before |",
    "|---|---|---|---|---|---|---|",
  ]
  for m in models_ms:
    lines.append(
      f"| {m['width']} | {m['batch']} | {m['floor']:.1f} | {m['query_passes']:.1f} | "
      f"{m['query']:.1f} | {m['query_whole_batch']:.1f} | {m['floor'] / m['query']:.2f}x, "
      f"{m['floor'] / m['query_whole_batch']:.2f}x |"
    )
  return lines


def _steps_lines(models_ms) -> list[str]:
  steps = [k for k in models_ms[0] if k.startswith("query_steps_")]
  if not steps:
    return []
  head = " | ".join(f"{k.removeprefix('query_steps_')} per step" for k in steps)
  lines = ["", f"| width | batch | {head} |", "|---|---|" + "---|" * len(steps)]
  for m in models_ms:
    cells = " | ".join(f"{m[k]:.1f}" for k in steps)
    lines.append(f"| {m['width']} | {m['batch']} | {cells} |")
  return lines


def _markdown(result) -> str:
  lines = [
    f"Machine: {result['machine']}. Median of {result['repeats']} calls, interleaved, "
    "milliseconds. Whole model: the floor is a forward+backward with weight gradients; the "
    "query's passes are its forward+backward to every layer's output, without weight gradients.",
    "",
    *_model_lines(result["models"]),
    *_steps_lines(result["models"]),
  ]
  for shape in result["layers"]:
    lines += ["", f"Width {shape['width']}, batch {shape['batch']}, each convolution:", ""]
    lines += _layer_lines(shape["rows"])
  return "\n".join(lines) + "\n"


def main(_):
  shapes = [(int(w), int(n)) for w in _WIDTHS.value for n in _BATCHES.value]
  layers = []
  if _LAYERS.value:
    for width, n in shapes:
      rows = [_layer_row(*shape, n) for shape in _conv_shapes(width)]
      layers.append({"width": width, "batch": n, "rows": rows})
  result = {
    "machine": f"{reporting.cpu_description()}, jax {jax.__version__}",
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "repeats": _REPEATS.value,
    "models": [_model_row(width, n) for width, n in shapes],
    "layers": layers,
  }
  text = _markdown(result)
  print(text)
  if _OUT.value:
    measure.write_result(_OUT.value, result, text)


if __name__ == "__main__":
  app.run(main)
