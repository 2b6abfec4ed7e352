"""Where the fast query's time goes, layer by layer, against what a plain backward pays.

  python experiments/query_profile.py --width=16 --batch=128 \
      --out=experiments/results/query_profile_w16_b128.json

The query ("fast", pergrad) costs a forward pass, a backward pass to every layer's output,
and per layer and example the squared norm of that example's kernel gradient. A plain
forward+backward (bench.py's floor) pays the same passes and, instead of the per-example
norms, one weight gradient per layer summed over the batch. This script times, for every
convolution shape of a CIFAR ResNet-18 of --width at --batch images, both of those last
parts in isolation on random inputs: `pergrad`'s per-example squared norm (the route it
chooses: per-offset products or the Gram form) and the batch weight gradient, and also the
whole model: floor, the query's passes without the norms, and the whole query.
"""

import json
import os
import sys

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
from lplgrad_jax.pergrad import layer_rules  # noqa: E402
from lplgrad_jax.pergrad import passes  # noqa: E402

_WIDTH = flags.DEFINE_integer("width", 16, "ResNet-18 width.")
_BATCH = flags.DEFINE_integer("batch", 128, "Images per call.")
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


def _layer_row(side, c_in, c_out, kernel, stride, count, n):
  conv = nnx.Conv(c_in, c_out, (kernel, kernel), strides=stride, use_bias=False, rngs=nnx.Rngs(0))
  key = jax.random.key(side * c_in + kernel)
  x = jax.random.normal(key, (n, side, side, c_in))
  g = jax.random.normal(key, (n, side // stride, side // stride, c_out))

  @jax.jit
  def per_example(x, g):
    norm = lambda xi, gi: ghost_norm.squared_norm(
      [layer_rules.closed_form(conv, nnx.Conv.__call__, (xi[None],), {}, gi[None])["kernel"]]
    )
    return jax.vmap(norm)(x, g)

  @jax.jit
  def batch_weight_gradient(x, g):
    return jax.vjp(
      lambda k: jax.lax.conv_general_dilated(
        x, k, (stride, stride), conv.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
      ),
      conv.kernel[...],
    )[1](g)[0]

  gram = pergrad.gram_is_cheaper((side // stride) ** 2, kernel * kernel * c_in, c_out)
  return {
    "layer": f"{side}x{side} {c_in}->{c_out} k{kernel} s{stride}",
    "count": count,
    "route": "Gram" if gram else "per-offset products",
    "per_example_norms_ms": measure.median_ms(per_example, x, g, rounds=_REPEATS.value),
    "batch_weight_gradient_ms": measure.median_ms(
      batch_weight_gradient, x, g, rounds=_REPEATS.value
    ),
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

  @jax.jit
  def scores(params, rest, x):
    return pergrad.squared_norms(graphdef, params, rest, x, entropy)

  # Interleaved, one call of each per round: this machine's speed drifts between minutes.
  programs = {"floor": floor, "query_passes": capture_pass, "query": scores}
  calls = {name: (fn, (params, rest, x)) for name, fn in programs.items()}
  return measure.interleaved_median_ms(calls, _REPEATS.value)


def _markdown(result) -> str:
  model = result["model_ms"]
  lines = [
    f"Machine: {result['machine']}. ResNet-18 width {result['width']}, batch {result['batch']}, "
    f"median of {result['repeats']} calls (the whole-model ones interleaved), milliseconds.",
    "",
    f"Whole model: floor (forward+backward with weight gradients) {model['floor']:.1f}; query "
    f"passes (forward+backward to every layer's output, no weight gradients) "
    f"{model['query_passes']:.1f}; whole query {model['query']:.1f}. So the per-example norms "
    f"cost {model['query'] - model['query_passes']:.1f} where the floor's weight gradients cost "
    f"{model['floor'] - model['query_passes']:.1f}.",
    "",
    "| convolution | count | route | per-example norms | batch weight gradient | ratio |",
    "|---|---|---|---|---|---|",
  ]
  for r in result["layers"]:
    lines.append(
      f"| {r['layer']} | {r['count']} | {r['route']} | {r['per_example_norms_ms']:.2f} | "
      f"{r['batch_weight_gradient_ms']:.2f} | "
      f"{r['per_example_norms_ms'] / r['batch_weight_gradient_ms']:.1f}x |"
    )
  return "\n".join(lines) + "\n"


def main(_):
  n, width = _BATCH.value, _WIDTH.value
  result = {
    "machine": f"{reporting.cpu_description()}, jax {jax.__version__}",
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "width": width,
    "batch": n,
    "repeats": _REPEATS.value,
    "layers": [_layer_row(*shape, n) for shape in _conv_shapes(width)],
    "model_ms": _model_row(width, n),
  }
  text = _markdown(result)
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1, allow_nan=False)
    with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
      f.write(text)


if __name__ == "__main__":
  app.run(main)
