"""Joint training of the main model and the loss-prediction module: pure, jitted functions.

The model lives as `(graphdef, TrainState)`: `nnx.split` happens once at the
campaign boundary and everything here is plain `jax.jit` over pytrees.
The pool lives on the device as uint8; each step gathers its batch by index,
augments, normalises and masks it inside jit. All shapes are fixed for a whole
campaign, so growing the labeled set never recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from lplgrad_jax import models
from lplgrad_jax import optimizer
from lplgrad_jax import sharding
from lplgrad_jax.errors import check_choice
from lplgrad_jax.utils import ceil_div


class TrainState(NamedTuple):
  params: nnx.State  # nnx.Param leaves of classifier (+ loss_head)
  batch_stats: nnx.State  # nnx.BatchStat leaves (BatchNorm running statistics)
  opt_state: optax.OptState


class Pool(NamedTuple):
  """The training pool on the devices, and how its images are normalised."""

  images: jax.Array  # (N, H, W, 3) uint8 (or linear mode's (N, F) features), replicated or
  # split by rows (data.shard_pool)
  labels: jax.Array  # (N,) int32; -1 where unknown (a human oracle's unlabeled images)
  mean: jax.Array  # (3,) per-channel mean, [0, 1] units
  std: jax.Array  # (3,) per-channel std


class EpochPlan(NamedTuple):
  """What one epoch's steps share: the batch order and the epoch's settings."""

  order: jax.Array  # labeled ids in this epoch's order, padded to a whole number of batches
  num_labeled: jax.Array  # how many ids of `order` are real
  key: jax.Array  # the epoch's randomness (augmentation of step i: fold_in(key, i + 1))
  learning_rate: jax.Array
  detach_features: jax.Array  # stop the loss head's gradient into the main model


class Batch(NamedTuple):
  images: jax.Array  # normalised float images
  labels: jax.Array
  mask: jax.Array  # 1.0 for real examples, 0.0 for padding


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static (hashable) settings a compiled epoch depends on."""

  batch_size: int
  steps_per_epoch: int  # ceil(largest labeled set / batch_size): sizes the id buffer
  momentum: float = 0.9
  weight_decay: float = 5e-4
  use_aux: bool = True
  aux_weight: float = 1.0
  margin: float = 1.0
  crop_padding: int = 4
  flip: bool = True
  compute_dtype: str = "float32"  # of activations; parameters stay float32
  epoch_loop: str = "host"  # "host": a Python loop of jitted steps; "scan": one jitted loop
  pool_sharded: bool = False  # the pool is split by rows over the mesh (data.shard_pool)
  mesh: Mesh | None = None  # data-parallel over its "data" axis when set

  @classmethod
  def from_config(
    cls,
    train_config,
    max_labeled: int,
    use_aux: bool,
    mesh: Mesh | None = None,
    pool_sharded: bool = False,
  ) -> StepConfig:
    augment = train_config.augment
    return cls(
      batch_size=train_config.batch_size,
      steps_per_epoch=ceil_div(max_labeled, train_config.batch_size),
      momentum=train_config.momentum,
      weight_decay=train_config.weight_decay,
      use_aux=use_aux,
      aux_weight=train_config.aux_weight,
      margin=train_config.margin,
      crop_padding=train_config.crop_padding if "crop" in augment else 0,
      flip="flip" in augment,
      compute_dtype=train_config.compute_dtype,
      epoch_loop=resolve_epoch_loop(train_config.epoch_loop),
      pool_sharded=pool_sharded,
      mesh=mesh,
    )


EPOCH_LOOPS = ("host", "scan")


def resolve_epoch_loop(epoch_loop: str) -> str:
  """Checks `train.epoch_loop`. "host" is the default: XLA:CPU runs a ResNet step
  inside a device loop 40x (width 16) to 85x (width 64) slower than at top level
  (experiments/results/bench_cpu.md), while the host loop never waits for the device
  (steps are dispatched asynchronously); "scan" is for accelerators, where whether
  it beats the host loop is for `experiments/bench.py --epoch_steps=...` to show."""
  return check_choice(epoch_loop, EPOCH_LOOPS, "train.epoch_loop")


def create_train_state(learner: nnx.Module, cfg: StepConfig):
  """Splits a learner (in training mode) into its graphdef and a fresh TrainState."""
  learner.train()
  graphdef, params, batch_stats = nnx.split(
    models.with_compute_dtype(learner, cfg.compute_dtype), nnx.Param, nnx.BatchStat
  )
  return graphdef, TrainState(params, batch_stats, _fresh_optimizer_state(params, cfg))


