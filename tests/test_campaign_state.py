"""The campaign's typed state: phase transitions and the checkpoint's JSON item."""

import json

import numpy as np
import pytest

from lplgrad_jax import strategies
from lplgrad_jax.campaign_state import FORMAT_VERSION
from lplgrad_jax.campaign_state import CampaignState
from lplgrad_jax.campaign_state import RoundRecord
from lplgrad_jax.errors import ConfigError


def _record(round_index, labeled):
  return RoundRecord(
    round=round_index,
    num_labeled=len(labeled),
    test_accuracy=0.5,
    per_class_accuracy=[0.5, 0.5],
    train_seconds=1.0,
    labeled_ids=labeled,
  )


def test_simulated_round_trip_of_phases():
  state = CampaignState([3, 1], config={"seed": 0})
  assert state.round_starts and state.phase == "train"
  state.reached(2, 5)
  assert not state.round_starts
  state.finish_training(_record(0, [1, 3]))
  assert (state.phase, state.epoch, state.step, state.train_seconds) == ("query", 0, 0, 0.0)
  state.record_query([7, 2], np.array([0.0, 2.0, 1.0, 0.5, 1.5]), 0.25)
  state.add_labeled([7, 2])
  assert state.labeled_ids == [1, 2, 3, 7] and state.round == 1 and state.round_starts
  assert state.rounds[0].to_json()["queried_ids"] == [7, 2]
  assert state.rounds[0].to_json()["query_scores"] == {
    "min": 0.0,
    "median": 1.0,
    "max": 2.0,
    "mean": 1.0,
  }


def test_human_labels_and_skips():
  state = CampaignState([0], config={})
  state.finish_training(_record(0, [0]))
  state.record_query([5, 6, 9], None, 0.1)
  state.await_labels([5, 6, 9])
  assert state.phase == "labels" and state.pending_ids == [5, 6, 9]
  new, skipped = state.apply_labels({5: 1, 6: None, 9: 0})
  assert (new, skipped) == ([5, 9], [6])
  assert state.labeled_ids == [0, 5, 9] and state.skipped_ids == [6]
  assert state.human_labels == {5: 1, 9: 0} and state.pending_ids is None
  assert state.rounds[0].to_json()["skipped_ids"] == [6]
  assert "query_scores" not in state.rounds[0].to_json()


def test_json_round_trip_is_exact():
  state = CampaignState([0, 4], config={"a": {"b": 1}}, epochs_logged=7, pool_files=["x.png"])
  state.finish_training(_record(0, [0, 4]))
  state.record_query([2], np.array([1.0, 1.0]), 0.5)
  state.await_labels([2])
  state.apply_labels({2: 3})
  saved = json.loads(json.dumps(state.to_json()))  # what the checkpoint holds
  assert saved["format_version"] == FORMAT_VERSION
  assert CampaignState.from_json(saved, "ckpt").to_json() == state.to_json()


def test_format_1_resumes_and_a_newer_format_is_refused():
  # What checkpoints held before the typed state: the same keys, no format_version.
  version_1 = {
    "round": 1,
    "phase": "query",
    "epoch": 0,
    "step": 0,
    "train_seconds": 0.0,
    "epochs_logged": 4,
    "labeled_ids": [1, 2],
    "config": {"seed": 3},
    "rounds": [_record(0, [1]).to_json(), _record(1, [1, 2]).to_json()],
    "human_labels": {"2": 1},
    "skipped_ids": [9],
  }
  state = CampaignState.from_json(version_1, "ckpt")
  assert state.round == 1 and state.phase == "query" and state.human_labels == {2: 1}
  assert [r.num_labeled for r in state.rounds] == [1, 2]
  with pytest.raises(
    ConfigError,
    match=f"checkpoint format 99, newer than this lplgrad_jax reads \\(format {FORMAT_VERSION}\\)",
  ):
    CampaignState.from_json({**version_1, "format_version": 99}, "ckpt")


def test_a_strategy_name_registers_once():
  with pytest.raises(ValueError, match="'random' is already registered"):
    strategies.register("random")(lambda ctx: None)
