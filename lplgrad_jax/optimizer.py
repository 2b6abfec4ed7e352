"""The optimizer and its schedule: PyTorch's SGD as the authors' code runs it, the per-epoch
learning rates of the main model and the loss-prediction module, the epoch from which the
ranking loss stops reaching the main model, and whether a round starts from fresh weights."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from lplgrad_jax.data.dataset import normalization_in_effect
from lplgrad_jax.errors import check_choice


class LearningRates(NamedTuple):
  """The step sizes of the main model's and the loss-prediction module's parameters.

  `backbone`: the main model's layers other than its classifier `head` (a fine-tuned
  pretrained backbone's own rate); None: `main`, as for the whole main model.
  """

  main: float
  aux: float
  backbone: float | None = None


AUX_LR_SCHEDULES = ("constant", "decay")
DETACH_RULES = ("after", "from")


def _scale_by_learning_rates(learning_rate) -> optax.GradientTransformation:
  """-learning_rate times the updates; a `LearningRates` scales the `loss_head` subtree by
  its `aux` rate and the main model's layers outside its `head` by its `backbone` rate.
  Stateless (EmptyState, as optax.sgd's own scaling): checkpoints of the single-rate
  optimizer restore unchanged."""
  rates = (
    learning_rate
    if isinstance(learning_rate, LearningRates)
    else LearningRates(learning_rate, learning_rate)
  )

  def rate(path):
    names = [getattr(p, "key", None) for p in path]
    if names[0] == "loss_head":
      return rates.aux
    if rates.backbone is None or "head" in names[1:]:
      return rates.main
    return rates.backbone

  def update_fn(updates, state, params=None):
    del params

    def scale(path, u):
      return -rate(path) * u

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

  `train.backbone_learning_rate` (None: the same as the rest) decays in step with it.
  `train.aux_lr_schedule`: "constant" keeps the loss-prediction module at `lr` (the
  authors' code creates its MultiStepLR but never steps it); "decay" decays it too.
  """
  schedule = train_config.get("aux_lr_schedule", "constant")
  check_choice(schedule, AUX_LR_SCHEDULES, "train.aux_lr_schedule")
  decay = train_config.lr_decay ** sum(epoch >= m for m in train_config.lr_milestones)
  main = float(train_config.learning_rate * decay)
  aux = main if schedule == "decay" else float(train_config.learning_rate)
  backbone = train_config.get("backbone_learning_rate")
  return LearningRates(main, aux, None if backbone is None else float(backbone * decay))


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


def reinit_each_round(config) -> bool:
  """`train.reinit_each_round`; unset, each round starts afresh from pretrained weights where
  there are such weights (model.pretrained: the convention of AL on pretrained backbones) and
  warm from the last round's weights otherwise (the authors' code)."""
  return reinit_choice(config.train.reinit_each_round, bool(config.model.pretrained))


def reinit_choice(choice: bool | None, has_weights: bool) -> bool:
  """What `train.reinit_each_round` = `choice` means for a model with or without pretrained
  weights (see `reinit_each_round`)."""
  return has_weights if choice is None else bool(choice)


def recipe_summary(config) -> str:
  """One line naming the choices where the authors' code and the alternatives differ."""
  data, model, tc = config.data, config.model, config.train
  norm = {
    "pool": "pool statistics",
    "weights": "the pretrained weights' statistics",
    "fixed": f"fixed mean {tuple(data.mean)} std {tuple(data.std)}",
  }[normalization_in_effect(data.normalization, bool(model.get("pretrained")))]
  backbone = tc.get("backbone_learning_rate")
  lr = f"{tc.learning_rate}" + ("" if backbone is None else f" (backbone {backbone})")
  return (
    f"recipe: init {model.init}, BatchNorm running variance {model.bn_running_var}, "
    f"normalisation {norm}; lr {lr} x{tc.lr_decay} at epochs "
    f"{tuple(tc.lr_milestones)}, loss-head lr {tc.aux_lr_schedule}, features detached "
    f"{'after' if tc.detach_rule == 'after' else 'from'} epoch {tc.detach_features_epoch}"
  )