@functools.partial(jax.jit, static_argnums=1)  # one program per campaign, not one per shape
def _fresh_optimizer_state(params, cfg: StepConfig):
  return optimizer.make_optimizer(0.0, cfg).init(params)


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """uint8 images as the model reads them; float inputs (normalised images, linear mode's
  frozen features) are the model's input already."""
  if images.dtype != jnp.uint8:
    return images
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def augment(key: jax.Array, images: jax.Array, crop_padding: int, flip: bool) -> jax.Array:
  """Random crop after zero padding, and random horizontal flip, per image.

  The random draws have fixed dtypes: a float64 run (jax_enable_x64) augments alike.
  """
  if not crop_padding and not flip:  # also linear mode's features, which are not images
    return images
  n, h, w, _ = images.shape
  crop_key, flip_key = jax.random.split(key)
  if crop_padding:
    p = crop_padding
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * p + 1, jnp.int32)
    images = jax.vmap(
      lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], jnp.int32(0)), (h, w, im.shape[-1]))
    )(padded, offsets)
  if flip:
    do_flip = jax.random.bernoulli(flip_key, jnp.float32(0.5), (n, 1, 1, 1))
    images = jnp.where(do_flip, images[:, :, ::-1], images)
  return images


def margin_ranking_loss(
  predicted: jax.Array, target: jax.Array, margin: float, num_valid: jax.Array | int | None = None
) -> jax.Array:
  """Learning Loss's pairwise ranking loss over pairs (i, n-1-i), i < n // 2.

  mean_i max(0, margin - s_i (p_i - p_j)), s_i = +1 if l_i > l_j else -1; the
  true losses are detached. With a padded batch the first `num_valid` entries
  are the real ones and pairs are formed among them.
  """
  n = predicted.shape[0] if num_valid is None else num_valid
  i = jnp.arange(predicted.shape[0] // 2)
  j = jnp.clip(n - 1 - i, 0, predicted.shape[0] - 1)
  valid = i < n // 2
  target = jax.lax.stop_gradient(target)
  sign = jnp.where(target[i] - target[j] > 0, 1.0, -1.0)
  per_pair = jnp.maximum(0.0, margin - sign * (predicted[i] - predicted[j]))
  return jnp.sum(jnp.where(valid, per_pair, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def _loss_fn(params, graphdef, batch_stats, batch: Batch, detach_features, cfg):
  images, labels, mask = batch
  # copy=True: BatchNorm updates its statistics inside this grad trace.
  learner = nnx.merge(graphdef, params, batch_stats, copy=True)
  logits, features = learner.classifier(images, mask=mask)
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  num_valid = jnp.sum(mask)
  main_loss = jnp.sum(per_example * mask) / jnp.maximum(num_valid, 1)
  loss = main_loss
  aux_loss = jnp.zeros(())
  if cfg.use_aux:
    # Past `detach_features_epoch` only the loss head learns from its loss.
    features = tuple(jnp.where(detach_features, jax.lax.stop_gradient(f), f) for f in features)
    predicted = learner.loss_head(features)
    aux_loss = margin_ranking_loss(predicted, per_example, cfg.margin, num_valid.astype(jnp.int32))
    loss = main_loss + cfg.aux_weight * aux_loss
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
  new_stats = nnx.state(learner, nnx.BatchStat)
  # Sums over the batch, so that sums over an epoch divide by its example count.
  return loss, (
    new_stats,
    {
      "loss": loss * num_valid,
      "main_loss": main_loss * num_valid,
      "aux_loss": aux_loss * num_valid,
      "correct": correct,
      "count": num_valid,
    },
  )


def train_step(
  graphdef, cfg: StepConfig, state: TrainState, batch: Batch, learning_rate, detach_features
):
  """One SGD step on a (masked) batch of normalised images."""
  grads, (new_stats, metrics) = jax.grad(_loss_fn, has_aux=True)(
    state.params, graphdef, state.batch_stats, batch, detach_features, cfg
  )
  updates, opt_state = optimizer.make_optimizer(learning_rate, cfg).update(
    grads, state.opt_state, state.params
  )
  params = optax.apply_updates(state.params, updates)
  return TrainState(params, new_stats, opt_state), metrics


@functools.partial(jax.jit, static_argnames=("capacity",))
def epoch_order(key, labeled_ids, num_labeled, capacity: int):
  """The labeled ids in a random order, padded to `capacity` (padding after the real ids)."""
  sort_keys = jax.random.uniform(key, (capacity,), jnp.float32)
  sort_keys = jnp.where(jnp.arange(capacity) < num_labeled, sort_keys, 2.0)
  return labeled_ids[jnp.argsort(sort_keys)]


def plan_epoch(
  cfg: StepConfig, labeled_ids, num_labeled: int, key, learning_rate, detach_features
) -> EpochPlan:
  """An epoch over the labeled set in the order `key` draws.

  `labeled_ids` is padded to `cfg.steps_per_epoch * cfg.batch_size` ids; only
  the first `num_labeled` are real. The order depends only on `key`, so an
  epoch resumed at a later step continues the interrupted one exactly.
  """
  order = epoch_order(
    jax.random.fold_in(key, 0), labeled_ids, num_labeled, cfg.steps_per_epoch * cfg.batch_size
  )
  return EpochPlan(order, num_labeled, key, learning_rate, detach_features)


def _train_batch(
  graphdef, cfg: StepConfig, state: TrainState, pool: Pool, plan: EpochPlan, step_index
):
  """Gathers batch `step_index` of the epoch `plan` from the pool, augments it, steps.

  Every batch of every round has the same shapes (the last one of an epoch is
  padded and masked), so one compilation serves the whole campaign.
  """
  start = step_index * cfg.batch_size
  ids = jax.lax.dynamic_slice(plan.order, (start,), (cfg.batch_size,))
  mask = ((start + jnp.arange(cfg.batch_size)) < plan.num_labeled).astype(jnp.float32)
  if cfg.pool_sharded:
    images, labels = sharding.gather_rows((pool.images, pool.labels), ids, cfg.mesh)
  else:
    images, labels = pool.images[ids], pool.labels[ids]
  # Padding rows may point at unlabeled images (label -1): give them a valid class.
  labels = jnp.where(mask > 0, labels, 0)
  if cfg.mesh is not None:  # split the batch over devices; parameters stay replicated
    images, labels, mask = (
      jax.lax.with_sharding_constraint(a, sharding.batch_sharded(cfg.mesh))
      for a in (images, labels, mask)
    )
  images = augment(jax.random.fold_in(plan.key, step_index + 1), images, cfg.crop_padding, cfg.flip)
  batch = Batch(normalize(images, pool.mean, pool.std), labels, mask)
  return train_step(graphdef, cfg, state, batch, plan.learning_rate, plan.detach_features)


@functools.lru_cache(maxsize=16)
def batch_step(graphdef, cfg: StepConfig):
  """The jitted `_train_batch` of one model structure, `state` donated. It takes
  arrays alone, so a step's dispatch skips hashing the graphdef (milliseconds for a
  ResNet): `batch_step(graphdef, cfg)(state, pool, plan, step_index)`."""
  return jax.jit(functools.partial(_train_batch, graphdef, cfg), donate_argnums=0)


METRICS = ("loss", "main_loss", "aux_loss", "correct", "count")
# Also in an epoch's totals: the first step whose loss was not finite (-1: none), so that a
# divergence is found from the epoch's totals alone, without a host sync per step.
NONFINITE_STEP = "nonfinite_step"


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"), donate_argnames=("state",))
def train_steps(
  graphdef, cfg: StepConfig, state: TrainState, pool: Pool, plan: EpochPlan, first_step
):
  """Steps `first_step`.. of an epoch in one call: a device-side loop over `_train_batch`.

  The trip count follows `plan.num_labeled` at run time (a while loop), so one
  compilation still serves every round.
  """

  def step(step_index, carry):
    state, totals = carry
    state, metrics = _train_batch(graphdef, cfg, state, pool, plan, step_index)
    bad = totals[NONFINITE_STEP]
    bad = jnp.where((bad < 0) & ~jnp.isfinite(metrics["loss"]), step_index, bad)
    return state, {**{k: totals[k] + metrics[k] for k in METRICS}, NONFINITE_STEP: bad}

  last = (plan.num_labeled + cfg.batch_size - 1) // cfg.batch_size  # traced: no ceil_div
  totals = {k: jnp.zeros((), jnp.float32) for k in METRICS}
  totals[NONFINITE_STEP] = jnp.full((), -1, jnp.int32)
  return jax.lax.fori_loop(first_step, last, step, (state, totals))


@jax.jit
def _first_nonfinite(losses, first_step):
  """The step index of the first non-finite loss in `losses` (steps first_step..), or -1."""
  bad = ~jnp.isfinite(losses)
  return jnp.where(jnp.any(bad), first_step + jnp.argmax(bad), -1).astype(jnp.int32)


def train_epoch(
  graphdef,
  cfg: StepConfig,
  state: TrainState,
  pool: Pool,
  plan: EpochPlan,
  *,
  first_step: int = 0,
  should_stop=lambda: False,
):
  """Steps `first_step`.. of the epoch `plan` over the labeled set.

  Returns (state, metrics summed over the examples seen and `NONFINITE_STEP`, next step index);
  the epoch is complete when the index equals `num_steps(...)`, and stops
  early, at a step boundary, once `should_stop()` is true.
  `cfg.epoch_loop` "host": a Python loop of asynchronously dispatched steps,
  with no host sync inside (XLA:CPU runs a step inside a loop body 40-85x
  slower than at top level); "scan": the whole epoch in one call
  (`train_steps`), which checks `should_stop` only at the epoch's start.
  """
  last = num_steps(cfg, int(plan.num_labeled))
  if cfg.epoch_loop == "scan":  # stop requests wait for the epoch's end
    if should_stop():
      return state, None, first_step
    state, totals = train_steps(graphdef, cfg, state, pool, plan, first_step)
    return state, totals, last
  totals, losses = None, []
  step = batch_step(graphdef, cfg)
  for step_index in range(first_step, last):
    if should_stop():
      break
    state, metrics = step(state, pool, plan, step_index)
    totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
    losses.append(metrics["loss"])
  else:
    step_index = last
  if totals is not None:
    totals = {**totals, NONFINITE_STEP: _first_nonfinite(jnp.stack(losses), first_step)}
  return state, totals, step_index


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def all_finite(state: TrainState) -> bool:
  """Whether every float of `state` (parameters, statistics, momentum) is finite: one sync."""
  return bool(_all_finite(state))


def num_steps(cfg: StepConfig, num_labeled: int) -> int:
  return ceil_div(num_labeled, cfg.batch_size)
