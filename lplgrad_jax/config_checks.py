"""What a configuration must satisfy: value checks, budgets, and resume compatibility.

`validate_config` runs before anything loads; `check_budgets` once the pool's
size is known; `check_same_campaign` before a workdir's campaign is resumed.
"""

from __future__ import annotations

import json
import math
import os

from lplgrad_jax import data
from lplgrad_jax import models
from lplgrad_jax import optimizer
from lplgrad_jax import query
from lplgrad_jax import strategies
from lplgrad_jax import train
from lplgrad_jax.configs import default
from lplgrad_jax.data.dataset import normalization_in_effect
from lplgrad_jax.errors import ConfigError
from lplgrad_jax.errors import check_choice
from lplgrad_jax.linear_probe import TRAIN_MODES
from lplgrad_jax.models import COMPUTE_DTYPES
from lplgrad_jax.pretrained import weights_file

ORACLES = ("simulated", "human")
AUGMENTATIONS = ("crop_flip", "crop", "flip", "none")
# Settings that may change when a campaign is resumed: logging, checkpoint
# frequency, how processes meet and hold the pool (distributed.*: each host has its own
# process_id; data.shard_pool, data.stream), memory and speed knobs (evaluation and query batch
# sizes, the epoch loop), the number of rounds (to extend a campaign) and the learning
# rate (to resume a diverged campaign from its last good checkpoint with a lower one).
# Everything else must match.
RESUMABLE_KEYS = (
  "log.",
  "checkpoint.",
  "distributed.",
  "data.shard_pool",
  "data.stream",
  "al.num_rounds",
  "train.eval_batch_size",
  "train.epoch_loop",
  "query.chunk_size",
  "train.learning_rate",
  "train.backbone_learning_rate",
)
_POSITIVE_INTS = (
  "al.initial_size",
  "al.query_size",
  "al.subset_size",
  "al.num_rounds",
  "train.epochs",
  "train.batch_size",
  "train.eval_batch_size",
  "query.chunk_size",
  "model.width",
)


# Every other numeric key: (name, smallest, largest, integer); None = unbounded.
_RANGES = (
  ("seed", 0, None, True),
  ("data.image_size", 8, None, True),
  ("model.loss_head_width", 1, None, True),
  ("train.momentum", 0.0, 1.0, False),
  ("train.weight_decay", 0.0, None, False),
  ("train.aux_weight", 0.0, None, False),
  ("train.margin", 0.0, None, False),
  ("train.detach_features_epoch", 0, None, True),
  ("train.crop_padding", 0, None, True),
  ("checkpoint.every_epochs", 0, None, True),  # 0: only at round ends and on signals
  ("checkpoint.keep", 0, None, True),  # 0: keep every checkpoint
  ("distributed.num_processes", 0, None, True),
  ("distributed.process_id", -1, None, True),
  ("distributed.initialization_timeout_seconds", 1, None, True),
  ("distributed.heartbeat_timeout_seconds", 1, None, True),
  ("distributed.shutdown_timeout_seconds", 1, None, True),
)
_POSITIVE_FLOATS = ("train.learning_rate", "train.lr_decay", "train.backbone_learning_rate")
_UNSET_ALLOWED = ("train.backbone_learning_rate",)  # None: train.learning_rate


def _value(config, name: str):
  if "." not in name:
    return config[name]
  section, key = name.split(".")
  return config[section][key]


def _number(value, name: str, low, high, integer: bool):
  """`value` if it is a finite number (an int if `integer`) within [low, high]."""
  kinds = (int,) if integer else (int, float)
  ok = (
    isinstance(value, kinds)
    and not isinstance(value, bool)
    and math.isfinite(value)
    and (low is None or value >= low)
    and (high is None or value <= high)
  )
  if not ok:
    kind = "an integer" if integer else "a number"
    bounds = f"between {low} and {high}" if high is not None else f">= {low}"
    raise ConfigError(f"{name}={value!r}: expected {kind} {bounds}")
  return value


def _positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f"{name}={value!r}: expected a positive integer")
  return value


