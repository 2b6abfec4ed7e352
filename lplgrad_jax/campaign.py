"""The active-learning campaign loop: train, evaluate, query, repeat.

Round r trains the learner on the labeled set (warm-started weights, a fresh
optimizer and schedule), evaluates it on the test split, records the round in
results.json, and, unless it is the last round, moves the B' best-scoring
images of a random subset R of the unlabeled pool to the labeled set.
All randomness is derived from the seed with `fold_in(seed, purpose, round, ...)`.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from lplgrad_jax import reporting
from lplgrad_jax import strategies
from lplgrad_jax import train
from lplgrad_jax.data import Dataset, load_dataset
from lplgrad_jax.errors import ConfigError
from lplgrad_jax.models import create_learner
from lplgrad_jax.query import REDUCTIONS

# Purposes folded into the seed, so each stream is independent of the others.
_INITIAL_SET, _MODEL_INIT, _TRAIN, _QUERY = range(4)
RESULTS_FILE = "results.json"
PLOT_FILE = "accuracy.png"
# Keys that may differ between a workdir's campaign and the command rerun on it.
_FREE_KEYS = ("log.",)


def derive_key(seed: int, *path: int) -> jax.Array:
  key = jax.random.key(seed)
  for p in path:
    key = jax.random.fold_in(key, p)
  return key


def _positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f"{name}={value!r}: expected a positive integer")
  return value


def validate_config(config) -> None:
  """Checks what can be checked before any data is loaded."""
  strategies.get_strategy(config.strategy)
  for name in ("al.initial_size", "al.query_size", "al.subset_size", "al.num_rounds",
               "train.epochs", "train.batch_size", "train.eval_batch_size",
               "query.chunk_size", "model.width"):
    section, key = name.split(".")
    _positive_int(config[section][key], name)
  if config.al.subset_size < config.al.query_size:
    raise ConfigError(f"al.subset_size={config.al.subset_size} is smaller than "
                      f"al.query_size={config.al.query_size}: expected subset_size >= query_size")
  if config.query.reduction not in REDUCTIONS:
    raise ConfigError(f"unknown query.reduction {config.query.reduction!r}: expected one of {', '.join(REDUCTIONS)}")
  if config.train.augment not in ("crop_flip", "flip", "crop", "none"):
    raise ConfigError(f"unknown train.augment {config.train.augment!r}: expected crop_flip, crop, flip or none")


def check_budgets(al_config, pool_size: int) -> int:
  """Returns the final labeled-set size; ConfigError if the budgets exceed the pool."""
  if al_config.initial_size > pool_size:
    raise ConfigError(f"al.initial_size={al_config.initial_size} exceeds the pool of "
                      f"{pool_size} training images")
  final = al_config.initial_size + (al_config.num_rounds - 1) * al_config.query_size
  if final > pool_size:
    raise ConfigError(
        f"al.initial_size + (al.num_rounds - 1) * al.query_size = {al_config.initial_size} + "
        f"{al_config.num_rounds - 1} * {al_config.query_size} = {final} exceeds the pool of "
        f"{pool_size} training images")
  return final


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      flat.update(_flatten(v, f"{prefix}{k}."))
    else:
      flat[prefix + k] = list(v) if isinstance(v, tuple) else v
  return flat


def check_workdir(workdir: str, config_dict: dict) -> None:
  """Refuses a workdir that holds a campaign with another configuration."""
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      previous = json.load(f)["config"]
  except (OSError, ValueError, KeyError, TypeError):
    raise ConfigError(f"{path} is not a results file of this tool: choose another --workdir") from None
  old, new = _flatten(previous), _flatten(json.loads(json.dumps(config_dict)))
  differing = sorted(k for k in set(old) | set(new)
                     if old.get(k) != new.get(k) and not k.startswith(_FREE_KEYS))
  if differing:
    raise ConfigError(f"workdir {workdir} holds a campaign with another configuration "
                      f"(differing: {', '.join(differing)}): choose another --workdir")


def initial_labeled_set(seed: int, pool_size: int, size: int) -> np.ndarray:
  perm = jax.random.permutation(derive_key(seed, _INITIAL_SET), pool_size)
  return np.sort(np.asarray(perm[:size]))


def random_subset(seed: int, round_index: int, unlabeled: np.ndarray, size: int) -> np.ndarray:
  """The random subset R of the unlabeled pool scored in one round."""
  perm = jax.random.permutation(derive_key(seed, _QUERY, round_index, 0), len(unlabeled))
  return unlabeled[np.asarray(perm[:size])]


def train_round(learner, config, cfg: train.StepConfig, pool, labeled: np.ndarray,
                round_index: int, normalization, on_epoch) -> None:
  """Trains `learner` in place on the labeled ids with a fresh optimizer and schedule."""
  tc = config.train
  graphdef, state = train.create_train_state(learner, cfg)
  padded_ids = np.zeros(cfg.steps_per_epoch * cfg.batch_size, np.int32)
  padded_ids[:len(labeled)] = labeled
  epochs = tqdm(range(tc.epochs), desc=f"round {round_index} train", unit="epoch",
                disable=not config.log.progress, leave=False)
  pending = None  # an epoch's metrics are read once the next epoch is queued
  for epoch in epochs:
    state, metrics = train.train_epoch(
        graphdef, cfg, state, pool[0], pool[1], padded_ids, len(labeled),
        derive_key(config.seed, _TRAIN, round_index, epoch),
        train.learning_rate_at(tc, epoch), epoch >= tc.detach_features_epoch,
        *normalization)
    if pending is not None:
      epochs.set_postfix(on_epoch(*pending))
    pending = (epoch, metrics)
  if pending is not None:
    epochs.set_postfix(on_epoch(*pending))
  nnx.update(learner, state.params, state.batch_stats)


def evaluate(learner, dataset: Dataset, normalization, batch_size: int) -> dict:
  graphdef, params, batch_stats = nnx.split(
      nnx.view(learner, use_running_average=True), nnx.Param, nnx.BatchStat)
  return train.evaluate(graphdef, params, batch_stats, dataset.x_test, dataset.y_test,
                        *normalization, batch_size, dataset.num_classes)


class _Logger:
  """TensorBoard scalars (tensorboardX) and the per-epoch summary of training metrics."""

  def __init__(self, workdir: str, enabled: bool):
    self.writer = None
    if enabled:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.epochs_done = 0

  def epoch(self, round_index: int, epoch: int, metrics) -> dict:
    m = jax.device_get(metrics)
    count = max(float(m["count"]), 1.0)
    summary = {"loss": float(m["loss"]) / count, "main_loss": float(m["main_loss"]) / count,
               "aux_loss": float(m["aux_loss"]) / count, "accuracy": float(m["correct"]) / count}
    if self.writer is not None:
      for name, value in summary.items():
        self.writer.add_scalar(f"train/{name}", value, self.epochs_done)
    self.epochs_done += 1
    return {"loss": f"{summary['loss']:.3f}", "acc": f"{summary['accuracy']:.3f}"}

  def round(self, record: dict) -> None:
    if self.writer is not None:
      self.writer.add_scalar("test/accuracy", record["test_accuracy"], record["num_labeled"])
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def run(config, workdir: str) -> dict:
  """Runs a whole campaign; writes results.json, the plot and logs into `workdir`."""
  validate_config(config)
  strategy = strategies.get_strategy(config.strategy)
  config_dict = config.to_dict()
  check_workdir(workdir, config_dict)
  dataset = load_dataset(config.data)
  al = config.al
  final_size = check_budgets(al, dataset.num_train)
  os.makedirs(workdir, exist_ok=True)

  normalization = dataset.channel_stats()
  pool = (jax.device_put(dataset.x_train), jax.device_put(dataset.y_train))
  cfg = train.StepConfig.from_config(config.train, final_size)
  learner = create_learner(config.model, dataset.num_classes, use_aux=config.train.use_aux,
                           key=derive_key(config.seed, _MODEL_INIT, 0))
  labeled = initial_labeled_set(config.seed, dataset.num_train, al.initial_size)
  logger = _Logger(workdir, config.log.tensorboard)
  results = {"config": config_dict, "num_devices": jax.device_count(),
             "data": {"name": dataset.name, "num_train": dataset.num_train,
                      "num_test": len(dataset.y_test), "class_names": list(dataset.class_names)},
             "rounds": []}
  print(f"{dataset.name}: {dataset.num_train} training / {len(dataset.y_test)} test images, "
        f"{dataset.num_classes} classes; strategy {config.strategy}, {al.num_rounds} rounds, "
        f"{al.initial_size} -> {final_size} labeled; {jax.device_count()} device(s) "
        f"({jax.devices()[0].platform})", flush=True)

  for round_index in range(al.num_rounds):
    if round_index > 0 and config.train.reinit_each_round:
      learner = create_learner(config.model, dataset.num_classes, use_aux=config.train.use_aux,
                               key=derive_key(config.seed, _MODEL_INIT, round_index))
    start = time.perf_counter()
    train_round(learner, config, cfg, pool, labeled, round_index, normalization,
                lambda epoch, metrics: logger.epoch(round_index, epoch, metrics))
    train_seconds = time.perf_counter() - start
    metrics = evaluate(learner, dataset, normalization, config.train.eval_batch_size)
    record = {"round": round_index, "num_labeled": int(len(labeled)),
              "test_accuracy": metrics["accuracy"],
              "per_class_accuracy": metrics["per_class_accuracy"],
              "train_seconds": train_seconds, "query_seconds": 0.0,
              "labeled_ids": [int(i) for i in labeled], "queried_ids": []}

    if round_index < al.num_rounds - 1:
      start = time.perf_counter()
      unlabeled = np.setdiff1d(np.arange(dataset.num_train), labeled, assume_unique=True)
      context = strategies.QueryContext(
          learner=learner, dataset=dataset,
          subset_ids=random_subset(config.seed, round_index, unlabeled, al.subset_size),
          query_size=al.query_size, key=derive_key(config.seed, _QUERY, round_index, 1),
          normalization=normalization, query_config=config.query,
          progress=config.log.progress)
      selected = np.asarray(strategy(context).ids)
      if (len(np.unique(selected)) != al.query_size
          or np.intersect1d(selected, labeled).size):
        raise RuntimeError(f"strategy {config.strategy} returned an invalid selection")
      labeled = np.sort(np.concatenate([labeled, selected]))
      record["query_seconds"] = time.perf_counter() - start
      record["queried_ids"] = [int(i) for i in selected]

    results["rounds"].append(record)
    reporting.write_results(os.path.join(workdir, RESULTS_FILE), results)
    reporting.plot_accuracy(os.path.join(workdir, PLOT_FILE), results["rounds"],
                            f"{config.strategy} on {dataset.name}")
    logger.round(record)
    print(f"round {round_index + 1}/{al.num_rounds}: {record['num_labeled']} labeled, "
          f"test accuracy {100 * record['test_accuracy']:.2f}%, train "
          f"{train_seconds:.1f}s, query {record['query_seconds']:.1f}s", flush=True)

  logger.close()
  print("\n" + reporting.summary_table(results["rounds"]), flush=True)
  print(f"results: {os.path.join(workdir, RESULTS_FILE)}", flush=True)
  return results
