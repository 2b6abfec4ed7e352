"""What one process compiled: JAX's compile-time events and the names of the programs
(jax_log_compiles, whose lines are caught here and reach no handler), appended as one JSON
line to SUITE_PROFILE_OUT when the process exits. A process killed with SIGKILL writes
nothing."""

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
# Each compile of LARGE_S or more: [test (pytest's PYTEST_CURRENT_TEST, which subprocesses
# inherit), program, seconds, the hash of the compiled module or None (a cache load)], to
# tell which tests pay for the large programs and which programs were compiled more than
# once. The module's hash, not the cache key: the key also holds the cache's directory.
LARGE: list[list] = []
LARGE_S = float(os.environ.get("SUITE_PROFILE_LARGE_S", 0.5))
_EVENTS = {
  "/jax/core/compile/jaxpr_trace_duration": "trace_s",
  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
}
_FINISHED = re.compile(r"Finished XLA compilation of (.*) in ([0-9.e-]+) sec")
_MODULE_HASH = re.compile(r"get_cache_key hash of serialized computation: (\w+)")
# By thread (a compile releases the GIL): the hash of the module whose key was computed last,
# and that of the module whose cache lookup missed, which the next finished compile is.
_hashed: dict[int, str] = {}
_missed: dict[int, str] = {}
# The loggers lowered to DEBUG to read the cache's records, and the level each had before:
# records below it are dropped here, as they would have been.
_LOWERED = {"jax._src.compiler": logging.NOTSET, "jax._src.cache_key": logging.NOTSET}


def _on_duration(event, seconds, **_):
  if event == "/jax/core/compile/backend_compile_duration":
    TOTALS["compile_s"] += seconds
    TOTALS["compiles"] += 1
    if seconds < 0.2:
      TOTALS["small_s"] += seconds
      TOTALS["small"] += 1
  elif event in _EVENTS:
    TOTALS[_EVENTS[event]] += seconds


# What jax_log_compiles adds to JAX's log: caught and dropped, so that a profiled process
# logs what it would have logged without it.
_COMPILE_LOG = (
  "Finished tracing",
  "Compiling ",
  "Finished jaxpr to MLIR",
  "Finished XLA compilation",
  "Persistent compilation cache",
)


class _CompileLog(logging.Filter):
  def filter(self, record):
    message = record.getMessage()
    hashed = _MODULE_HASH.match(message)
    if hashed:
      _hashed[record.thread] = hashed.group(1)
    elif message.startswith("PERSISTENT COMPILATION CACHE MISS"):
      _missed[record.thread] = _hashed.pop(record.thread, None)
    found = _FINISHED.match(message)
    if found:
      name, seconds = found.group(1), float(found.group(2))
      entry = PROGRAMS.setdefault(name, [0, 0.0])
      entry[0] += 1
      entry[1] += seconds
      if seconds >= LARGE_S:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
        LARGE.append([test, name, seconds, _missed.get(record.thread)])
      _missed.pop(record.thread, None)
    if record.levelno < _LOWERED.get(record.name, logging.NOTSET):
      return False
    return not message.startswith(_COMPILE_LOG)


def install():
  import jax
  import jax.monitoring

  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  jax.config.update("jax_log_compiles", True)
  # A logger's filters see the records logged on it, not on its children: each of JAX's.
  for name, logger in list(logging.Logger.manager.loggerDict.items()):
    if name.split(".")[0] == "jax" and isinstance(logger, logging.Logger):
      logger.addFilter(_CompileLog())
  for name in _LOWERED:
    logger = logging.getLogger(name)
    _LOWERED[name] = logger.getEffectiveLevel()
    logger.setLevel(logging.DEBUG)
  atexit.register(_write)


def _write():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  record = dict(
    TOTALS,
    cpu_s=usage.ru_utime + usage.ru_stime,
    argv=" ".join(sys.argv)[:200],
    test=os.environ.get("PYTEST_CURRENT_TEST", ""),
    programs=PROGRAMS,
    large=LARGE,
  )
  with open(os.environ["SUITE_PROFILE_OUT"], "a") as out:
    out.write(json.dumps(record) + "\n")
