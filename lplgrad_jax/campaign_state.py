"""Where a campaign stands: the typed state that checkpoints save and every phase advances.

A campaign is a sequence of rounds; round r passes through phases
  "train"   training (next at `epoch`, `step`), then evaluation
  "query"   trained and evaluated; its query is next
  "labels"  (human oracle) queried; waiting for a person's labels of `pending_ids`
and the methods of `CampaignState` are the only places that move it from one
phase to the next. `to_json` / `from_json` give the checkpoint's JSON item.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from lplgrad_jax.errors import ConfigError

Phase = Literal["train", "query", "labels"]
# Version 1 (no "format_version" key) holds the same fields as version 2.
FORMAT_VERSION = 2


@dataclasses.dataclass
class RoundRecord:
  """One round as results.json reports it."""

  round: int
  num_labeled: int
  test_accuracy: float | None
  per_class_accuracy: list[float] | None
  train_seconds: float
  labeled_ids: list[int]  # the labeled set the round trained on, sorted
  query_seconds: float = 0.0
  queried_ids: list[int] = dataclasses.field(default_factory=list)  # best first
  query_scores: dict | None = None  # min / median / max / mean of the subset's scores
  skipped_ids: list[int] | None = None  # queried ids a person skipped

  _ORDER = (
    "round",
    "num_labeled",
    "test_accuracy",
    "per_class_accuracy",
    "train_seconds",
    "query_seconds",
    "labeled_ids",
    "queried_ids",
    "query_scores",
    "skipped_ids",
  )

  def to_json(self) -> dict:
    values = {name: getattr(self, name) for name in self._ORDER}
    return {
      k: v for k, v in values.items() if v is not None or k not in ("query_scores", "skipped_ids")
    }

  @classmethod
  def from_json(cls, record: dict) -> RoundRecord:
    return cls(**{k: v for k, v in record.items() if k in cls._ORDER})


def _ids(values) -> list[int]:
  return [int(i) for i in values]


@dataclasses.dataclass
class CampaignState:
  labeled_ids: list[int]
  config: dict
  round: int = 0
  phase: Phase = "train"
  epoch: int = 0  # the next epoch of a training round
  step: int = 0  # the next step of that epoch
  train_seconds: float = 0.0  # spent on this round's training so far
  epochs_logged: int = 0  # TensorBoard's epoch axis
  rounds: list[RoundRecord] = dataclasses.field(default_factory=list)
  skipped_ids: list[int] = dataclasses.field(default_factory=list)  # out of the pool for good
  pending_ids: list[int] | None = None  # queried ids awaiting a person's labels
  human_labels: dict[int, int] = dataclasses.field(default_factory=dict)
  pool_files: list[str] | None = None  # the labeling folder's files, by id

  @property
  def labeled(self) -> np.ndarray:
    return np.asarray(self.labeled_ids, np.int32)

  @property
  def round_starts(self) -> bool:
    return self.phase == "train" and self.epoch == 0 and self.step == 0

  def where(self) -> str:
    return f"round {self.round + 1}, {self.phase} phase, epoch {self.epoch}"

  # Phase transitions.
  def reached(self, epoch: int, step: int) -> None:
    """Training of this round continues at (`epoch`, `step`)."""
    self.epoch, self.step = epoch, step

  def finish_training(self, record: RoundRecord) -> None:
    """train -> query: the round is trained and evaluated."""
    self.rounds.append(record)
    self.phase, self.epoch, self.step, self.train_seconds = "query", 0, 0, 0.0

  def record_query(self, queried_ids, scores: np.ndarray | None, seconds: float) -> None:
    """The round's query: its ids, how long it took, and (a scoring strategy's) the spread of
    the scores over the scored subset."""
    record = self.rounds[self.round]
    record.queried_ids, record.query_seconds = _ids(queried_ids), seconds
    if scores is not None:
      record.query_scores = {
        name: float(reduce(scores))
        for name, reduce in (
          ("min", np.min),
          ("median", np.median),
          ("max", np.max),
          ("mean", np.mean),
        )
      }

  def add_labeled(self, new_ids) -> None:
    """query|labels -> train: the next round trains with `new_ids` labeled too."""
    self.labeled_ids = sorted(self.labeled_ids + _ids(new_ids))
    self.round += 1
    self.phase, self.epoch, self.step, self.pending_ids = "train", 0, 0, None

  def await_labels(self, queried_ids) -> None:
    """query -> labels: a person is asked to label `queried_ids`."""
    self.phase, self.pending_ids = "labels", _ids(queried_ids)

  def apply_labels(self, answers: dict[int, int | None]) -> tuple[list[int], list[int]]:
    """labels -> train: a person's answers ({id: class, None = skip}); (labeled, skipped)."""
    new = [i for i, c in answers.items() if c is not None]
    skipped = [i for i, c in answers.items() if c is None]
    self.human_labels.update({i: answers[i] for i in new})
    self.skipped_ids.extend(skipped)
    self.rounds[self.round].skipped_ids = skipped
    self.add_labeled(new)
    return new, skipped

  # The checkpoint's JSON item.
  def to_json(self) -> dict:
    state = {
      "format_version": FORMAT_VERSION,
      "round": self.round,
      "phase": self.phase,
      "epoch": self.epoch,
      "step": self.step,
      "train_seconds": self.train_seconds,
      "epochs_logged": self.epochs_logged,
      "labeled_ids": self.labeled_ids,
      "rounds": [r.to_json() for r in self.rounds],
      "config": self.config,
    }
    if self.skipped_ids:
      state["skipped_ids"] = self.skipped_ids
    if self.pending_ids is not None:
      state["pending_ids"] = self.pending_ids
    if self.human_labels:
      state["human_labels"] = {str(i): c for i, c in self.human_labels.items()}
    if self.pool_files is not None:
      state["pool_files"] = self.pool_files
    return state

  @classmethod
  def from_json(cls, state: dict, where: str) -> CampaignState:
    version = state.get("format_version", 1)
    if version > FORMAT_VERSION:
      raise ConfigError(
        f"{where} holds a campaign of checkpoint format {version}, newer than "
        f"this lplgrad_jax reads (format {FORMAT_VERSION}): upgrade "
        "lplgrad_jax, or pass --restart to discard the campaign"
      )
    return cls(
      labeled_ids=_ids(state["labeled_ids"]),
      config=state["config"],
      round=state["round"],
      phase=state["phase"],
      epoch=state["epoch"],
      step=state["step"],
      train_seconds=state["train_seconds"],
      epochs_logged=state["epochs_logged"],
      rounds=[RoundRecord.from_json(r) for r in state["rounds"]],
      skipped_ids=_ids(state.get("skipped_ids", [])),
      pending_ids=state.get("pending_ids"),
      human_labels={int(i): c for i, c in state.get("human_labels", {}).items()},
      pool_files=state.get("pool_files"),
    )
