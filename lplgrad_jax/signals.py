"""SIGTERM / SIGINT during a campaign: checkpoint and exit at the next safe point; a second
signal exits at once."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAVE_GRACE_SECONDS = 5.0  # how long a second signal lets a checkpoint being written finish


class StopRequest:
  """SIGTERM/SIGINT handler: asks the campaign to checkpoint and exit at the next step boundary.

  With several processes the next epoch boundary instead, decided together
  (`agreed`): a process that left the step loop alone would wait in the
  checkpoint's barrier while the others wait in the next step's all-reduce.
  A second signal (SIGINT or SIGTERM) exits at once, with status 128 + its
  number, after at most `SAVE_GRACE_SECONDS` for a checkpoint being written
  (`is_saving`): a watcher thread sees it through the signal wake-up fd, so it
  acts even while the main thread waits inside a library call (Python runs
  signal handlers only between the main thread's bytecodes). A checkpoint cut
  short is never the newest one (Orbax commits by renaming), so the workdir
  resumes as after kill -9.
  """

  def __init__(self):
    self.signal_name = None
    self.is_saving = lambda: False  # set by the campaign once it has a checkpointer
    self._previous = {}
    self._pipe = None
    self._previous_wakeup = -1
    self._watcher = None
    self._count = 0

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in _SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
      read_end, write_end = os.pipe()
      os.set_blocking(write_end, False)
      self._pipe = (read_end, write_end)
      self._previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
      self._watcher = threading.Thread(
        target=self._watch, args=(read_end,), daemon=True, name="stop-request-watcher"
      )
      self._watcher.start()
    return self

  def _handle(self, signum, frame):
    """The main thread's handler; the watcher thread counts the signals."""
    del frame
    if self.signal_name is None:
      self.signal_name = signal.Signals(signum).name

  def _watch(self, read_end: int) -> None:
    while True:
      try:
        received = os.read(read_end, 64)
      except OSError:
        return
      if not received:  # the write end was closed: the campaign is over
        os.close(read_end)
        return
      for signum in received:
        if signum not in _SIGNALS:
          continue
        self._count += 1
        if self.signal_name is None:  # also when the main thread is blocked
          self.signal_name = signal.Signals(signum).name
        if self._count >= 2:
          self._exit_now(signum)

  def _exit_now(self, signum: int) -> None:
    deadline = time.monotonic() + SAVE_GRACE_SECONDS
    while time.monotonic() < deadline and _safely(self.is_saving):
      time.sleep(0.05)
    name = signal.Signals(signum).name
    message = (
      f"stopped at once by a second {name}: the newest complete checkpoint is kept; "
      "rerun the same command to resume from it\n"
    )
    # Flushed by a helper thread: a main thread blocked inside a write holds the stream's lock.
    flusher = threading.Thread(
      target=lambda: [_safely(s.flush) for s in (sys.stdout, sys.stderr)], daemon=True
    )
    flusher.start()
    flusher.join(timeout=1.0)
    os.write(2, message.encode())
    os._exit(128 + signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    if self._pipe is not None:
      signal.set_wakeup_fd(self._previous_wakeup)
      os.close(self._pipe[1])  # ends the watcher once it has read what is left
      self._pipe = None
      # A second signal already written to the pipe ends the process with 128 + its number
      # (within SAVE_GRACE_SECONDS and a flush): the main thread must not exit 0 meanwhile,
      # which would leave its message printed under status 0.
      self._watcher.join()

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


def _safely(fn) -> bool:
  try:
    return bool(fn())
  except Exception:  # noqa: BLE001 - a stream or manager in any state must not block the exit
    return False
