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

import os
import shutil
import warnings

import jax
import orbax.checkpoint as ocp

from lplgrad_jax.errors import ConfigError

CHECKPOINT_DIR = "checkpoints"


class Checkpointer:

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self._keep = keep
    self._manager = None

  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._manager is None:  # created lazily: a refused run leaves no directory behind
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True))
    return self._manager

  def exists(self) -> bool:
    return os.path.isdir(self.directory) and bool(self.manager.all_steps())

  def delete_all(self) -> None:
    if self._manager is not None:
      self._manager.close()
      self._manager = None
    shutil.rmtree(self.directory, ignore_errors=True)

  def save(self, state, campaign: dict) -> int:
    step = (self.manager.latest_step() or 0) + 1
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), campaign=ocp.args.JsonSave(campaign)))
    return step

  def latest_campaign(self) -> dict | None:
    """The JSON item of the newest readable checkpoint (no arrays are read)."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.manager.restore(step, args=ocp.args.Composite(
            campaign=ocp.args.JsonRestore())).campaign
      except Exception:  # noqa: BLE001 - judged again, with a warning, by restore()
        continue
    return None

  def restore(self, target_state, delete_corrupt: bool = True):
    """(state, campaign) of the newest checkpoint that restores, falling back past corrupt ones.

    `target_state` gives the structure, shapes and dtypes (a freshly created TrainState).
    `delete_corrupt`: the campaign deletes a checkpoint it cannot restore (so that
    it does not trip over it again); a reader (the predictor) leaves it alone.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), campaign=ocp.args.JsonRestore()))
        return restored.state, restored.campaign
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is handled alike
        reason = " ".join(str(e).split())[:300]
        warnings.warn(f"checkpoint {step} in {self.directory} cannot be restored "
                      f"({type(e).__name__}: {reason}); trying the previous one")
        print(f"warning: checkpoint {step} is corrupt; falling back to an earlier one", flush=True)
        if delete_corrupt:
          self.manager.delete(step)
    raise ConfigError(f"no checkpoint in {self.directory} can be restored: "
                      "rerun with --restart to start the campaign over")

  def close(self) -> None:
    """Waits for pending asynchronous saves."""
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None