def validate_config(config) -> None:
  """Checks what can be checked before any data is loaded."""
  strategies.uses_aux(config)  # a known strategy, and a loss head if it needs one
  for name in _POSITIVE_INTS:
    _positive_int(_value(config, name), name)
  for name, low, high, integer in _RANGES:
    _number(_value(config, name), name, low, high, integer)
  for name in _POSITIVE_FLOATS:
    value = _value(config, name)
    if value is None and name in _UNSET_ALLOWED:
      continue
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
      raise ConfigError(f"{name}={value!r}: expected a number > 0")
  for milestone in config.train.lr_milestones:
    _number(milestone, "train.lr_milestones entry", 0, None, True)
  if config.al.subset_size < config.al.query_size:
    raise ConfigError(
      f"al.subset_size={config.al.subset_size} is smaller than "
      f"al.query_size={config.al.query_size}: expected subset_size >= query_size"
    )
  check_choice(config.query.reduction, query.REDUCTIONS, "query.reduction")
  check_choice(config.query.method, query.METHODS, "query.method")
  for name in ("train.compute_dtype", "query.compute_dtype"):
    check_choice(_value(config, name), COMPUTE_DTYPES, name)
  train.resolve_epoch_loop(config.train.epoch_loop)
  check_choice(config.oracle, ORACLES, "oracle")
  if config.oracle == "human" and config.data.shard_pool:
    raise ConfigError(
      "data.shard_pool=True with oracle 'human': the human oracle keeps the "
      "whole labeling folder on every process; expected data.shard_pool=False"
    )
  if config.oracle == "human" and config.data.source != "image_folder":
    raise ConfigError(
      f"oracle 'human' reads an image folder, not data.source="
      f"{config.data.source!r}: set data.source='image_folder' and data.root "
      "to a folder with labeled/<class>/ and unlabeled/"
    )
  check_choice(config.train.augment, AUGMENTATIONS, "train.augment")
  # The recipe's choices (docs/fidelity.md).
  check_choice(config.model.init, models.INITS, "model.init")
  check_choice(config.model.bn_running_var, models.BN_RUNNING_VARS, "model.bn_running_var")
  check_choice(config.train.aux_lr_schedule, optimizer.AUX_LR_SCHEDULES, "train.aux_lr_schedule")
  check_choice(config.train.detach_rule, optimizer.DETACH_RULES, "train.detach_rule")
  check_choice(config.data.normalization, data.NORMALIZATIONS, "data.normalization")
  if config.model.pretrained:
    weights_file.check_path(config.model.pretrained)
  if check_choice(config.model.train_mode, TRAIN_MODES, "model.train_mode") == "linear" and not (
    config.model.pretrained
  ):
    raise ConfigError(
      "model.train_mode='linear' freezes the backbone: expected pretrained weights in "
      "model.pretrained"
    )


def check_batch_split(batch_size: int, num_devices: int) -> None:
  if batch_size % num_devices:
    raise ConfigError(
      f"train.batch_size={batch_size} does not split over "
      f"{num_devices} devices: expected a multiple of {num_devices}"
    )


def check_budgets(al_config, pool_size: int, initial_size: int | None = None) -> int:
  """Returns the final labeled-set size; ConfigError if the budgets exceed the pool.

  `initial_size`: the seed set's size when it is given (the human oracle's
  labeled/ folder) rather than drawn (al.initial_size).
  """
  initial_name = "al.initial_size" if initial_size is None else "the labeled images"
  initial_size = al_config.initial_size if initial_size is None else initial_size
  if initial_size > pool_size:
    raise ConfigError(
      f"{initial_name}={initial_size} exceeds the pool of {pool_size} training images"
    )
  final = initial_size + (al_config.num_rounds - 1) * al_config.query_size
  if final > pool_size:
    raise ConfigError(
      f"{initial_name} + (al.num_rounds - 1) * al.query_size = {initial_size} + "
      f"{al_config.num_rounds - 1} * {al_config.query_size} = {final} exceeds the pool of "
      f"{pool_size} training images"
    )
  return final


def _resolved(flat: dict) -> dict:
  """`flat` with the settings whose unset or automatic value depends on others resolved."""
  weights = bool(flat.get("model.pretrained"))
  flat["data.normalization"] = normalization_in_effect(flat.get("data.normalization"), weights)
  flat["train.reinit_each_round"] = optimizer.reinit_choice(
    flat.get("train.reinit_each_round"), weights
  )
  return flat


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      flat.update(_flatten(v, f"{prefix}{k}."))
    else:
      flat[prefix + k] = list(v) if isinstance(v, tuple) else v
  return flat


def check_same_campaign(workdir: str, previous: dict, config_dict: dict) -> None:
  """Refuses to resume a campaign whose configuration differs in a key that matters.

  Keys a campaign of an earlier version lacks count at their defaults, and settings compare
  by what they resolve to (e.g. normalization "auto" without pretrained weights is "fixed").
  """
  defaults = _flatten(default.get_config().to_dict())
  old, new = (
    _resolved({**defaults, **_flatten(json.loads(json.dumps(c)))}) for c in (previous, config_dict)
  )
  differing = sorted(
    k for k in set(old) | set(new) if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_KEYS)
  )
  if differing:
    raise ConfigError(
      f"workdir {workdir} holds a campaign with another configuration "
      f"(differing: {', '.join(differing)}): choose another --workdir, "
      "or pass --restart to discard it"
    )


def previous_config(workdir: str, checkpointer, results_file: str) -> dict | None:
  """The configuration of the campaign already in `workdir`, if any."""
  if checkpointer.exists():
    saved = checkpointer.latest_campaign()
    if saved is not None:
      return saved["config"]
  path = os.path.join(workdir, results_file)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)["config"]
  except (OSError, ValueError, KeyError, TypeError):
    raise ConfigError(
      f"{path} is not a results file of this tool: choose another --workdir"
    ) from None
