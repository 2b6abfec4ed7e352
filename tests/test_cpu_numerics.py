"""XLA:CPU's float32 paths against float64 (experiments/cpu_numerics.py, docs/cpu_numerics.md).

Every path must stay within the worst-case bound of float32 arithmetic in any order: over
it, a path computes a wrong result, and the failure names the path and by how much. Under
it the paths differ only in accuracy; the project's BatchNorm uses the two-pass variance,
the form that is accurate on all of them.
"""

import os
import sys

import pytest
from conftest import REPO_ROOT

from lplgrad_jax import xla_flags

sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))
import cpu_numerics  # noqa: E402

pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module")
def this_path():
  """The path this process runs on: the project's (lplgrad_jax/xla_flags.py), imported by
  conftest before JAX started; CI runs the numerics tests again under AVX2."""
  return cpu_numerics.measure()


def test_this_path_within_the_worst_case_bounds(this_path):
  over = {case: r for case, r in this_path.items() if r["of_bound"] > 1}
  assert not over, f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}: {over}"


def test_two_pass_variance_is_the_accurate_form(this_path):
  # The data's mean is twice its spread (as after a ReLU): E[x^2] = 5 var, so the error of
  # E[x^2] - E[x]^2 is that of a sum five times the variance (measured: 8x to 37x the
  # two-pass error, by path); the largest over 64 channels shows it.
  two_pass = this_path["variance two-pass"]["error"]
  fast = this_path["variance E[x^2]-E[x]^2"]["error"]
  assert two_pass < fast, (two_pass, fast)


def test_division_by_a_constant_is_within_one_and_a_half_ulp(this_path):
  # XLA rewrites x / 255 as x * (1 / 255): not IEEE division, on every machine alike.
  result = this_path["x / 255 (bound 1.5 ulp)"]
  assert result["of_bound"] <= 1 and 0 <= result["not_ieee"] < 1


def test_the_project_path_is_what_the_package_sets():
  # This process measures it in-process (conftest imported the package before JAX started).
  assert cpu_numerics.PATHS["project"] == f"{xla_flags.FLAG}={xla_flags.VALUE}"
  assert cpu_numerics.PATHS["project"] in os.environ["XLA_FLAGS"].split()


@pytest.mark.parametrize("path", [p for p in cpu_numerics.PATHS if p != "project"])
def test_other_paths_within_the_worst_case_bounds(path):
  measured = cpu_numerics.measure_path(cpu_numerics.PATHS[path])
  if isinstance(measured, str) and "Unknown flag" in measured:
    pytest.skip(f"this jaxlib has no such path: {measured}")
  assert isinstance(measured, dict), measured
  over = {case: r for case, r in measured.items() if r["of_bound"] > 1}
  assert not over, f"path {path} ({cpu_numerics.PATHS[path]!r}): {over}"
