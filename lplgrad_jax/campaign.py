"""The active-learning campaign: set up, then train, evaluate, query and label, round by round.

Round r trains the learner on the labeled set (warm-started weights, a fresh
optimizer and schedule), evaluates it on the test split, records the round in
results.json, and, unless it is the last round, has the oracle label the B'
best-scoring images of a random subset R of the unlabeled pool.
`run` reads top to bottom: `Campaign.set_up`, then `run_rounds`, whose body is
`train_and_evaluate_round` and `query_round`; where the campaign stands is a
`CampaignState` (campaign_state.py), saved with the weights by every checkpoint.
All randomness is derived from the seed with `fold_in(seed, purpose, round, ...)` (seeds.py).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Literal

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from lplgrad_jax import config_checks
from lplgrad_jax import device_pool
from lplgrad_jax import distributed
from lplgrad_jax import linear_probe
from lplgrad_jax import optimizer
from lplgrad_jax import pretrained
from lplgrad_jax import query
from lplgrad_jax import reporting
from lplgrad_jax import seeds
from lplgrad_jax import sharding
from lplgrad_jax import strategies
from lplgrad_jax import train
from lplgrad_jax import workdirs
from lplgrad_jax.campaign_state import CampaignState
from lplgrad_jax.campaign_state import RoundRecord
from lplgrad_jax.checkpoint import Checkpointer
from lplgrad_jax.data import Dataset
from lplgrad_jax.data import input_normalization
from lplgrad_jax.data import load_dataset
from lplgrad_jax.data.rows import padded
from lplgrad_jax.distributed import say
from lplgrad_jax.errors import ConfigError
from lplgrad_jax.errors import Diverged
from lplgrad_jax.models import ActiveLearner
from lplgrad_jax.models import create_learner
from lplgrad_jax.oracle import Oracle
from lplgrad_jax.oracle import make_oracle
from lplgrad_jax.signals import StopRequest
from lplgrad_jax.workdirs import WorkdirLock

RESULTS_FILE = reporting.RESULTS_FILE
Outcome = Literal["done", "stopped", "awaiting_labels"]


def run(config, workdir: str, *, restart: bool = False) -> dict:
  """Runs (or resumes) a campaign; writes results.json, the plot, logs and checkpoints.

  Rerunning the same command on the same workdir resumes from the newest
  checkpoint and ends with the same selections and accuracies as an
  uninterrupted run. `restart=True` discards the workdir's campaign first.
  """
  config_checks.validate_config(config)
  distributed.initialize(config.distributed)  # before anything touches a device
  # One live campaign per workdir, locked before anything in it is read or written.
  with WorkdirLock(workdir), StopRequest() as stop:
    campaign = Campaign.set_up(config, workdir, restart=restart)
    stop.is_saving = campaign.checkpointer.is_saving  # what a second signal lets finish
    with campaign:  # leaving waits for the checkpoints being written
      outcome = campaign.run_rounds(stop)
      if outcome == "stopped":
        campaign.save()
    return campaign.report(outcome, stop)


@dataclasses.dataclass
class Campaign:
  """One run of a campaign: what stays fixed while it runs, and where it stands (`state`)."""

  config: object  # the ml_collections ConfigDict
  workdir: str
  dataset: Dataset  # with every label the oracle has given so far
  inputs: Dataset  # what the main model reads: `dataset`, or its frozen features (linear mode)
  oracle: Oracle
  checkpointer: Checkpointer
  mesh: jax.sharding.Mesh
  step_config: train.StepConfig
  pool: device_pool.WholePool | device_pool.LabeledCache  # the training pool on the devices
  normalization: tuple[np.ndarray, np.ndarray]  # the pool's per-channel mean and std
  learner: nnx.Module  # holds the newest trained weights between rounds
  graphdef: nnx.GraphDef  # of the learner in training mode
  train_state: train.TrainState
  state: CampaignState
  logger: reporting.MetricsLogger

  @classmethod
  def set_up(cls, config, workdir: str, *, restart: bool) -> Campaign:
    """Checks the workdir and budgets, loads the data, builds or restores the learner."""
    checkpointer = Checkpointer(workdir, keep=config.checkpoint.keep)
    if restart:
      workdirs.discard_campaign(workdir, checkpointer)
    previous = config_checks.previous_config(workdir, checkpointer, RESULTS_FILE)
    if previous is not None:
      config_checks.check_same_campaign(workdir, previous, config.to_dict())
    mesh = sharding.data_mesh()
    config_checks.check_batch_split(config.train.batch_size, mesh.size)
    dataset = load_dataset(
      config.data,
      human_oracle=config.oracle == "human",
      rows=sharding.process_rows(mesh) if config.data.shard_pool else None,
    )
    seed_size = len(dataset.seed_ids) if config.oracle == "human" else None
    final_size = config_checks.check_budgets(config.al, dataset.num_train, seed_size)
    os.makedirs(workdir, exist_ok=True)
    use_aux = strategies.uses_aux(config)
    step_config = train.StepConfig.from_config(
      config.train, final_size, use_aux, mesh, pool_sharded=device_pool.rows_split(config.data)
    )
    normalization = input_normalization(
      config.data, dataset, pretrained.normalization(config.model)
    )
    learner, features = _round_learner(config, dataset, use_aux, 0), None
    if config.model.train_mode == "linear":  # the backbone's features, once per campaign
      progress = config.log.progress and distributed.is_main_process()
      learner, features = linear_probe.freeze(
        learner, dataset, normalization, config.train.eval_batch_size, progress
      )
      step_config = dataclasses.replace(step_config, crop_padding=0, flip=False)  # not images
    graphdef, train_state = train.create_train_state(learner, step_config)
    train_state = sharding.replicate(train_state, mesh)  # restored with these shardings
    if checkpointer.exists():
      train_state, saved = checkpointer.restore(train_state)
      state = CampaignState.from_json(saved, checkpointer.directory)
      nnx.update(learner, train_state.params, train_state.batch_stats)
      complete = state.phase == "query" and state.round >= config.al.num_rounds - 1
      say(
        f"the campaign in {workdir} is complete ({len(state.rounds)} rounds): nothing to train"
        if complete
        else f"resuming from {checkpointer.directory}: {state.where()}"
      )
    elif previous is not None:
      raise ConfigError(
        f"workdir {workdir} holds results but no checkpoint to resume from: "
        "choose another --workdir, or pass --restart to discard them"
      )
    else:
      state = CampaignState(_initial_ids(config, dataset), config.to_dict())
    state.config = config.to_dict()
    oracle = make_oracle(config, workdir)
    dataset = oracle.start(state, dataset)  # the labels given so far
    inputs = dataset if features is None else linear_probe.with_features(dataset, *features)
    pool = device_pool.place(inputs, normalization, mesh, config.data, final_size)
    logger = reporting.MetricsLogger(
      workdir, config.log.tensorboard and distributed.is_main_process(), state.epochs_logged
    )
    campaign = cls(
      config,
      workdir,
      dataset,
      inputs,
      oracle,
      checkpointer,
      mesh,
      step_config,
      pool,
      normalization,
      learner,
      graphdef,
      train_state,
      state,
      logger,
    )
    say(campaign.describe())
    say(optimizer.recipe_summary(config))
    return campaign

  def run_rounds(self, stop: StopRequest) -> Outcome:
    """Rounds until the last is evaluated, a stop is asked for, or labels are awaited."""
    while True:
      if self.state.phase == "train" and not self.train_and_evaluate_round(stop):
        return "stopped"
      if self.state.round >= self.config.al.num_rounds - 1:
        return "done"  # the last round trains and is evaluated; it queries only if extended
      if stop.agreed():
        return "stopped"
      if not self.query_round():
        return "awaiting_labels"

  def train_and_evaluate_round(self, stop: StopRequest) -> bool:
    """Trains round `state.round` to its end, evaluates and records it; False if stopped."""
    s = self.state
    if s.round_starts:
      if s.round > 0 and optimizer.reinit_each_round(self.config):
        learner = _round_learner(self.config, self.dataset, self.step_config.use_aux, s.round)
        linear = self.config.model.train_mode == "linear"
        self.learner = linear_probe.probe_of(learner) if linear else learner
      self.graphdef, self.train_state = train.create_train_state(self.learner, self.step_config)
    self.train_state = sharding.replicate(self.train_state, self.mesh)
    start = time.perf_counter()
    finished = self._train(stop)
    s.train_seconds += time.perf_counter() - start
    if not finished:
      return False
    nnx.update(self.learner, self.train_state.params, self.train_state.batch_stats)
    split_over = self.mesh if self.config.data.shard_pool else None
    metrics = query.evaluate(
      self.learner, self.inputs, self.normalization, self.config.train.eval_batch_size, split_over
    )
    record = RoundRecord(
      round=s.round,
      num_labeled=len(s.labeled_ids),
      test_accuracy=metrics["accuracy"],
      per_class_accuracy=metrics["per_class_accuracy"],
      train_seconds=s.train_seconds,
      labeled_ids=list(s.labeled_ids),
    )
    s.finish_training(record)
    self.commit()
    self.logger.round(record.to_json())
    accuracy = record.test_accuracy
    accuracy = "no test set" if accuracy is None else f"test accuracy {100 * accuracy:.2f}%"
    say(
      f"round {s.round + 1}/{self.config.al.num_rounds}: {record.num_labeled} labeled, "
      f"{accuracy}, train {record.train_seconds:.1f}s"
    )
    return True

  def _train(self, stop: StopRequest) -> bool:
    """Epochs from `state` (epoch, step) to the round's end; False if a stop came first.

    Saves a checkpoint every `config.checkpoint.every_epochs` epochs.
    """
    s, cfg, tc = self.state, self.step_config, self.config.train
    labeled = s.labeled
    # Stream mode: the newly labeled images are cached here.
    padded_ids = padded(self.pool.rows(labeled), cfg.steps_per_epoch * cfg.batch_size)
    padded_ids = sharding.replicate(padded_ids, self.mesh)
    epochs = tqdm(
      range(s.epoch, tc.epochs),
      desc=f"round {s.round + 1} train",
      unit="epoch",
      disable=not self._progress,
      leave=False,
      initial=s.epoch,
      total=tc.epochs,
    )
    for epoch in epochs:
      if stop.agreed():  # all processes stop at the same epoch boundary
        return False
      plan = train.plan_epoch(
        cfg,
        padded_ids,
        len(labeled),
        seeds.epoch_key(self.config.seed, s.round, epoch),
        optimizer.learning_rate_at(tc, epoch),
        optimizer.detach_features_at(tc, epoch),
      )
      self.train_state, metrics, next_step = train.train_epoch(
        self.graphdef,
        cfg,
        self.train_state,
        self.pool.arrays,
        plan,
        first_step=s.step,
        should_stop=stop,
      )
      # The epoch's one host sync (the progress bar needs the sums anyway).
      metrics = None if metrics is None else jax.device_get(metrics)
      self._check_epoch(metrics, epoch)
      if next_step < train.num_steps(cfg, len(labeled)):  # stopped inside the epoch
        s.reached(epoch, next_step)
        return False
      s.reached(epoch + 1, 0)
      if metrics is not None:
        epochs.set_postfix(self.logger.epoch(metrics))
      every = self.config.checkpoint.every_epochs
      if every and s.epoch % every == 0 and s.epoch < tc.epochs:
        self.save()
        if self.config.log.checkpoints:
          say(f"checkpoint saved: round {s.round + 1}, epoch {s.epoch}")
    return True

  def _check_epoch(self, metrics: dict | None, epoch: int) -> None:
    """Diverged if a step of `epoch` had a non-finite loss: nothing of it is saved."""
    if metrics is None or int(metrics[train.NONFINITE_STEP]) < 0:
      return
    step = int(metrics[train.NONFINITE_STEP])
    raise self._diverged(
      f"the loss turned non-finite in round {self.state.round + 1}, "
      f"epoch {epoch + 1}, step {step + 1}"
    )

  def _diverged(self, what: str) -> Diverged:
    lower = self.config.train.learning_rate / 10
    return Diverged(
      f"training diverged: {what}; nothing non-finite was saved, the newest checkpoint in "
      f"{self.checkpointer.directory} (if any) is the last good one: rerun the same command "
      f"with a lower learning rate (e.g. --config.train.learning_rate={lower:g}) to resume "
      "from it, or pass --restart to start over"
    )

  def query_round(self) -> bool:
    """Selects round `state.round`'s query and has the oracle label it.

    True when the labels are in (the next round can train), False when the
    oracle waits for them.
    """
    s, al = self.state, self.config.al
    labeled = s.labeled
    say(
      f"round {s.round + 1}/{al.num_rounds}: querying {al.query_size} of "
      f"{min(al.subset_size, self.dataset.num_train - len(labeled))} unlabeled images"
    )
    start = time.perf_counter()
    selection, selected_scores = self._select(labeled)
    s.record_query(selection.ids, selection.scores, time.perf_counter() - start)
    labels_in = self.oracle.label(s, selection.ids, selected_scores)
    self.commit()
    return labels_in

  def _select(self, labeled: np.ndarray):
    """(selection, the selected ids' scores best first or None) of this round's strategy."""
    r, config = self.state.round, self.config
    excluded = np.union1d(labeled, np.asarray(self.state.skipped_ids, np.int64))
    unlabeled = np.setdiff1d(np.arange(self.dataset.num_train), excluded, assume_unique=True)
    context = strategies.QueryContext(
      learner=self.learner,
      dataset=self.inputs,
      subset_ids=seeds.random_subset(config.seed, r, unlabeled, config.al.subset_size),
      query_size=config.al.query_size,
      key=seeds.strategy_key(config.seed, r),
      normalization=self.normalization,
      query_config=config.query,
      labeled_ids=labeled,
      pool_split=config.data.shard_pool,
      mesh=self.mesh,
      progress=self._progress,
    )
    selection = strategies.get_strategy(config.strategy).select(context)
    selection.ids = np.asarray(selection.ids)
    if selection.scores is not None and not np.all(np.isfinite(selection.scores)):
      bad = int(np.sum(~np.isfinite(selection.scores)))
      raise self._diverged(
        f"{bad} of {len(selection.scores)} query scores of round {r + 1} "
        "are not finite, so nothing was queried"
      )
    if (
      len(np.unique(selection.ids)) != config.al.query_size
      or np.intersect1d(selection.ids, labeled).size
    ):
      raise RuntimeError(f"strategy {config.strategy} returned an invalid selection")
    if selection.scores is None:
      return selection, None
    where = {int(i): k for k, i in enumerate(context.subset_ids)}
    return selection, [float(selection.scores[where[int(i)]]) for i in selection.ids]

  # Checkpoints and reports.
  def save(self) -> None:
    """Checkpoints the state, never a non-finite one (Diverged instead)."""
    if not train.all_finite(self.train_state):
      s = self.state
      where = (
        f"after round {s.round + 1}'s training"
        if s.phase != "train"
        else f"in round {s.round + 1}, epoch {s.epoch + 1}, by step {s.step}"
        if s.step
        else f"in round {s.round + 1} by the end of epoch {s.epoch}"
      )
      raise self._diverged(f"the parameters turned non-finite {where}")
    self.state.epochs_logged = self.logger.epochs_done
    self.checkpointer.save(self.train_state, self.state.to_json())

  def commit(self) -> None:
    """Saves a checkpoint, then rewrites results.json and the plot to match it."""
    self.save()
    self.publish()

  def publish(self) -> None:
    if distributed.is_main_process():
      reporting.write_results(os.path.join(self.workdir, RESULTS_FILE), self.results())
      reporting.plot_accuracy(
        os.path.join(self.workdir, reporting.PLOT_FILE),
        [r.to_json() for r in self.state.rounds],
        f"{self.config.strategy} on {self.dataset.name}",
      )

  def results(self) -> dict:
    """What results.json holds (docs/running.md: What a campaign writes)."""
    d = self.dataset
    results = {
      "config": self.state.config,
      "use_aux": self.step_config.use_aux,
      "num_devices": jax.device_count(),
      "num_processes": jax.process_count(),
      "data": {
        "name": d.name,
        "num_train": d.num_train,
        "num_test": len(d.y_test),
        "class_names": list(d.class_names),
        "image_size": int(d.x_train.shape[1]),
        # what the predictor needs to feed new images to the model
        "normalization": {
          "mean": self.normalization[0].tolist(),
          "std": self.normalization[1].tolist(),
        },
      },
      "rounds": [r.to_json() for r in self.state.rounds],
    }
    awaiting = self.oracle.awaiting(self.state)
    if awaiting is not None:
      results["awaiting_labels"] = awaiting
    return results

  def report(self, outcome: Outcome, stop: StopRequest) -> dict:
    """Says how the run ended; returns the results."""
    if outcome == "awaiting_labels":
      say(self.oracle.instructions(self.state))
    elif outcome == "stopped":
      say(
        f"stopped by {stop.signal_name}: checkpoint saved in {self.checkpointer.directory} "
        f"({self.state.where()}); rerun the same command to resume"
      )
    else:
      self.publish()
      say("\n" + reporting.summary_table([r.to_json() for r in self.state.rounds]))
      say(f"results: {os.path.join(self.workdir, RESULTS_FILE)}")
    return self.results()

  def describe(self) -> str:
    """The data as loaded and the weights the model starts from (the run's first line,
    `launch.first_line`, gave the rest)."""
    d = self.dataset
    data = f"{d.name}: {d.num_train} training / {len(d.y_test)} test images, {d.num_classes} "
    data += f"classes{self.pool.describe()}"
    weights = pretrained.describe(self.config.model, d.num_classes)
    return f"{data}\n{weights}" if weights else data

  @property
  def _progress(self) -> bool:
    return self.config.log.progress and distributed.is_main_process()

  def __enter__(self) -> Campaign:
    return self

  def __exit__(self, *exc) -> None:
    self.checkpointer.close()  # waits for the asynchronous saves
    self.logger.close()


def _round_learner(config, dataset: Dataset, use_aux: bool, round_index: int) -> ActiveLearner:
  """The learner a round starts from when it does not start from the last round's."""
  key = seeds.model_init_key(config.seed, round_index)
  image_size = int(dataset.x_train.shape[1])
  return create_learner(
    config.model, dataset.num_classes, use_aux=use_aux, key=key, image_size=image_size
  )


def _initial_ids(config, dataset: Dataset) -> list[int]:
  """The first round's labeled set: the person's seed labels, or a random draw."""
  if config.oracle == "human":
    ids = dataset.seed_ids
  else:
    ids = seeds.initial_labeled_set(config.seed, dataset.num_train, config.al.initial_size)
  return [int(i) for i in ids]
