"""Where the test suite's CPU time goes: compiling, and which programs.

  python experiments/suite_profile.py --out=experiments/results/suite_profile_intel.json \
      -- -n 2 --dist loadfile --no-loadscope-reorder

runs pytest (the arguments after `--`) with every Python process it starts, the CLI
subprocesses included, recording JAX's compile events and the names of the programs it
compiled (experiments/suite_profile/: a sitecustomize hook, a pytest plugin for per-test
figures). Processes killed with SIGKILL, and those given a PYTHONPATH of their own, are
not counted. Tests that read the compile log themselves (test_startup) may fail under it.
A .md table is written beside the JSON, with the compiles of 0.5 s or more by test (a
subprocess counts for the test named in the environment it was given) and the programs
compiled more than once: the same module compiled again, where no cache was shared. A
process without a persistent compilation cache names no module: its compiles count in the
totals only.
"""

import collections
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import measure  # noqa: E402 - write_result

from lplgrad_jax import reporting  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "JSON path (a .md table is written beside it).")
_TOP = flags.DEFINE_integer("top", 25, "Rows of each table.")

HOOKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "suite_profile")
sys.path.insert(0, HOOKS)
import recorder  # noqa: E402 - its TOTALS name what every process records


def _records(path):
  """The JSON lines at `path`, and how many were unreadable (a process killed mid-write)."""
  records, unreadable = [], 0
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          unreadable += 1
  return records, unreadable


def summarize(processes, tests):
  """Totals over the processes, programs by compile seconds, files by CPU seconds."""
  programs = collections.defaultdict(lambda: [0, 0.0])
  large = collections.defaultdict(lambda: [0, 0.0])
  by_module = collections.defaultdict(list)  # module hash -> [(test, program, seconds)]
  for process in processes:
    for name, (count, spent) in process["programs"].items():
      programs[name][0] += count
      programs[name][1] += spent
    for test, name, spent, module in process.get("large", ()):
      large[test, name][0] += 1
      large[test, name][1] += spent
      if module:  # None: loaded from the cache
        by_module[module].append((test, name, spent))
  # A module compiled more than once: in a cache of its own (test_startup's cold one), for
  # another device count, or by two processes at the same time (those of a multi-host run,
  # of which only the first writes to the cache).
  again = [
    (c[0][1], len(c), sum(s for _, _, s in c[1:]), sorted({t for t, _, _ in c}))
    for c in by_module.values()
    if len(c) > 1
  ]
  files = collections.defaultdict(collections.Counter)
  for test in tests:
    row = files[test["nodeid"].split("::")[0]]
    row.update({k: test[k] for k in ("cpu_s", "subprocess_cpu_s", "compile_s", "small_s")})
    row["tests"] += 1
  totals = {key: sum(p[key] for p in processes) for key in recorder.TOTALS | {"cpu_s": 0}}
  return {
    "processes": len(processes),
    "cpu_s": totals["cpu_s"],
    "compile_s": totals["compile_s"],
    "compiles": totals["compiles"],
    "small_compile_s": totals["small_s"],
    "small_compiles": totals["small"],
    "trace_s": totals["trace_s"],
    "lower_s": totals["lower_s"],
    "programs": sorted(([n, c, s] for n, (c, s) in programs.items()), key=lambda r: -r[2]),
    "large_by_test": sorted(
      ([t, n, c, s] for (t, n), (c, s) in large.items()), key=lambda r: -r[3]
    ),
    "files": sorted(
      ([f, dict(c)] for f, c in files.items()),
      key=lambda r: -(r[1]["cpu_s"] + r[1]["subprocess_cpu_s"]),
    ),
    "distinct_programs": len(by_module),
    "compiled_again": sorted(again, key=lambda r: -r[2]),
    "tests": sorted(
      ([t["nodeid"], t["cpu_s"], t["subprocess_cpu_s"], t["compile_s"]] for t in tests),
      key=lambda r: -(r[1] + r[2]),
    ),
  }


