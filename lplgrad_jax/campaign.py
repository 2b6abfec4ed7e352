"""The active-learning campaign loop: train, evaluate, query, repeat.

Round r trains the learner on the labeled set (warm-started weights, a fresh
optimizer and schedule), evaluates it on the test split, records the round in
results.json, and, unless it is the last round, moves the B' best-scoring
images of a random subset R of the unlabeled pool to the labeled set.
All randomness is derived from the seed with `fold_in(seed, purpose, round, ...)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from lplgrad_jax import distributed
from lplgrad_jax import oracle
from lplgrad_jax import query
from lplgrad_jax import reporting
from lplgrad_jax import sharding
from lplgrad_jax import strategies
from lplgrad_jax import train
from lplgrad_jax.checkpoint import Checkpointer
from lplgrad_jax.data import Dataset, load_dataset
from lplgrad_jax.errors import ConfigError
from lplgrad_jax.distributed import say
from lplgrad_jax.models import COMPUTE_DTYPES, create_learner

# Purposes folded into the seed, so each stream is independent of the others.
_INITIAL_SET, _MODEL_INIT, _TRAIN, _QUERY = range(4)
ORACLES = ("simulated", "human")
RESULTS_FILE = "results.json"
PLOT_FILE = "accuracy.png"
# Settings that may change when a campaign is resumed: logging, checkpoint
# frequency, how processes meet and hold the pool (distributed.*: each host has its own
# process_id; data.shard_pool),
# memory and speed knobs (evaluation and query batch sizes, the epoch loop) and
# the number of rounds (to extend a campaign). Everything else must match.
RESUMABLE_KEYS = ("log.", "checkpoint.", "distributed.", "data.shard_pool", "al.num_rounds",
                  "train.eval_batch_size", "train.epoch_loop", "query.chunk_size")


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
  strategies.uses_aux(config)  # a known strategy, and a loss head if it needs one
  for name in ("al.initial_size", "al.query_size", "al.subset_size", "al.num_rounds",
               "train.epochs", "train.batch_size", "train.eval_batch_size",
               "query.chunk_size", "model.width"):
    section, key = name.split(".")
    _positive_int(config[section][key], name)
  if config.al.subset_size < config.al.query_size:
    raise ConfigError(f"al.subset_size={config.al.subset_size} is smaller than "
                      f"al.query_size={config.al.query_size}: expected subset_size >= query_size")
  if config.query.reduction not in query.REDUCTIONS:
    raise ConfigError(f"unknown query.reduction {config.query.reduction!r}: expected one of {', '.join(query.REDUCTIONS)}")
  if config.query.method not in query.METHODS:
    raise ConfigError(f"unknown query.method {config.query.method!r}: expected one of {', '.join(query.METHODS)}")
  for name in ("train.compute_dtype", "query.compute_dtype"):
    section, key = name.split(".")
    if config[section][key] not in COMPUTE_DTYPES:
      raise ConfigError(f"unknown {name} {config[section][key]!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
  train.resolve_epoch_loop(config.train.epoch_loop)
  if config.oracle not in ORACLES:
    raise ConfigError(f"unknown oracle {config.oracle!r}: expected one of {', '.join(ORACLES)}")
  if config.oracle == "human" and config.data.shard_pool:
    raise ConfigError("data.shard_pool=True with oracle 'human': the human oracle keeps the "
                      "whole labeling folder on every process; expected data.shard_pool=False")
  if config.oracle == "human" and config.data.source != "image_folder":
    raise ConfigError(f"oracle 'human' reads an image folder, not data.source="
                      f"{config.data.source!r}: set data.source='image_folder' and data.root "
                      "to a folder with labeled/<class>/ and unlabeled/")
  if config.train.augment not in ("crop_flip", "flip", "crop", "none"):
    raise ConfigError(f"unknown train.augment {config.train.augment!r}: expected crop_flip, crop, flip or none")


def check_budgets(al_config, pool_size: int, initial_size: int | None = None) -> int:
  """Returns the final labeled-set size; ConfigError if the budgets exceed the pool.

  `initial_size`: the seed set's size when it is given (the human oracle's
  labeled/ folder) rather than drawn (al.initial_size).
  """
  initial_name = "al.initial_size" if initial_size is None else "the labeled images"
  initial_size = al_config.initial_size if initial_size is None else initial_size
  if initial_size > pool_size:
    raise ConfigError(f"{initial_name}={initial_size} exceeds the pool of "
                      f"{pool_size} training images")
  final = initial_size + (al_config.num_rounds - 1) * al_config.query_size
  if final > pool_size:
    raise ConfigError(
        f"{initial_name} + (al.num_rounds - 1) * al.query_size = {initial_size} + "
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


def check_same_campaign(workdir: str, previous: dict, config_dict: dict) -> None:
  """Refuses to resume a campaign whose configuration differs in a key that matters."""
  old, new = _flatten(previous), _flatten(json.loads(json.dumps(config_dict)))
  differing = sorted(k for k in set(old) | set(new)
                     if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_KEYS))
  if differing:
    raise ConfigError(f"workdir {workdir} holds a campaign with another configuration "
                      f"(differing: {', '.join(differing)}): choose another --workdir, "
                      "or pass --restart to discard it")


def _previous_config(workdir: str, checkpointer: Checkpointer) -> dict | None:
  """The configuration of the campaign already in `workdir`, if any."""
  if checkpointer.exists():
    saved = checkpointer.latest_campaign()
    if saved is not None:
      return saved["config"]
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)["config"]
  except (OSError, ValueError, KeyError, TypeError):
    raise ConfigError(f"{path} is not a results file of this tool: choose another --workdir") from None


def initial_labeled_set(seed: int, pool_size: int, size: int) -> np.ndarray:
  perm = jax.random.permutation(derive_key(seed, _INITIAL_SET), pool_size)
  return np.sort(np.asarray(perm[:size]))


def random_subset(seed: int, round_index: int, unlabeled: np.ndarray, size: int) -> np.ndarray:
  """The random subset R of the unlabeled pool scored in one round."""
  perm = jax.random.permutation(derive_key(seed, _QUERY, round_index, 0), len(unlabeled))
  return unlabeled[np.asarray(perm[:size])]


class StopRequest:
  """SIGTERM/SIGINT handler: asks the campaign to checkpoint and exit at the next step boundary.

  With several processes the next epoch boundary instead, decided together
  (`agreed`): a process that left the step loop alone would wait in the
  checkpoint's barrier while the others wait in the next step's all-reduce.
  A second SIGINT interrupts at once (the default behaviour).
  """

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal_name = signal.Signals(signum).name
    signal.signal(signal.SIGINT, signal.default_int_handler)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

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


class _Logger:
  """TensorBoard scalars (tensorboardX) and the per-epoch summary of training metrics."""

  DIR = "tensorboard"

  def __init__(self, workdir: str, enabled: bool, epochs_done: int):
    self.writer = None
    if enabled:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(os.path.join(workdir, self.DIR))
    self.epochs_done = epochs_done

  def epoch(self, metrics) -> dict:
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
    if self.writer is not None and record["test_accuracy"] is not None:
      self.writer.add_scalar("test/accuracy", record["test_accuracy"], record["num_labeled"])
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def evaluate(learner, dataset: Dataset, normalization, batch_size: int) -> dict:
  """Test accuracy and per-class accuracy (0 for a class without test images).

  Both are None without a test split (a human-labeled folder without test/).
  """
  if not len(dataset.y_test):
    return {"accuracy": None, "per_class_accuracy": None}
  logits = query.model_outputs(learner, dataset.x_test, normalization, batch_size)["logits"]
  correct = np.argmax(logits, -1) == dataset.y_test
  per_class = [float(correct[dataset.y_test == c].mean()) if np.any(dataset.y_test == c) else 0.0
               for c in range(dataset.num_classes)]
  return {"accuracy": float(correct.mean()), "per_class_accuracy": per_class}


def _fresh_position(labeled: np.ndarray) -> dict:
  """Where a new campaign starts. `phase` is "train" (round `round` is training, next
  at `epoch`/`step`) or "query" (round `round` is trained and evaluated; its query is next)."""
  return {"round": 0, "phase": "train", "epoch": 0, "step": 0, "train_seconds": 0.0,
          "epochs_logged": 0, "labeled_ids": [int(i) for i in labeled], "rounds": []}


def run(config, workdir: str, *, restart: bool = False) -> dict:
  """Runs (or resumes) a campaign; writes results.json, the plot, logs and checkpoints.

  Rerunning the same command on the same workdir resumes from the newest
  checkpoint and ends with the same selections and accuracies as an
  uninterrupted run. `restart=True` discards the workdir's campaign first.
  """
  validate_config(config)
  distributed.initialize(config.distributed)  # before anything touches a device
  main_process = distributed.is_main_process()
  strategy = strategies.get_strategy(config.strategy)
  config_dict = config.to_dict()
  checkpointer = Checkpointer(workdir, keep=config.checkpoint.keep)
  if restart:
    if main_process:
      checkpointer.delete_all()
      for name in (RESULTS_FILE, PLOT_FILE):
        if os.path.exists(os.path.join(workdir, name)):
          os.remove(os.path.join(workdir, name))
      # queries/ stays: filled-in labels are a person's work (see oracle.filled_ids).
      shutil.rmtree(os.path.join(workdir, _Logger.DIR), ignore_errors=True)
    distributed.barrier("restart")
  previous = _previous_config(workdir, checkpointer)
  if previous is not None:
    check_same_campaign(workdir, previous, config_dict)
  human = config.oracle == "human"
  mesh = sharding.data_mesh()
  if config.train.batch_size % mesh.size:
    raise ConfigError(f"train.batch_size={config.train.batch_size} does not split over "
                      f"{mesh.size} devices: expected a multiple of {mesh.size}")
  dataset = load_dataset(config.data, human_oracle=human,
                         rows=sharding.process_rows(mesh) if config.data.shard_pool else None)
  al = config.al
  final_size = check_budgets(al, dataset.num_train, len(dataset.seed_ids) if human else None)
  os.makedirs(workdir, exist_ok=True)
  normalization = _pool_channel_stats(dataset)
  use_aux = strategies.uses_aux(config)
  cfg = train.StepConfig.from_config(config.train, final_size, use_aux, mesh,
                                     pool_sharded=config.data.shard_pool)
  learner = create_learner(config.model, dataset.num_classes, use_aux=use_aux,
                           key=derive_key(config.seed, _MODEL_INIT, 0),
                           image_size=int(dataset.x_train.shape[1]))
  graphdef, state = train.create_train_state(learner, cfg)
  state = sharding.replicate(state, mesh)  # restored with the shardings of this target
  if checkpointer.exists():
    state, position = checkpointer.restore(state)
    nnx.update(learner, state.params, state.batch_stats)
    say(f"resuming from {checkpointer.directory}: round {position['round'] + 1}, "
        f"{position['phase']} phase, epoch {position['epoch']}")
  elif previous is not None:
    raise ConfigError(f"workdir {workdir} holds results but no checkpoint to resume from: "
                      "choose another --workdir, or pass --restart to discard them")
  else:
    position = _fresh_position(dataset.seed_ids if human else initial_labeled_set(
        config.seed, dataset.num_train, al.initial_size))
  position["config"] = config_dict
  if human:  # the person's labels so far, and those of a query just filled in
    _check_same_photos(position, dataset, config.data.root)
    dataset = _with_human_labels(dataset, position, workdir)
  pool = (sharding.shard_rows((dataset.x_train, dataset.y_train), dataset.num_train, mesh)
          if config.data.shard_pool else
          sharding.replicate((dataset.x_train, dataset.y_train), mesh))
  results = {"config": config_dict, "use_aux": use_aux, "num_devices": jax.device_count(),
             "num_processes": jax.process_count(),
             "data": {"name": dataset.name, "num_train": dataset.num_train,
                      "num_test": len(dataset.y_test), "class_names": list(dataset.class_names),
                      "image_size": int(dataset.x_train.shape[1]),
                      # what the predictor needs to feed new images to the model
                      "normalization": {"mean": normalization[0].tolist(),
                                        "std": normalization[1].tolist()}},
             "rounds": position["rounds"]}
  logger = _Logger(workdir, config.log.tensorboard and main_process, position["epochs_logged"])
  say(f"{dataset.name}: {dataset.num_train} training / {len(dataset.y_test)} test images, "
      f"{dataset.num_classes} classes; strategy {config.strategy}, {al.num_rounds} rounds, "
      f"{final_size - (al.num_rounds - 1) * al.query_size} -> {final_size} labeled; "
      f"{jax.device_count()} device(s) ({jax.devices()[0].platform})"
      + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""))

  def save(state):
    position["epochs_logged"] = logger.epochs_done
    checkpointer.save(state, position)

  def publish():
    if not main_process:
      return
    reporting.write_results(os.path.join(workdir, RESULTS_FILE), results)
    reporting.plot_accuracy(os.path.join(workdir, PLOT_FILE), results["rounds"],
                            f"{config.strategy} on {dataset.name}")

  stopped = False
  try:
    with StopRequest() as stop:
      while True:
        r = position["round"]
        labeled = np.asarray(position["labeled_ids"], np.int32)
        if position["phase"] == "train":
          if position["epoch"] == 0 and position["step"] == 0:  # a round starts
            if r > 0 and config.train.reinit_each_round:
              learner = create_learner(config.model, dataset.num_classes, use_aux=use_aux,
                                       key=derive_key(config.seed, _MODEL_INIT, r),
                                       image_size=int(dataset.x_train.shape[1]))
            graphdef, state = train.create_train_state(learner, cfg)  # fresh optimizer
          state = sharding.replicate(state, mesh)
          start = time.perf_counter()
          state = _train_round(state, graphdef, config, cfg, pool, labeled, position,
                               normalization, logger, stop, save)
          position["train_seconds"] += time.perf_counter() - start
          if stop.agreed():
            stopped = True
            save(state)
            break
          nnx.update(learner, state.params, state.batch_stats)
          metrics = evaluate(learner, dataset, normalization, config.train.eval_batch_size)
          record = {"round": r, "num_labeled": int(len(labeled)),
                    "test_accuracy": metrics["accuracy"],
                    "per_class_accuracy": metrics["per_class_accuracy"],
                    "train_seconds": position["train_seconds"], "query_seconds": 0.0,
                    "labeled_ids": [int(i) for i in labeled], "queried_ids": []}
          position["rounds"].append(record)
          position.update(phase="query", epoch=0, step=0, train_seconds=0.0)
          save(state)
          publish()
          logger.round(record)
          accuracy = ("no test set" if record["test_accuracy"] is None
                      else f"test accuracy {100 * record['test_accuracy']:.2f}%")
          say(f"round {r + 1}/{al.num_rounds}: {record['num_labeled']} labeled, {accuracy}, "
              f"train {record['train_seconds']:.1f}s")
        if r >= al.num_rounds - 1:
          break  # the last round trains and is evaluated; it queries only if extended
        if stop.agreed():
          stopped = True
          break
        record = position["rounds"][r]
        say(f"round {r + 1}/{al.num_rounds}: querying {al.query_size} of "
            f"{min(al.subset_size, dataset.num_train - len(labeled))} unlabeled images")
        start = time.perf_counter()
        selection, selected_scores = _query(strategy, config, learner, dataset, labeled,
                                            position.get("skipped_ids", []), r, normalization,
                                            pool if config.data.shard_pool else None, mesh)
        record["query_seconds"] = time.perf_counter() - start
        record["queried_ids"] = [int(i) for i in selection.ids]
        if selection.scores is not None:
          record["query_scores"] = _score_summary(selection.scores)
        if human:  # the person labels the query; the next run reads their labels
          results["awaiting_labels"] = csv_path = oracle.query_csv_path(workdir, r + 1)
          filled = oracle.filled_ids(csv_path)
          if filled == set(record["queried_ids"]):
            say(f"keeping the labels already written in {csv_path}")
          elif main_process:
            if filled is not None:  # labels of another query: set aside, never wiped
              os.replace(csv_path, f"{csv_path}.{int(time.time())}.bak")
            oracle.write_query(
                workdir, r + 1, selection.ids, [dataset.train_files[i] for i in selection.ids],
                selected_scores, dataset.x_train[selection.ids], dataset.class_names)
          position.update(phase="labels", pending_ids=record["queried_ids"])
          save(state)
          publish()
          break
        position.update(round=r + 1, phase="train", epoch=0, step=0,
                        labeled_ids=[int(i) for i in np.sort(
                            np.concatenate([labeled, selection.ids]))])
        save(state)
        publish()
        if stop.agreed():
          stopped = True
          break
  finally:
    checkpointer.close()  # waits for the asynchronous saves
    logger.close()
  if "awaiting_labels" in results:
    csv_path = results["awaiting_labels"]
    say(f"round {position['round'] + 1}: {len(position['pending_ids'])} images to label. "
        f"Write a class name ({', '.join(dataset.class_names)}) or {oracle.SKIP!r} in the "
        f"label column of every row of {csv_path} (thumbnails: "
        f"{oracle.contact_sheet_path(workdir, position['round'] + 1)}), "
        "then rerun the same command (without --restart) to continue")
    return results
  if stopped:
    say(f"stopped by {stop.signal_name}: checkpoint saved in {checkpointer.directory} "
        f"(round {position['round'] + 1}, {position['phase']} phase, epoch "
        f"{position['epoch']}); rerun the same command to resume")
    return results
  publish()
  say("\n" + reporting.summary_table(results["rounds"]))
  say(f"results: {os.path.join(workdir, RESULTS_FILE)}")
  return results


def _train_round(state, graphdef, config, cfg, pool, labeled, position, normalization,
                 logger, stop, save):
  """Trains from `position` (epoch, step) to the end of the round, or until a stop request.

  Saves a checkpoint every `config.checkpoint.every_epochs` epochs; `position`
  tracks the next epoch and step.
  """
  tc = config.train
  padded_ids = np.zeros(cfg.steps_per_epoch * cfg.batch_size, np.int32)
  padded_ids[:len(labeled)] = labeled
  padded_ids = sharding.replicate(padded_ids, cfg.mesh)
  epochs = tqdm(range(position["epoch"], tc.epochs), desc=f"round {position['round'] + 1} train",
                unit="epoch", disable=not (config.log.progress and distributed.is_main_process()), leave=False,
                initial=position["epoch"], total=tc.epochs)
  for epoch in epochs:
    state, metrics, next_step = train.train_epoch(
        graphdef, cfg, state, pool[0], pool[1], padded_ids, len(labeled),
        derive_key(config.seed, _TRAIN, position["round"], epoch),
        train.learning_rate_at(tc, epoch), epoch >= tc.detach_features_epoch,
        *normalization, first_step=position["step"], should_stop=stop)
    if next_step < train.num_steps(cfg, len(labeled)):  # stopped inside the epoch
      position.update(epoch=epoch, step=next_step)
      return state
    position.update(epoch=epoch + 1, step=0)
    if metrics is not None:
      epochs.set_postfix(logger.epoch(metrics))
    every = config.checkpoint.every_epochs
    if every and position["epoch"] % every == 0 and position["epoch"] < tc.epochs:
      save(state)
      if config.log.checkpoints:
        say(f"checkpoint saved: round {position['round'] + 1}, epoch {position['epoch']}")
    if position["epoch"] < tc.epochs and stop.agreed():  # several processes stop here
      return state
  return state


def _pool_channel_stats(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of the whole pool, also when each process holds a shard."""
  if dataset.pool_size is None:
    return dataset.channel_stats()
  pixels = dataset.x_train.reshape(-1, 3).astype(np.float64) / 255.0
  count = distributed.sum_over_processes(np.array([len(pixels)]))[0]
  mean = distributed.sum_over_processes(pixels.sum(0)) / count
  var = distributed.sum_over_processes(np.square(pixels - mean).sum(0)) / count
  return mean.astype(np.float32), np.maximum(np.sqrt(var), 1e-3).astype(np.float32)


