"""SIGTERM / SIGINT during a campaign: checkpoint and exit at the next safe point."""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopRequest:
  """SIGTERM/SIGINT handler: asks the campaign to checkpoint and exit at the next step boundary.

  With several processes the next epoch boundary instead, decided together
  (`agreed`): a process that left the step loop alone would wait in the
  checkpoint's barrier while the others wait in the next step's all-reduce.
  A second SIGINT interrupts at once (the default behaviour).
  """

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal_name = signal.Signals(signum).name
    signal.signal(signal.SIGINT, signal.default_int_handler)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def __call__(self) -> bool:
    """Checked between steps: this process's request, when it runs alone."""
    return self.signal_name is not None and jax.process_count() == 1

  def agreed(self) -> bool:
    """Whether any process was asked to stop; all processes call it at the same points.

    The answer is the gathered one alone: a signal that lands during the gather
    counts at the next call, on every process alike.
    """
    asked = self.signal_name is not None
    if jax.process_count() == 1:
      return asked
    anyone = bool(multihost_utils.process_allgather(np.array([asked])).any())
    if anyone and not asked:
      self.signal_name = "a signal to another process"
    return anyone
