"""How accurate XLA:CPU's float32 arithmetic is on each of its code paths (docs/cpu_numerics.md).

Pure jax.lax / jax.numpy at the shapes of a width-64 ResNet-18 on a batch of 8 CIFAR images,
each against the same computation in float64 (NumPy), under each XLA:CPU path:

  default      XLA's defaults (YNNPACK takes reductions and convolutions where it can)
  project      what lplgrad_jax sets (lplgrad_jax/xla_flags.py): YNNPACK for reductions only
  avx2         --xla_cpu_max_isa=AVX2: LLVM code generation limited to AVX2, as on a CPU
               without AVX-512 (YNNPACK picks its kernels by CPUID regardless)
  no_ynn       --xla_cpu_experimental_ynn_fusion_type= : XLA's own loops and Eigen
  no_ynn_avx2  both

Each error is reported against the classical worst-case bound of float32 summation in any
order, gamma_n * sum|terms| (gamma_n = n u / (1 - n u), u = 2^-24): a path over its bound
computes a wrong result; under it, paths differ only in how much of the bound they use.

  python experiments/cpu_numerics.py [--out=experiments/results/cpu_numerics.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

PATHS = {
  "default": "",
  # lplgrad_jax's own (lplgrad_jax/xla_flags.py): YNNPACK for reductions only
  "project": "--xla_cpu_experimental_ynn_fusion_type=reduce",
  "avx2": "--xla_cpu_max_isa=AVX2",
  "no_ynn": "--xla_cpu_experimental_ynn_fusion_type=",
  "no_ynn_avx2": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_max_isa=AVX2",
}
U = 2.0**-24  # float32 unit roundoff


def _gamma(n: int) -> float:
  return n * U / (1 - n * U)


def _post_relu_like(rng, shape) -> np.ndarray:
  """Activations whose mean is twice their spread, as after a ReLU and a residual sum."""
  return (rng.standard_normal(shape) * 0.5 + 1.0).astype(np.float32)


def measure() -> dict[str, dict[str, float]]:
  """{case: {"error": largest relative error, "of_bound": largest |error| / worst-case bound}}
  of this process's XLA:CPU path (set XLA_FLAGS before calling)."""
  import jax
  import jax.numpy as jnp

  rng = np.random.default_rng(0)
  out = {}

  def record(name, actual, expected, bound):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    error = np.abs(actual - expected)
    out[name] = {
      "error": float(np.max(error) / np.max(np.abs(expected))),
      "of_bound": float(np.max(error / np.maximum(bound, 1e-300))),
    }

  # A 3x3 convolution, 64 -> 64 channels at 32x32 (stage 1 of the width-64 ResNet-18).
  x = _post_relu_like(rng, (8, 32, 32, 64))
  w = (rng.standard_normal((3, 3, 64, 64)) / 24).astype(np.float32)
  conv = lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  y32 = jax.jit(conv)(x, w)
  with jax.enable_x64(True):
    y64 = np.asarray(jax.jit(conv)(jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64)))
    y_abs = np.asarray(
      jax.jit(conv)(jnp.abs(jnp.asarray(x, jnp.float64)), jnp.abs(jnp.asarray(w, jnp.float64)))
    )
  record("conv 3x3 64->64 at 32x32", y32, y64, _gamma(9 * 64) * y_abs)

  # BatchNorm's statistics over (N, H, W) = 8192 values per channel.
  x64 = x.astype(np.float64)
  n = x[..., 0].size
  mean64, var64 = x64.mean((0, 1, 2)), x64.var((0, 1, 2))
  mean32 = jax.jit(lambda x: jnp.mean(x, (0, 1, 2)))(x)
  record("mean of 8192", mean32, mean64, _gamma(n) * np.abs(x64).mean((0, 1, 2)))
  # E[x^2] - E[x]^2 (Flax's default) against mean((x - mean)^2) (PyTorch's, and ours):
  # the first cancels to var from E[x^2] = var + mean^2, so its bound scales with E[x^2].
  fast = jax.jit(lambda x: jnp.mean(x * x, (0, 1, 2)) - jnp.mean(x, (0, 1, 2)) ** 2)(x)
  two_pass = jax.jit(lambda x: jnp.mean(jnp.square(x - jnp.mean(x, (0, 1, 2))), (0, 1, 2)))(x)
  squares = (x64 * x64).mean((0, 1, 2))
  record("variance E[x^2]-E[x]^2", fast, var64, 3 * _gamma(n) * squares)
  record("variance two-pass", two_pass, var64, 3 * _gamma(n) * squares)

  # Division by the constant 255 (image normalisation): XLA multiplies by the rounded
  # reciprocal, not IEEE division (0.5 ulp): up to 1.5 ulp, on every path.
  pixels = np.arange(256, dtype=np.float32)
  divided = jax.jit(lambda p: p / 255.0)(pixels)
  ieee = pixels / np.float32(255)
  case = "x / 255 (bound 1.5 ulp)"
  record(case, divided, pixels.astype(np.float64) / 255, 1.5 * np.spacing(ieee))
  out[case]["not_ieee"] = float(np.mean(np.asarray(divided) != ieee))
  return out


def measure_path(flags: str) -> dict | str:
  """measure() in a fresh process under XLA_FLAGS=flags; a string says why it could not."""
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(
    [sys.executable, os.path.abspath(__file__), "--measure"],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  if proc.returncode != 0:
    lines = (proc.stderr.strip() or "no output").splitlines()
    return lines[-1][:200]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--measure", action="store_true", help="measure this process's path only")
  parser.add_argument("--out", help="write the table as JSON here")
  args = parser.parse_args()
  if args.measure:
    print(json.dumps(measure()))
    return
  import jax

  results = {"jax": jax.__version__, "paths": {}}
  for name, flags in PATHS.items():
    measured = measure_path(flags)
    results["paths"][name] = {"XLA_FLAGS": flags, "results": measured}
    if isinstance(measured, str):
      print(f"{name}: unavailable ({measured})")
      continue
    print(f"{name} (XLA_FLAGS={flags!r}):")
    for case, r in measured.items():
      print(f"  {case:28s} relative error {r['error']:.1e}   {r['of_bound']:.3f} of its bound")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2, allow_nan=False)
      f.write("\n")


if __name__ == "__main__":
  main()
