"""The XLA:CPU setting lplgrad_jax computes with, applied when the package is imported.

XLA:CPU hands reductions, dots and convolutions to the YNNPACK library by default (jaxlib
0.10.2: `--xla_cpu_experimental_ynn_fusion_type=reduce,individual_dot,individual_convolution`).
Measured on this project's 2-core AVX-512 CPU (experiments/cpu_levers.py, three interleaved
runs each, experiments/results/cpu_levers_*.md): with dots and convolutions left to XLA's own
(Eigen) kernels, the ResNet-18 train step ran 1.20x (width 64, batch 64) and 1.26x (width 16,
batch 128) faster, a plain forward+backward 1.15x and 1.21x, the query as fast or faster; and
XLA's convolutions are at least as accurate against float64 as YNNPACK's, while YNNPACK's
reductions sum up to 30x more accurately than XLA's loops (docs/cpu_numerics.md). So every
entry point (command line, Python API, benchmarks, tests) computes with YNNPACK for
reductions only: the package adds `FLAG` to XLA_FLAGS when imported, before JAX starts a
backend (imported later, it changes nothing). A `FLAG` already in XLA_FLAGS is the user's
choice and is kept; jaxlibs older than the one measured are left at their defaults.
"""

from __future__ import annotations

import importlib.metadata
import os
import re

FLAG = "--xla_cpu_experimental_ynn_fusion_type"
VALUE = "reduce"
XLA_DEFAULT = "reduce,individual_dot,individual_convolution"  # jaxlib 0.10.2's, for comparison
MEASURED_JAXLIB = (0, 10, 2)


def jaxlib_release(version: str | None = None) -> tuple[int, ...] | None:
  """(major, minor, patch) of `version`, by default the installed jaxlib's (read without
  importing it), or None where there is none to read."""
  if version is None:
    try:
      version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
      return None
  release = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
  return tuple(map(int, release.groups())) if release else None


def apply(environ=os.environ, jaxlib_version: tuple[int, ...] | None = None) -> str | None:
  """Adds `FLAG`=`VALUE` to environ["XLA_FLAGS"] unless it sets `FLAG` already or jaxlib
  predates the measured release (whose flag parser might not know it: XLA exits on unknown
  flags). Returns the flag added, or None."""
  current = environ.get("XLA_FLAGS", "")
  version = jaxlib_version or jaxlib_release()
  if version is None or version < MEASURED_JAXLIB:
    return None
  if any(word.split("=", 1)[0] == FLAG for word in current.split()):
    return None
  added = f"{FLAG}={VALUE}"
  environ["XLA_FLAGS"] = f"{current} {added}".strip()
  return added
