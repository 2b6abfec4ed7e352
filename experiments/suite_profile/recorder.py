"""What one process compiled: JAX's compile-time events and the names of the programs
(jax_log_compiles, caught here so that nothing reaches stderr), appended as one JSON line to
SUITE_PROFILE_OUT when the process exits. A process killed with SIGKILL writes nothing."""

import atexit
import json
import logging
import os
import re
import resource
import sys

# Seconds spent, and counts: every compile, and those under 0.2 s (eager operations, mostly).
TOTALS = {
  "compile_s": 0.0,
  "compiles": 0,
  "small_s": 0.0,
  "small": 0,
  "trace_s": 0.0,
  "lower_s": 0.0,
}
PROGRAMS: dict[str, list] = {}  # name -> [count, seconds]; cache loads included
_EVENTS = {
  "/jax/core/compile/jaxpr_trace_duration": "trace_s",
  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
}
_FINISHED = re.compile(r"Finished XLA compilation of (.*) in ([0-9.e-]+) sec")


def _on_duration(event, seconds, **_):
  if event == "/jax/core/compile/backend_compile_duration":
    TOTALS["compile_s"] += seconds
    TOTALS["compiles"] += 1
    if seconds < 0.2:
      TOTALS["small_s"] += seconds
      TOTALS["small"] += 1
  elif event in _EVENTS:
    TOTALS[_EVENTS[event]] += seconds


class _ProgramNames(logging.Handler):
  def emit(self, record):
    found = _FINISHED.match(record.getMessage())
    if found:
      entry = PROGRAMS.setdefault(found.group(1), [0, 0.0])
      entry[0] += 1
      entry[1] += float(found.group(2))


def install():
  import jax
  import jax.monitoring

  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  jax.config.update("jax_log_compiles", True)
  jax_logger = logging.getLogger("jax")
  jax_logger.addHandler(_ProgramNames())
  jax_logger.propagate = False  # the compile log stays out of stderr
  atexit.register(_write)


def _write():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  record = dict(
    TOTALS,
    cpu_s=usage.ru_utime + usage.ru_stime,
    argv=" ".join(sys.argv)[:200],
    test=os.environ.get("PYTEST_CURRENT_TEST", ""),
    programs=PROGRAMS,
  )
  with open(os.environ["SUITE_PROFILE_OUT"], "a") as out:
    out.write(json.dumps(record) + "\n")
