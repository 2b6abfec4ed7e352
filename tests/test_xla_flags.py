"""The XLA:CPU setting the package applies when imported (lplgrad_jax/xla_flags.py)."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
from conftest import REPO_ROOT
from conftest import built
from conftest import cli_env
from flax import nnx

from lplgrad_jax import models
from lplgrad_jax import pergrad
from lplgrad_jax import xla_flags

SETTING = f"{xla_flags.FLAG}={xla_flags.VALUE}"


def test_added_to_other_flags_and_never_over_the_users():
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  assert xla_flags.apply(environ, (0, 10, 2)) == SETTING
  assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=4 {SETTING}"
  assert xla_flags.apply(environ, (0, 10, 2)) is None  # once
  assert environ["XLA_FLAGS"].count(xla_flags.FLAG) == 1

  empty = {}
  assert xla_flags.apply(empty, (0, 11, 0)) == SETTING and empty["XLA_FLAGS"] == SETTING
  for users in (f"{xla_flags.FLAG}=", f"--xla_cpu_max_isa=AVX2 {xla_flags.FLAG}=reduce,dot"):
    environ = {"XLA_FLAGS": users}
    assert xla_flags.apply(environ, (0, 10, 2)) is None and environ["XLA_FLAGS"] == users
  older = {}  # a jaxlib not measured might not know the flag, and XLA exits on unknown ones
  assert xla_flags.apply(older, (0, 10, 1)) is None and older == {}


def _library_ops(hlo: str) -> set:
  """The operations inside the computations that YNNPACK fusions of `hlo` call."""
  bodies, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and "=" not in line.split("{")[0]:
      name, bodies[head.group(1)] = head.group(1), []
    elif name:
      bodies[name].append(line)
  ops = set()
  for line in hlo.splitlines():
    if '"__ynn_fusion"' in line:
      for inner in bodies.get(re.search(r"calls=%?([\w.\-]+)", line).group(1), []):
        op = re.search(r"=\s*\S+\s+([a-z\-]+)\(", inner)
        ops.update([op.group(1)] if op else [])
  return ops


def resnet_gradient_library_ops() -> list:
  """YNNPACK's share of a width-8 ResNet-18's gradient program, as this process compiles it."""
  model = built(models.ResNet18, 10, width=8)
  graphdef, params, rest = nnx.split(pergrad.inference_view(model), nnx.Param, ...)
  loss = lambda p, x: jnp.mean(jax.nn.logsumexp(nnx.merge(graphdef, p, rest)(x)[0], -1))
  hlo = jax.jit(jax.grad(loss)).lower(params, jnp.ones((4, 32, 32, 3))).compile().as_text()
  return sorted(_library_ops(hlo))


_PRINT_LIBRARY_OPS = (
  "import json, test_xla_flags as t; print(json.dumps(t.resnet_gradient_library_ops()))"
)


def test_convolutions_and_dots_left_to_xla_reductions_to_ynnpack():
  assert SETTING in os.environ["XLA_FLAGS"].split()  # conftest imported the package first
  ours = resnet_gradient_library_ops()
  assert "reduce" in ours and not {"convolution", "dot"} & set(ours), ours
  # The same program with XLA's defaults gives YNNPACK convolutions and dots as well.
  proc = subprocess.run(
    [sys.executable, "-c", _PRINT_LIBRARY_OPS],
    cwd=os.path.join(REPO_ROOT, "tests"),
    env=cli_env(
      XLA_FLAGS=f"{xla_flags.FLAG}={xla_flags.XLA_DEFAULT}",
      PYTHONPATH=os.pathsep.join([os.path.join(REPO_ROOT, "tests"), REPO_ROOT]),
    ),
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  defaults = json.loads(proc.stdout.strip().splitlines()[-1])
  assert {"convolution", "dot", "reduce"} <= set(defaults), defaults
