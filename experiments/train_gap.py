"""Two measurements behind the CPU training gap to PyTorch (bench_cpu.md, issue #23).

  python experiments/train_gap.py --width=64 --batch=64 \
      --out=experiments/results/train_gap_w64_b64.json

1. BatchNorm's share: a training-mode forward+backward (cross-entropy) of the CIFAR ResNet-18,
   with its BatchNorm layers and with them replaced by the identity, in JAX and in PyTorch
   eager (medians of interleaved calls). If XLA's BatchNorm cost more than PyTorch's, the gap
   would be there; otherwise it is in the convolutions and what feeds them.
2. The kernel gradient of a 3x3 stride-1 convolution two ways, exact: XLA's (the transpose
   rule of `lax.conv_general_dilated`, which XLA:CPU runs as a convolution whose operands it
   first copies into a transposed layout) and nine per-offset matrix products over the NHWC
   activations, which need no such copy. Medians of interleaved calls, and their difference.
3. With --remat: the first forward+backward with the loss under `jax.checkpoint` and each of
   these policies (`jax.checkpoint_policies`), which decide what the backward pass recomputes
   and so what XLA's copies for the kernel gradients are built from.
A .md table is written beside the JSON.
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import measure  # noqa: E402

from lplgrad_jax import layer_hooks  # noqa: E402
from lplgrad_jax import models  # noqa: E402 - also sets the project's XLA:CPU flag
from lplgrad_jax import reporting  # noqa: E402

_WIDTH = flags.DEFINE_integer("width", 64, "ResNet-18 width.")
_BATCH = flags.DEFINE_integer("batch", 64, "Images per call.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Interleaved timed rounds (median).")
_OUT = flags.DEFINE_string("out", None, "JSON path (a .md table is written beside it).")
_REMAT = flags.DEFINE_list("remat", [], "jax.checkpoint_policies to time the step under.")


def _jax_step(images, labels, with_batch_norm: bool, remat: str | None = None):
  model = models.ResNet18(10, width=_WIDTH.value, rngs=nnx.Rngs(0))
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  norms = tuple({type(m) for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)})

  @jax.jit
  def grads(params, rest, x, y):
    def loss(p):
      learner = nnx.merge(graphdef, p, rest, copy=True)
      if with_batch_norm:
        logits, _ = learner(x)
      else:
        with layer_hooks.intercept(learner, norms, lambda layer, call, args, kwargs: args[0]):
          logits, _ = learner(x)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return ce, nnx.state(learner, nnx.BatchStat)

    if remat:
      loss = jax.checkpoint(loss, policy=getattr(jax.checkpoint_policies, remat))
    return jax.value_and_grad(loss, has_aux=True)(params)

  return grads, (params, rest, jnp.asarray(images), jnp.asarray(labels))


def _torch_steps(images, labels, rounds: int) -> dict:
  import torch
  import torch.nn.functional as F
  import torch_reference
  from torch import nn

  torch.set_num_threads(os.cpu_count())
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(labels.astype(np.int64))
  nets = {}
  for name, with_batch_norm in (("torch", True), ("torch_no_batch_norm", False)):
    net = torch_reference.ResNet18(10, _WIDTH.value).train()
    for module in list(net.modules()) if not with_batch_norm else ():
      for child_name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
          setattr(module, child_name, nn.Identity())
    nets[name] = net

  def step(net):
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(x)[0], y).backward()

  times = {name: [] for name in nets}
  for net in nets.values():
    step(net)
  for _ in range(rounds):
    for name, net in nets.items():
      start = time.perf_counter()
      step(net)
      times[name].append(time.perf_counter() - start)
  return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


_xla_kernel_gradient = jax.jit(measure.kernel_gradient)


@jax.jit
def _offset_kernel_gradient(x, w, g):
  del w
  height, width = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.stack(
    [
      jnp.stack(
        [jnp.einsum("bhwc,bhwd->cd", padded[:, i : i + height, j : j + width], g) for j in range(3)]
      )
      for i in range(3)
    ]
  )


def _kernel_gradients(rounds: int) -> list:
  rows, width, batch = [], _WIDTH.value, _BATCH.value
  for size, channels in ((32, width), (16, 2 * width), (8, 4 * width)):
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (batch, size, size, channels))
    w = 0.05 * jax.random.normal(keys[1], (3, 3, channels, channels))
    g = jax.random.normal(keys[2], (batch, size, size, channels))
    xla, offsets = _xla_kernel_gradient(x, w, g), _offset_kernel_gradient(x, w, g)
    error = float(jnp.max(jnp.abs(xla - offsets)) / jnp.max(jnp.abs(xla)))
    ms = measure.interleaved_median_ms(
      {"xla": (_xla_kernel_gradient, (x, w, g)), "offsets": (_offset_kernel_gradient, (x, w, g))},
      rounds,
    )
    rows.append({"layer": f"{size}x{size} {channels}->{channels}", **ms, "relative_diff": error})
  return rows


def main(_):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(_BATCH.value, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 10, _BATCH.value).astype(np.int32)
  steps = measure.interleaved_median_ms(
    {
      "jax": _jax_step(images, labels, True),
      "jax_no_batch_norm": _jax_step(images, labels, False),
      **{f"jax_remat_{p}": _jax_step(images, labels, True, p) for p in _REMAT.value},
    },
    _ROUNDS.value,
  )
  steps.update(_torch_steps(images, labels, _ROUNDS.value))
  report = {
    "machine": reporting.cpu_description(),
    "jax_version": jax.__version__,
    "width": _WIDTH.value,
    "batch": _BATCH.value,
    "forward_backward_ms": steps,
    "kernel_gradient_ms": _kernel_gradients(_ROUNDS.value),
  }
  print(json.dumps(report, indent=1))
  if not _OUT.value:
    return
  with open(_OUT.value, "w") as f:
    json.dump(report, f, indent=1, allow_nan=False)
  s = steps
  kernel_rows = [
    f"| {r['layer']} | {r['xla']:.1f} | {r['offsets']:.1f} | {r['relative_diff']:.1e} |"
    for r in report["kernel_gradient_ms"]
  ]
  with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
    f.write(
      f"Machine: {report['machine']}, jax {jax.__version__}. ResNet-18 width {_WIDTH.value}, "
      f"batch {_BATCH.value}; medians of {_ROUNDS.value} interleaved calls, ms.\n\n"
      "Training-mode forward+backward (cross-entropy):\n\n"
      "| | with BatchNorm | BatchNorm as identity | BatchNorm's share |\n|---|---|---|---|\n"
      f"| JAX | {s['jax']:.1f} | {s['jax_no_batch_norm']:.1f} | "
      f"{s['jax'] - s['jax_no_batch_norm']:.1f} |\n"
      f"| PyTorch eager | {s['torch']:.1f} | {s['torch_no_batch_norm']:.1f} | "
      f"{s['torch'] - s['torch_no_batch_norm']:.1f} |\n"
      f"| JAX / PyTorch speed | {s['torch'] / s['jax']:.2f}x | "
      f"{s['torch_no_batch_norm'] / s['jax_no_batch_norm']:.2f}x | |\n\n"
      "Kernel gradient of a 3x3 stride-1 convolution (forward not included):\n\n"
      "| layer | XLA (transposed copies + convolution) | nine per-offset products | "
      "relative difference |\n|---|---|---|---|\n" + "\n".join(kernel_rows) + "\n"
    )
    if _REMAT.value:
      f.write(
        "\nThe first forward+backward with the loss under jax.checkpoint:\n\n"
        "| policy | ms | / without |\n|---|---|---|\n"
        + "".join(
          f"| {p} | {s['jax_remat_' + p]:.1f} | {s['jax_remat_' + p] / s['jax']:.2f}x |\n"
          for p in _REMAT.value
        )
      )


if __name__ == "__main__":
  app.run(main)
