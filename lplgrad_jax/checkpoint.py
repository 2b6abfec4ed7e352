"""The checkpoint format of a campaign: an Orbax CheckpointManager in WORKDIR/checkpoints.

Every checkpoint (one Orbax step; steps count saves) holds two items, written
together and committed atomically by Orbax:
  state     the TrainState: parameters of the main model and the loss head,
            BatchNorm statistics, SGD momentum (ocp.args.StandardSave)
  campaign  JSON (ocp.args.JsonSave): the configuration, the position
            (round, phase, epoch, step), the labeled ids, the per-round records
            (with each query's selected ids and score summary)
The newest checkpoint that restores wins; a corrupt one is reported, deleted
and the one before it is used. Saves are asynchronous: `close()` waits for them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import warnings

import jax
import orbax.checkpoint as ocp

from lplgrad_jax.errors import ConfigError

CHECKPOINT_DIR = "checkpoints"
_UNFINISHED = ".orbax-checkpoint-tmp"  # Orbax's name for a save not yet finalized


class Checkpointer:
  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self._keep = keep
    self._manager = None
    self._saved = False  # by this process: before its first save, a killed save's leftovers go

  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._manager is None:  # created lazily: a refused run leaves no directory behind
      self._manager = ocp.CheckpointManager(
        self.directory,
        # keep=0 (checkpoint.keep): every checkpoint is kept.
        options=ocp.CheckpointManagerOptions(max_to_keep=self._keep or None, create=True),
      )
    return self._manager

  def exists(self) -> bool:
    return os.path.isdir(self.directory) and bool(self.manager.all_steps())

  def delete_all(self) -> None:
    if self._manager is not None:
      self._manager.close()
      self._manager = None
    shutil.rmtree(self.directory, ignore_errors=True)

  def save(self, state, campaign: dict) -> int:
    if not self._saved and jax.process_index() == 0:  # the host that creates the folders
      self._discard_unfinished_saves()
    self._saved = True
    step = (self.manager.latest_step() or 0) + 1
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), campaign=ocp.args.JsonSave(campaign)
      ),
    )
    return step

  def _discard_unfinished_saves(self) -> None:
    """Removes the folders of saves that never finished (a process killed while writing one:
    Orbax's `<step>.orbax-checkpoint-tmp*`), which Orbax would otherwise remove with a warning
    on stderr when it saves that step again. Only a campaign saves, holding the workdir's
    lock, so no live save is writing them."""
    if not os.path.isdir(self.directory):
      return
    for name in os.listdir(self.directory):
      if _UNFINISHED in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def is_saving(self) -> bool:
    """Whether an asynchronous save is being written."""
    return self._manager is not None and self._manager.is_saving_in_progress()

  def latest_campaign(self) -> dict | None:
    """The JSON item of the newest readable checkpoint (no arrays are read)."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        with _quiet_libraries():
          return self.manager.restore(
            step, args=ocp.args.Composite(campaign=ocp.args.JsonRestore())
          ).campaign
      except Exception:  # noqa: BLE001 - judged again, with a warning, by restore()
        continue
    return None

  def restore(self, target_state, delete_corrupt: bool = True):
    """(state, campaign) of the newest checkpoint that restores, falling back past corrupt ones.

    `target_state` gives the structure, shapes and dtypes (a freshly created TrainState).
    Each checkpoint that cannot be restored gets one warning line on stderr.
    `delete_corrupt`: the campaign (holding the workdir's lock, so that no live
    process is writing them) deletes the unreadable checkpoints newer than the one
    that restores, so that it does not trip over them again; if none restores,
    nothing is deleted. A reader (the predictor) leaves them alone.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    corrupt = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        with _quiet_libraries():
          restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract), campaign=ocp.args.JsonRestore()
            ),
          )
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is handled alike
        reason = " ".join(str(e).split())[:160]
        print(
          f"warning: checkpoint {step} in {self.directory} cannot be restored "
          f"({type(e).__name__}: {reason}); trying the previous one",
          file=sys.stderr,
          flush=True,
        )
        corrupt.append(step)
        continue
      if delete_corrupt:
        for bad in corrupt:
          self.manager.delete(bad)
      return restored.state, restored.campaign
    raise ConfigError(
      f"no checkpoint in {self.directory} can be restored (each is reported "
      "above; none was deleted): rerun with --restart to start the campaign over"
    )

  def close(self) -> None:
    """Waits for pending asynchronous saves."""
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None


@contextlib.contextmanager
def _quiet_libraries():
  """Silences what Orbax, TensorStore and asyncio log while a corrupt checkpoint fails:
  its error is reported once, as a warning line, by `restore`."""
  loggers = [logging.getLogger(name) for name in ("absl", "orbax", "asyncio", "jax")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.CRITICAL)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)