def _check_same_photos(position: dict, dataset: Dataset, root: str) -> None:
  """Refuses a labeling folder whose photos changed since the campaign started.

  Ids are positions in the sorted file list, and the checkpoint keeps ids: one
  photo added or removed would move every later label to another photo.
  """
  root = os.path.abspath(os.path.expanduser(root))
  files = [os.path.relpath(f, root) for f in dataset.train_files]
  before = position.setdefault("pool_files", files)
  if before != files:
    added, removed = sorted(set(files) - set(before)), sorted(set(before) - set(files))
    change = (f"{added[0]} was added" if added else f"{removed[0]} was removed" if removed
              else "the photos were renamed or reordered")
    raise ConfigError(
        f"{root} changed since this campaign started ({change}; {len(added)} added, "
        f"{len(removed)} removed): ids follow the photos' order, so the labels given so far "
        "would attach to other photos; restore the folder, or start a new --workdir")


def _with_human_labels(dataset: Dataset, position: dict, workdir: str) -> Dataset:
  """`dataset` with the labels the person gave; reads the query they were asked to fill in.

  A filled query file moves its labeled ids to the labeled set (skipped ones
  out of the pool) and starts the next round. A bad file raises LabelFileError
  before anything changes.
  """
  if position["phase"] == "labels":
    r = position["round"]
    answers = oracle.read_labels(oracle.query_csv_path(workdir, r + 1), position["pending_ids"],
                                 dataset.class_names)
    labels = position.setdefault("human_labels", {})
    labels.update({str(i): c for i, c in answers.items() if c is not None})
    skipped = [i for i, c in answers.items() if c is None]
    position.setdefault("skipped_ids", []).extend(skipped)
    position["rounds"][r]["skipped_ids"] = skipped
    new = [i for i, c in answers.items() if c is not None]
    position.update(round=r + 1, phase="train", epoch=0, step=0,
                    labeled_ids=sorted(position["labeled_ids"] + new))
    position.pop("pending_ids")
    say(f"round {r + 1}: read {len(new)} labels and {len(skipped)} skips from "
        f"{oracle.query_csv_path(workdir, r + 1)}")
  y_train = dataset.y_train.copy()
  for i, c in position.get("human_labels", {}).items():
    y_train[int(i)] = c
  return dataclasses.replace(dataset, y_train=y_train)


