"""StopRequest alone, in a subprocess that signals itself: the exit status always says what
stderr says. The campaign-level cases (a real stop, resume) are in test_faults."""

import signal
import subprocess
import sys
import textwrap

from conftest import REPO_ROOT

_SCRIPT = textwrap.dedent(
  """
  import os, signal, sys, time
  from lplgrad_jax.signals import StopRequest

  with StopRequest() as stop:
    saving_until = time.monotonic() + {saving_seconds}  # a checkpoint being written
    stop.is_saving = lambda: time.monotonic() < saving_until
    for _ in range({signals}):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.2)
    print("asked to stop:", stop())
  print("left the campaign")
  """
)


def _run(signals: int, saving_seconds: float) -> subprocess.CompletedProcess:
  script = _SCRIPT.format(signals=signals, saving_seconds=saving_seconds)
  return subprocess.run(
    [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
  )


def test_one_signal_asks_the_campaign_to_stop():
  proc = _run(signals=1, saving_seconds=0.0)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == ["asked to stop: True", "left the campaign"]
  assert proc.stderr == ""


def test_second_signal_exits_130_even_when_the_campaign_ends_first():
  # The second signal waits for the checkpoint being written (1 s); the campaign leaves the
  # StopRequest meanwhile. It used to exit 0 then, with "stopped at once" on stderr.
  proc = _run(signals=2, saving_seconds=1.0)
  assert proc.returncode == 128 + signal.SIGINT, (proc.stdout, proc.stderr)
  assert proc.stderr.startswith("stopped at once by a second SIGINT")
  assert len(proc.stderr.splitlines()) == 1
  assert "left the campaign" not in proc.stdout
