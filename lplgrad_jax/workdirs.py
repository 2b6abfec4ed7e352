"""A campaign's workdir: checked before any data loads, locked for one live campaign, and
emptied of a campaign on --restart (`discard_campaign`).

The lock is an OS lock (`fcntl.flock`) on WORKDIR/.lock, held by process 0 for
the whole run: the kernel releases it when the process ends, however it ends
(kill -9 included), so a lock is never stale. The file names its holder (host,
pid, start time) for the run that is refused. Readers (the predictor) take no
lock. With several processes all of them check the workdir and agree, through
a collective, on whether to go on, so that none proceeds alone.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import shutil
import socket
import tempfile
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.experimental import multihost_utils

from lplgrad_jax import distributed
from lplgrad_jax import reporting
from lplgrad_jax.errors import ConfigError

if TYPE_CHECKING:
  from lplgrad_jax.checkpoint import Checkpointer

LOCK_FILE = ".lock"
MIN_FREE_BYTES = 64 * 2**20  # room for a few checkpoints of a small model and results


def _directory(workdir: str) -> str:
  """The workdir's absolute path, created if missing; ConfigError if that is impossible."""
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(
      f"--workdir={workdir} is a file, not a directory: expected a directory "
      "(it is created if missing)"
    )
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise _not_writable(workdir, e) from None
  return path


def _not_writable(workdir: str, error: OSError) -> ConfigError:
  return ConfigError(
    f"--workdir={workdir} is not a writable directory "
    f"({error.strerror or error}): expected a directory this user can write, "
    "on a disk"
  )


def check_workdir(workdir: str) -> str:
  """Creates `workdir` if needed; ConfigError unless it is a writable directory with space."""
  path = _directory(workdir)
  try:  # the only sure test of writability (read-only mounts, ACLs, /proc)
    fd, probe = tempfile.mkstemp(dir=path, prefix=".write_test.")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise _not_writable(workdir, e) from None
  stats = os.statvfs(path)
  free = stats.f_bavail * stats.f_frsize
  if free < MIN_FREE_BYTES:
    raise ConfigError(
      f"--workdir={workdir} has {free / 2**20:.1f} MiB free: expected at "
      f"least {MIN_FREE_BYTES // 2**20} MiB for checkpoints and results"
    )
  return path


class WorkdirLock:
  """`with WorkdirLock(workdir):` checks the workdir and holds its lock (process 0)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), LOCK_FILE)
    self._fd = None
    self._created = None  # the outermost folder this run created, if it created the workdir

  def __enter__(self) -> WorkdirLock:
    error = None
    try:
      if jax.process_index() == 0:  # first, so that a refused run writes nothing
        self._created = _first_missing(os.path.dirname(self.path))
        _directory(self.workdir)
        self._lock()
      check_workdir(self.workdir)
    except ConfigError as e:
      error = e
    try:
      _agree(error)
    except ConfigError:
      self.__exit__()
      raise
    return self

  def _lock(self) -> None:
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise _not_writable(self.workdir, e) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.read(fd, 1000).decode("utf-8", "replace").strip()
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise ConfigError(
          f"cannot lock {self.path} ({e.strerror}): expected a file system with locks (flock)"
        ) from None
      raise ConfigError(
        f"workdir {self.workdir} is in use by a running campaign "
        f"({holder or 'holder unknown'}): wait for it to end or stop it, "
        "or choose another --workdir"
      ) from None
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    os.ftruncate(fd, 0)
    os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n".encode())
    self._fd = fd

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.close(self._fd)  # releases the lock; the file stays (unlinking it would race)
      self._fd = None
      self._remove_if_unused()

  def _remove_if_unused(self) -> None:
    """A workdir this run created and left holding only its lock (the run failed before
    writing anything, e.g. offline) is removed with the folders created for it."""
    folder = os.path.dirname(self.path)
    if self._created is None or os.listdir(folder) != [LOCK_FILE]:
      return
    os.unlink(self.path)
    while True:
      os.rmdir(folder)
      if folder == self._created or os.listdir(os.path.dirname(folder)):
        return
      folder = os.path.dirname(folder)


def _first_missing(path: str) -> str | None:
  """The outermost folder of `path` that does not exist yet (None if `path` exists)."""
  missing = None
  while not os.path.exists(path):
    missing, path = path, os.path.dirname(path)
  return missing


def _agree(error: ConfigError | None) -> None:
  """Raises `error`, or on every process if any process failed its check (collective)."""
  if jax.process_count() > 1:
    failed = multihost_utils.process_allgather(np.array([error is not None]))
    if error is None and bool(np.any(failed)):
      error = ConfigError(
        "another process of this campaign refused the workdir (see its error line)"
      )
  if error is not None:
    raise error


def discard_campaign(workdir: str, checkpointer: Checkpointer) -> None:
  """--restart: deletes the checkpoints, results, plot and TensorBoard logs (process 0)."""
  if distributed.is_main_process():
    checkpointer.delete_all()
    for name in (reporting.RESULTS_FILE, reporting.PLOT_FILE):
      if os.path.exists(os.path.join(workdir, name)):
        os.remove(os.path.join(workdir, name))
    # queries/ stays: filled-in labels are a person's work (see query_files.filled_ids).
    shutil.rmtree(os.path.join(workdir, reporting.TENSORBOARD_DIR), ignore_errors=True)
  distributed.barrier("restart")
