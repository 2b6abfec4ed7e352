"""The optimizer and its schedule: PyTorch's SGD as the authors' code runs it, the per-epoch
learning rates of the main model and the loss-prediction module, and the epoch from which the
ranking loss stops reaching the main model."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from lplgrad_jax.errors import check_choice


class LearningRates(NamedTuple):
  """The step sizes of the main model's and the loss-prediction module's parameters."""

  main: float
  aux: float


AUX_LR_SCHEDULES = ("constant", "decay")
DETACH_RULES = ("after", "from")


def _scale_by_learning_rates(learning_rate) -> optax.GradientTransformation:
  """-learning_rate times the updates; a `LearningRates` scales the `loss_head` subtree by
  its `aux` rate. Stateless (EmptyState, as optax.sgd's own scaling): checkpoints of the
  single-rate optimizer restore unchanged."""
  rates = (
    learning_rate
    if isinstance(learning_rate, LearningRates)
    else LearningRates(learning_rate, learning_rate)
  )

  def update_fn(updates, state, params=None):
    del params

    def scale(path, u):
      is_aux = getattr(path[0], "key", None) == "loss_head"
      return -(rates.aux if is_aux else rates.main) * u

    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(learning_rate, cfg) -> optax.GradientTransformation:
  """PyTorch's SGD: weight decay added to the gradient before momentum (`cfg.weight_decay`,
  `cfg.momentum`: a `train.StepConfig`).

  `learning_rate`: one rate for all parameters, or `LearningRates` (the authors' two
  optimizers, one per model, share everything but the schedule of the rate).
  """
  return optax.chain(
    optax.add_decayed_weights(cfg.weight_decay),
    optax.chain(optax.trace(decay=cfg.momentum), _scale_by_learning_rates(learning_rate)),
  )


def learning_rate_at(train_config, epoch: int) -> LearningRates:
  """Step decay of the main model's rate: lr * decay ** (number of milestones reached).

  `train.aux_lr_schedule`: "constant" keeps the loss-prediction module at `lr` (the
  authors' code creates its MultiStepLR but never steps it); "decay" decays it too.
  """
  schedule = train_config.get("aux_lr_schedule", "constant")
  check_choice(schedule, AUX_LR_SCHEDULES, "train.aux_lr_schedule")
  passed = sum(epoch >= m for m in train_config.lr_milestones)
  main = float(train_config.learning_rate * train_config.lr_decay**passed)
  return LearningRates(main, main if schedule == "decay" else float(train_config.learning_rate))


def detach_features_at(train_config, epoch: int) -> bool:
  """Whether the ranking loss stops reaching the main model in (0-based) `epoch`.

  `train.detach_rule`: "after" detaches when epoch > detach_features_epoch (the
  authors' `epoch > epoch_loss`: from the 122nd epoch with 120); "from" when
  epoch >= detach_features_epoch.
  """
  rule = train_config.get("detach_rule", "after")
  check_choice(rule, DETACH_RULES, "train.detach_rule")
  if rule == "after":
    return epoch > train_config.detach_features_epoch
  return epoch >= train_config.detach_features_epoch


def recipe_summary(config) -> str:
  """One line naming the choices where the authors' code and the alternatives differ."""
  data, model, tc = config.data, config.model, config.train
  norm = (
    f"fixed mean {tuple(data.mean)} std {tuple(data.std)}"
    if data.normalization == "fixed"
    else "pool statistics"
  )
  return (
    f"recipe: init {model.init}, BatchNorm running variance {model.bn_running_var}, "
    f"normalisation {norm}; lr {tc.learning_rate} x{tc.lr_decay} at epochs "
    f"{tuple(tc.lr_milestones)}, loss-head lr {tc.aux_lr_schedule}, features detached "
    f"{'after' if tc.detach_rule == 'after' else 'from'} epoch {tc.detach_features_epoch}"
  )