def _query(strategy, config, learner, dataset, labeled, skipped, round_index, normalization,
           sharded_pool, mesh):
  """(selection, the selected ids' scores best first or None) of one round's query."""
  excluded = np.union1d(labeled, np.asarray(skipped, np.int64))
  unlabeled = np.setdiff1d(np.arange(dataset.num_train), excluded, assume_unique=True)
  context = strategies.QueryContext(
      learner=learner, dataset=dataset,
      subset_ids=random_subset(config.seed, round_index, unlabeled, config.al.subset_size),
      query_size=config.al.query_size, key=derive_key(config.seed, _QUERY, round_index, 1),
      normalization=normalization, query_config=config.query, labeled_ids=labeled,
      sharded_pool=sharded_pool, mesh=mesh,
      progress=config.log.progress and distributed.is_main_process())
  selection = strategy.select(context)
  selection.ids = np.asarray(selection.ids)
  if (len(np.unique(selection.ids)) != config.al.query_size
      or np.intersect1d(selection.ids, labeled).size):
    raise RuntimeError(f"strategy {config.strategy} returned an invalid selection")
  selected_scores = None
  if selection.scores is not None:
    where = {int(i): k for k, i in enumerate(context.subset_ids)}
    selected_scores = [float(selection.scores[where[int(i)]]) for i in selection.ids]
  return selection, selected_scores


def _score_summary(scores: np.ndarray) -> dict:
  return {"min": float(np.min(scores)), "median": float(np.median(scores)),
          "max": float(np.max(scores)), "mean": float(np.mean(scores))}
