"""The oracle: who labels a round's query. Chosen by `config.oracle`.

"simulated"  reveals the data set's own labels at once (reproducing papers)
"human"      asks a person: writes the query's files (`query_files`), stops the
             campaign, and reads the person's labels back when it is rerun
"""

from __future__ import annotations

import abc
import dataclasses
import os
import shlex
import time
from typing import TYPE_CHECKING

import numpy as np

from lplgrad_jax.errors import ConfigError
from lplgrad_jax.query_files import SKIP
from lplgrad_jax.query_files import contact_sheet_path
from lplgrad_jax.query_files import filled_ids
from lplgrad_jax.query_files import query_csv_path
from lplgrad_jax.query_files import read_labels
from lplgrad_jax.query_files import write_query

if TYPE_CHECKING:
  from lplgrad_jax.campaign_state import CampaignState
  from lplgrad_jax.data import Dataset


class Oracle(abc.ABC):
  """Labels each round's query: `label` answers at once (True) or asks to stop and wait."""

  def start(self, state: CampaignState, dataset: Dataset) -> Dataset:
    """`dataset` with every label the oracle has given so far (at a start or a resume)."""
    return dataset

  @abc.abstractmethod
  def label(self, state: CampaignState, ids: np.ndarray, scores: list[float] | None) -> bool:
    """Labels the queried `ids` (best first). True: `state` moved on to the next round."""

  def awaiting(self, state: CampaignState) -> str | None:
    """The file holding the query that waits for labels, if any."""
    return None


class SimulatedOracle(Oracle):
  """Reveals the labels the data set already has."""

  def label(self, state, ids, scores):
    state.add_labeled(ids)
    return True


@dataclasses.dataclass
class HumanOracle(Oracle):
  """Asks a person: writes the query files, then the campaign stops until they are filled in."""

  workdir: str
  root: str  # the labeling folder (config.data.root)
  dataset: Dataset | None = None

  def start(self, state, dataset):
    from lplgrad_jax.distributed import say  # JAX: the labeling page imports this module alone

    self._check_same_photos(state, dataset)
    if state.phase == "labels":  # a query was filled in: its labels start the next round
      r = state.round
      path = query_csv_path(self.workdir, r + 1)
      answers = read_labels(path, state.pending_ids, dataset.class_names)
      new, skipped = state.apply_labels(answers)
      say(f"round {r + 1}: read {len(new)} labels and {len(skipped)} skips from {path}")
    y_train = dataset.y_train.copy()
    for i, c in state.human_labels.items():
      y_train[i] = c
    self.dataset = dataclasses.replace(dataset, y_train=y_train)
    return self.dataset

  def label(self, state, ids, scores):
    from lplgrad_jax.distributed import is_main_process
    from lplgrad_jax.distributed import say

    path = query_csv_path(self.workdir, state.round + 1)
    filled = filled_ids(path)
    if filled == {int(i) for i in ids}:
      say(f"keeping the labels already written in {path}")
    elif is_main_process():
      if filled is not None:  # labels of another query: set aside, never wiped
        os.replace(path, f"{path}.{int(time.time())}.bak")
      d = self.dataset
      write_query(
        self.workdir,
        state.round + 1,
        ids,
        [d.train_files[i] for i in ids],
        scores,
        d.x_train[ids],
        d.class_names,
      )
    state.await_labels(ids)
    return False

  def awaiting(self, state):
    return query_csv_path(self.workdir, state.round + 1) if state.phase == "labels" else None

  def instructions(self, state) -> str:
    n = state.round + 1
    return (
      f"round {n}: {len(state.pending_ids)} images to label. Write a class name "
      f"({', '.join(self.dataset.class_names)}) or {SKIP!r} in the label column of every "
      f"row of {query_csv_path(self.workdir, n)} (thumbnails: "
      f"{contact_sheet_path(self.workdir, n)}), or label them in the browser with "
      f"python -m lplgrad_jax.label --workdir={shlex.quote(self.workdir)}; then rerun "
      "the same command (without --restart) to continue"
    )

  def _check_same_photos(self, state, dataset) -> None:
    """Refuses a labeling folder whose photos changed since the campaign started.

    Ids are positions in the sorted file list, and the checkpoint keeps ids: one
    photo added or removed would move every later label to another photo.
    """
    root = os.path.abspath(os.path.expanduser(self.root))
    files = [os.path.relpath(f, root) for f in dataset.train_files]
    if state.pool_files is None:
      state.pool_files = files
    before = state.pool_files
    if before != files:
      added, removed = sorted(set(files) - set(before)), sorted(set(before) - set(files))
      change = (
        f"{added[0]} was added"
        if added
        else f"{removed[0]} was removed"
        if removed
        else "the photos were renamed or reordered"
      )
      raise ConfigError(
        f"{root} changed since this campaign started ({change}; {len(added)} added, "
        f"{len(removed)} removed): ids follow the photos' order, so the labels given so far "
        "would attach to other photos; restore the folder, or start a new --workdir"
      )


def make_oracle(config, workdir: str) -> Oracle:
  """The oracle `config.oracle` names (validated by config_checks)."""
  if config.oracle == "human":
    return HumanOracle(workdir, config.data.root)
  return SimulatedOracle()