def markdown(r, top):
  lines = [
    f"# Test suite profile ({r['machine']})",
    "",
    f"`pytest {' '.join(r['pytest_args'])}`: exit status {r['pytest_exit']}, "
    f"{r['wall_s'] / 60:.1f} min wall, {r['processes']} Python processes recorded, "
    f"{r['cpu_s']:.0f} CPU-s in them; compiling "
    f"{r['compile_s']:.0f} s ({r['compiles']} programs, cache loads included; "
    f"{r['small_compiles']} under 0.2 s took {r['small_compile_s']:.0f} s), tracing "
    f"{r['trace_s']:.0f} s, lowering {r['lower_s']:.0f} s.",
    "",
    "| program | compiles | seconds |",
    "|---|---|---|",
    *(f"| `{n}` | {c} | {s:.1f} |" for n, c, s in r["programs"][:top]),
    "",
    "| file | tests | CPU-s in pytest | CPU-s in subprocesses | compile s | under 0.2 s |",
    "|---|---|---|---|---|---|",
    *(
      f"| {f} | {c['tests']} | {c['cpu_s']:.0f} | {c['subprocess_cpu_s']:.0f} | "
      f"{c['compile_s']:.0f} | {c['small_s']:.0f} |"
      for f, c in r["files"][:top]
    ),
    "",
    "| test | CPU-s in pytest | CPU-s in subprocesses | compile s |",
    "|---|---|---|---|",
    *(f"| {t} | {c:.0f} | {sub:.0f} | {comp:.0f} |" for t, c, sub, comp in r["tests"][: 2 * top]),
    "",
    f"Compiles of {recorder.LARGE_S} s or more, by test (the test a subprocess ran under):",
    "",
    "| test | program | compiles | seconds |",
    "|---|---|---|---|",
    *(f"| {t} | `{n}` | {c} | {s:.1f} |" for t, n, c, s in r["large_by_test"][: 4 * top]),
    "",
    f"{r['distinct_programs']} distinct programs of {recorder.LARGE_S} s or more compiled (not "
    "loaded from the cache); those "
    f"compiled more than once ({sum(s for _, _, s, _ in r['compiled_again']):.0f} s on the "
    "repeats):",
    "",
    "| program | compiles | seconds on repeats | tests |",
    "|---|---|---|---|",
    *(f"| `{n}` | {c} | {s:.1f} | {'; '.join(t)} |" for n, c, s, t in r["compiled_again"][:top]),
  ]
  return "\n".join(lines) + "\n"


def main(argv):
  pytest_args = argv[1:]
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "processes.jsonl")
    path = os.environ.get("PYTHONPATH", "")
    env = dict(
      os.environ,
      SUITE_PROFILE_OUT=out,
      # An empty compilation cache, not the one the tests keep in the checkout: every program
      # the suite needs is compiled, as on a fresh clone.
      LPLGRAD_TEST_COMPILATION_CACHE=os.path.join(tmp, "jax_cache"),
      PYTHONPATH=os.pathsep.join(p for p in (HOOKS, path) if p),
    )
    start = time.perf_counter()
    run = subprocess.run(
      [sys.executable, "-m", "pytest", "-p", "pytest_plugin", *pytest_args], env=env, check=False
    )
    seconds = time.perf_counter() - start
    (processes, bad), (tests, bad_tests) = _records(out), _records(out + ".tests")
  result = {
    "machine": reporting.cpu_description(),
    "pytest_args": pytest_args,
    "pytest_exit": run.returncode,
    "wall_s": seconds,
    "unreadable_lines": bad + bad_tests,
    **summarize(processes, tests),
  }
  text = markdown(result, _TOP.value)
  print(text)
  if _OUT.value:
    measure.write_result(_OUT.value, result, text)


if __name__ == "__main__":
  app.run(main)
