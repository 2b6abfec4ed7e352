"""The training gap's convolutions: XLA:CPU in NHWC and NCHW against PyTorch, layer by layer.

  python experiments/conv_layout.py --width=64 --batch=64 \
      --out=experiments/results/conv_layout_w64_b64.json

For every 3x3 convolution shape of a CIFAR ResNet-18 of --width at --batch images: one
forward and backward (gradients of the input and the kernel) under jax.jit with the
activations in NHWC (the project's layout) and in NCHW, and the same in PyTorch (NCHW,
oneDNN) when torch is installed; interleaved rounds, medians, milliseconds. Then the
first stride-2 layer split into its forward, input gradient and kernel gradient.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import measure  # noqa: E402 - the timing, shared with bench.py and query_profile.py

from lplgrad_jax import reporting  # noqa: E402 - also its XLA:CPU setting (xla_flags.py)

_WIDTH = flags.DEFINE_integer("width", 64, "ResNet-18 width.")
_BATCH = flags.DEFINE_integer("batch", 64, "Images per call.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Interleaved timed rounds (median).")
_OUT = flags.DEFINE_string("out", None, "JSON path (a .md table is written beside it).")


def _jax_step(layout, stride):
  numbers = ("NHWC", "HWIO", "NHWC") if layout == "NHWC" else ("NCHW", "OIHW", "NCHW")

  @jax.jit
  def step(x, k):
    conv = lambda x, k: jnp.sum(
      jax.lax.conv_general_dilated(
        x, k, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=numbers
      )
      ** 2
    )
    return jax.grad(conv, argnums=(0, 1))(x, k)

  return lambda x, k: jax.block_until_ready(step(x, k))


def _torch_step(stride):
  import torch

  def step(x, k):
    x.grad = k.grad = None
    torch.sum(torch.nn.functional.conv2d(x, k, stride=stride, padding=1) ** 2).backward()

  return step


def _median_ms(fn, *args) -> float:
  return measure.median_ms(fn, *args, rounds=_ROUNDS.value)


def _parts(side, c_in, c_out, stride, n):
  """Forward, input gradient and kernel gradient of one layer, XLA NHWC and PyTorch."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, side, side, c_in), np.float32)
  k = rng.standard_normal((3, 3, c_in, c_out), np.float32)
  g = np.ones((n, side // stride, side // stride, c_out), np.float32)
  numbers = ("NHWC", "HWIO", "NHWC")
  conv = lambda x, k: jax.lax.conv_general_dilated(
    x, k, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=numbers
  )
  parts = {
    "jax_forward": _median_ms(jax.jit(conv), x, k),
    "jax_input_gradient": _median_ms(
      jax.jit(lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0]), x, k, g
    ),
    "jax_kernel_gradient": _median_ms(
      jax.jit(lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0]), x, k, g
    ),
  }
  try:
    import torch
  except ImportError:
    return parts
  xt, kt = torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(k.transpose(3, 2, 0, 1))
  gt = torch.tensor(g.transpose(0, 3, 1, 2))
  grad = torch.nn.grad
  parts["torch_forward"] = _median_ms(
    lambda: torch.nn.functional.conv2d(xt, kt, stride=stride, padding=1)
  )
  parts["torch_input_gradient"] = _median_ms(
    lambda: grad.conv2d_input(xt.shape, kt, gt, stride=stride, padding=1)
  )
  parts["torch_kernel_gradient"] = _median_ms(
    lambda: grad.conv2d_weight(xt, kt.shape, gt, stride=stride, padding=1)
  )
  return parts


def _layers(width):
  """(side, in, out, stride, count) of the 3x3 convolutions of a CIFAR ResNet-18."""
  rows = [(32, width, width, 1, 4)]
  for stage in range(1, 4):
    side, c = 32 >> (stage - 1), width << (stage - 1)
    rows += [(side, c, 2 * c, 2, 1), (side // 2, 2 * c, 2 * c, 1, 3)]
  return rows


def _layer(side, c_in, c_out, stride, n):
  rng = np.random.default_rng(side + c_in)
  x = rng.standard_normal((n, side, side, c_in), np.float32)
  k = rng.standard_normal((3, 3, c_in, c_out), np.float32) * 0.1
  calls = {
    "jax_nhwc": (_jax_step("NHWC", stride), (jnp.asarray(x), jnp.asarray(k))),
    "jax_nchw": (
      _jax_step("NCHW", stride),
      (jnp.asarray(x.transpose(0, 3, 1, 2)), jnp.asarray(k.transpose(3, 2, 0, 1))),
    ),
  }
  try:
    import torch

    calls["torch_nchw"] = (
      _torch_step(stride),
      (
        torch.tensor(x.transpose(0, 3, 1, 2)).requires_grad_(),
        torch.tensor(k.transpose(3, 2, 0, 1)).requires_grad_(),
      ),
    )
  except ImportError:
    pass
  return measure.interleaved_median_ms(calls, _ROUNDS.value)


def main(_):
  n, width = _BATCH.value, _WIDTH.value
  rows = []
  for side, c_in, c_out, stride, count in _layers(width):
    rows.append({"layer": f"{side}x{side} {c_in}->{c_out} s{stride}", "count": count})
    rows[-1].update(_layer(side, c_in, c_out, stride, n))
  names = [k for k in rows[0] if k not in ("layer", "count")]
  totals = {name: sum(r[name] * r["count"] for r in rows) for name in names}
  lines = [
    f"Machine: {reporting.cpu_description()}, jax {jax.__version__}. 3x3 convolutions of a "
    f"ResNet-18 of width {width}, batch {n}: forward + backward (input and kernel gradients), "
    f"ms, medians of {_ROUNDS.value} interleaved rounds.",
    "",
    "| layer | count | " + " | ".join(names) + " |",
    "|---|---|" + "---|" * len(names),
  ]
  lines += [
    f"| {r['layer']} | {r['count']} | " + " | ".join(f"{r[k]:.2f}" for k in names) + " |"
    for r in rows
  ]
  lines.append("| all (x count) | | " + " | ".join(f"{totals[k]:.1f}" for k in names) + " |")
  split = next(r for r in _layers(width) if r[3] == 2)
  parts = _parts(*split[:4], n)
  lines += ["", f"The first stride-2 layer ({rows[1]['layer']}) by part, ms:", ""]
  lines += ["| part | ms |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in parts.items()]
  text = "\n".join(lines) + "\n"
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      result = {"layers": rows, "totals_ms": totals, "stride_2_parts_ms": parts}
      json.dump(result, f, indent=1, allow_nan=False)
    with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
      f.write(text)


if __name__ == "__main__":
  app.run(main)
