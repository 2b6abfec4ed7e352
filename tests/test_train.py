import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import relative_distance
from conftest import tiny_config
from conftest import train_state_in
from flax import nnx

from lplgrad_jax import models
from lplgrad_jax import optimizer
from lplgrad_jax import train
from lplgrad_jax.errors import ConfigError


def test_margin_ranking_loss_hand_computed():
  predicted = jnp.array([3.0, 1.0, 2.0, 0.0])
  target = jnp.array([1.0, 4.0, 2.0, 2.0])
  # pair (0, 3): l0 < l3 -> s=-1: max(0, 1 + (3 - 0)) = 4
  # pair (1, 2): l1 > l2 -> s=+1: max(0, 1 - (1 - 2)) = 2
  assert float(train.margin_ranking_loss(predicted, target, 1.0)) == pytest.approx(3.0)
  # Only the first 3 are real: one pair (0, 2): l0 < l2 -> max(0, 1 + (3 - 2)) = 2
  assert float(train.margin_ranking_loss(predicted, target, 1.0, num_valid=3)) == pytest.approx(2.0)
  # Ties count as s = -1, as in the authors' code: max(0, 0.5 + (3 - 0)) = 3.5
  tie = train.margin_ranking_loss(jnp.array([3.0, 0.0]), jnp.array([1.0, 1.0]), 0.5)
  assert float(tie) == pytest.approx(3.5)


def test_margin_ranking_loss_matches_authors_formula():
  rng = np.random.default_rng(0)
  for n in (2, 8, 13):
    p, losses = rng.normal(size=n), rng.normal(size=n)
    # LossPredLoss of Learning Loss (PyTorch), transcribed to numpy.
    half = n // 2
    diff_p = (p - p[::-1])[:half]
    diff_l = (losses - losses[::-1])[:half]
    one = 2 * np.sign(np.clip(diff_l, 0, None)) - 1
    expected = np.sum(np.clip(1.0 - one * diff_p, 0, None)) / half
    got = train.margin_ranking_loss(jnp.asarray(p), jnp.asarray(losses), 1.0)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_margin_loss_does_not_backpropagate_into_targets():
  grad = jax.grad(lambda t: train.margin_ranking_loss(jnp.array([0.0, 1.0]), t, 1.0))(
    jnp.array([2.0, 1.0])
  )
  np.testing.assert_array_equal(grad, 0.0)


def test_learning_rate_step_decay():
  config = tiny_config()
  config.train.learning_rate = 0.1
  config.train.lr_milestones = (3, 5)
  rates = [optimizer.learning_rate_at(config.train, e) for e in range(7)]
  np.testing.assert_allclose([r.main for r in rates], [0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
  # The authors never step the loss-prediction module's scheduler.
  assert config.train.aux_lr_schedule == "constant"
  np.testing.assert_allclose([r.aux for r in rates], [0.1] * 7)
  config.train.aux_lr_schedule = "decay"
  assert [optimizer.learning_rate_at(config.train, e) for e in range(7)] == [
    (r.main, r.main, None) for r in rates
  ]
  config.train.backbone_learning_rate = 0.02  # a pretrained backbone's, decayed in step
  np.testing.assert_allclose(
    [optimizer.learning_rate_at(config.train, e).backbone for e in range(7)],
    [0.02, 0.02, 0.02, 0.002, 0.002, 0.0002, 0.0002],
  )
  config.train.aux_lr_schedule = "never"
  with pytest.raises(ConfigError, match="unknown train.aux_lr_schedule 'never'"):
    optimizer.learning_rate_at(config.train, 0)


def test_detach_rule():
  config = tiny_config()
  config.train.detach_features_epoch = 120
  assert config.train.detach_rule == "after"  # the authors' `epoch > epoch_loss`
  assert [optimizer.detach_features_at(config.train, e) for e in (119, 120, 121)] == [
    False,
    False,
    True,
  ]
  config.train.detach_rule = "from"
  assert [optimizer.detach_features_at(config.train, e) for e in (119, 120, 121)] == [
    False,
    True,
    True,
  ]
  config.train.detach_rule = "later"
  with pytest.raises(ConfigError, match="unknown train.detach_rule 'later'"):
    optimizer.detach_features_at(config.train, 0)


def test_augment_crop_and_flip():
  images = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.uint8).reshape(2, 4, 4, 3)
  key = jax.random.key(0)
  np.testing.assert_array_equal(train.augment(key, images, 0, False), images)
  cropped = train.augment(key, images, 2, False)
  assert cropped.shape == images.shape and cropped.dtype == jnp.uint8
  flipped = [np.asarray(train.augment(jax.random.key(s), images, 0, True)) for s in range(20)]
  assert all(
    np.array_equal(f[i], images[i]) or np.array_equal(f[i], images[i, :, ::-1])
    for f in flipped
    for i in range(2)
  )
  assert any(np.array_equal(f[0], images[0, :, ::-1]) for f in flipped)
  # Every crop of a padded image is a window of it: its centre pixel stays in the image.
  shifts = set()
  for s in range(30):
    c = np.asarray(train.augment(jax.random.key(s), images[:1] + 1, 2, False))[0]
    ys, xs = np.nonzero(c[..., 0])
    shifts.add((ys.min(), xs.min()))
  assert len(shifts) > 1


# Compiled once for this file's tests (static: the graphdef and the StepConfig): op by op, a
# ResNet's forward and backward compile hundreds of small programs.
_loss = jax.jit(train._loss_fn, static_argnums=(1, 5))
_loss_grads = jax.jit(jax.grad(train._loss_fn, has_aux=True), static_argnums=(1, 5))


@pytest.fixture(scope="module")
def learner_and_batch():
  config = tiny_config()
  learner = models.create_learner(config.model, 10, use_aux=True, key=jax.random.key(0))
  cfg = train.StepConfig.from_config(config.train, 64, use_aux=True)
  key = jax.random.key(1)
  images = jax.random.normal(key, (16, 16, 16, 3))
  labels = jax.random.randint(jax.random.fold_in(key, 1), (16,), 0, 10)
  return learner, cfg, images, labels


@pytest.fixture(scope="module")
def fp32_losses():
  return {}


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_train_step_lowers_the_loss(compute_dtype, learner_and_batch, fp32_losses):
  learner, cfg, images, labels = learner_and_batch
  cfg = train.StepConfig(**{**cfg.__dict__, "compute_dtype": compute_dtype})
  graphdef, state = train.create_train_state(nnx.clone(learner), cfg)
  mask = jnp.ones(16)
  step = jax.jit(
    lambda s: train.train_step(graphdef, cfg, s, train.Batch(images, labels, mask), 0.05, False)
  )
  losses = []
  for _ in range(15):
    state, metrics = step(state)
    losses.append(float(metrics["loss"]) / float(metrics["count"]))
  assert losses[-1] < 0.5 * losses[0]
  # bf16 compute: float32 master weights, BatchNorm statistics and momentum throughout.
  assert {x.dtype for x in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}
  if compute_dtype == "float32":
    fp32_losses["first"] = losses[0]
  elif "first" in fp32_losses:  # same weights and batch: the forward differs by rounding only
    assert losses[0] == pytest.approx(fp32_losses["first"], rel=1e-2)
    assert losses[0] != fp32_losses["first"]


def test_sgd_matches_pytorch_update_rule(learner_and_batch):
  learner, cfg, images, labels = learner_and_batch
  graphdef, state = train.create_train_state(nnx.clone(learner), cfg)
  mask = jnp.ones(16)
  grads, _ = _loss_grads(
    state.params, graphdef, state.batch_stats, train.Batch(images, labels, mask), False, cfg
  )
  lr = 0.1
  new_state, _ = jax.jit(train.train_step, static_argnums=(0, 1))(
    graphdef, cfg, state, train.Batch(images, labels, mask), lr, False
  )
  # First step of torch.optim.SGD(momentum=0.9, weight_decay=wd): p - lr * (g + wd * p).
  for p, g, q in zip(
    jax.tree.leaves(state.params), jax.tree.leaves(grads), jax.tree.leaves(new_state.params)
  ):
    np.testing.assert_allclose(q, p - lr * (g + cfg.weight_decay * p), rtol=1e-5, atol=1e-7)


def test_loss_head_steps_with_its_own_learning_rate(learner_and_batch):
  # Two rates, as the authors' two optimizers: the loss head's update is its own rate times
  # the same (decayed, momentum) direction; the optimizer state keeps its old structure.
  learner, cfg, images, labels = learner_and_batch
  graphdef, state = train.create_train_state(nnx.clone(learner), cfg)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(
    optax.chain(
      optax.add_decayed_weights(cfg.weight_decay), optax.sgd(0.1, momentum=cfg.momentum)
    ).init(state.params)
  )
  grads, _ = _loss_grads(
    state.params, graphdef, state.batch_stats, train.Batch(images, labels, jnp.ones(16)), False, cfg
  )
  one, _ = optimizer.make_optimizer(0.1, cfg).update(grads, state.opt_state, state.params)
  two, _ = optimizer.make_optimizer(optimizer.LearningRates(0.1, 0.025), cfg).update(
    grads, state.opt_state, state.params
  )
  for part, ratio in (("classifier", 1.0), ("loss_head", 0.25)):
    for a, b in zip(jax.tree.leaves(one[part]), jax.tree.leaves(two[part])):
      np.testing.assert_allclose(b, ratio * a, rtol=1e-6)
  # A backbone rate: the classifier's head keeps the main rate, its other layers take it.
  three, _ = optimizer.make_optimizer(optimizer.LearningRates(0.1, 0.025, 0.01), cfg).update(
    grads, state.opt_state, state.params
  )
  ratios = set()
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(one["classifier"]), jax.tree.leaves(three["classifier"])
  ):
    ratio = 1.0 if "head" in [getattr(p, "key", None) for p in path] else 0.1
    np.testing.assert_allclose(b, ratio * a, rtol=1e-6)
    ratios.add(ratio)
  assert ratios == {1.0, 0.1}
  for layer, ratio in (("head", 1.0), ("stem_conv", 0.1)):  # by name, not by the rule above
    np.testing.assert_allclose(
      three["classifier"][layer]["kernel"], ratio * one["classifier"][layer]["kernel"], rtol=1e-6
    )


def test_detached_features_stop_aux_gradients_reaching_the_classifier(learner_and_batch):
  learner, cfg, images, labels = learner_and_batch
  graphdef, state = train.create_train_state(nnx.clone(learner), cfg)
  main_only = train.StepConfig(**{**cfg.__dict__, "use_aux": False})
  mask = jnp.ones(16)

  def classifier_grads(detach, step_cfg):
    grads, _ = _loss_grads(
      state.params, graphdef, state.batch_stats, train.Batch(images, labels, mask), detach, step_cfg
    )
    return jax.tree.leaves(grads["classifier"])

  without_aux = classifier_grads(False, main_only)
  for a, b in zip(classifier_grads(True, cfg), without_aux):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert any(
    not np.allclose(a, b, atol=1e-6) for a, b in zip(classifier_grads(False, cfg), without_aux)
  )


def test_padded_batch_equals_the_unpadded_one(learner_and_batch):
  learner, cfg, images, labels = learner_and_batch
  graphdef, state = train.create_train_state(nnx.clone(learner), cfg)
  args = (state.params, graphdef, state.batch_stats)
  real = 11
  full, (stats_full, m_full) = _loss(
    *args, train.Batch(images[:real], labels[:real], jnp.ones(real)), False, cfg
  )
  padded = jnp.concatenate([images[:real], jnp.zeros((5, 16, 16, 3))])
  padded_labels = jnp.concatenate([labels[:real], jnp.zeros(5, labels.dtype)])
  part, (stats_part, m_part) = _loss(
    *args,
    train.Batch(padded, padded_labels, (jnp.arange(16) < real).astype(jnp.float32)),
    False,
    cfg,
  )
  assert float(part) == pytest.approx(float(full), rel=1e-5)
  for a, b in zip(jax.tree.leaves(stats_full), jax.tree.leaves(stats_part)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert float(m_part["count"]) == real


def test_epoch_visits_every_labeled_image_once():
  order = train.epoch_order(jax.random.key(3), jnp.arange(100, 132), 27, 32)
  np.testing.assert_array_equal(np.sort(np.asarray(order[:27])), np.arange(100, 127))


# Two float32 runs of the same computation summed in different orders may differ this many
# times as far as float32 is from float64 on it (a float64 run measures that distance).
DRIFT_FACTOR = 10


def test_scan_epoch_equals_the_host_loop(learner_and_batch):
  # One device-side loop per epoch (accelerators) and the host loop (CPU) take the same
  # steps on the same batches; a resumed epoch (first_step=2) too. XLA fuses the two
  # differently, so they agree up to float32 reassociation, bounded by a float64 run.
  learner, cfg, _, _ = learner_and_batch
  pool = train.Pool(
    jax.random.randint(jax.random.key(4), (40, 16, 16, 3), 0, 256).astype(jnp.uint8),
    jax.random.randint(jax.random.key(5), (40,), 0, 10),
    jnp.full(3, 0.5),
    jnp.full(3, 0.25),
  )
  labeled = jnp.zeros(cfg.steps_per_epoch * cfg.batch_size, jnp.int32).at[:37].set(jnp.arange(37))
  plan = train.plan_epoch(cfg, labeled, 37, jax.random.key(6), 0.05, False)
  finals = {}
  for loop, dtype in (("host", jnp.float32), ("scan", jnp.float32), ("host", jnp.float64)):
    loop_cfg = train.StepConfig(**{**cfg.__dict__, "epoch_loop": loop})
    for first_step in (0, 2):
      with jax.enable_x64(dtype == jnp.float64):
        graphdef, state = train_state_in(learner, loop_cfg, dtype)
        start = jax.tree.map(np.asarray, state)
        state = jax.tree.map(jnp.copy, state)  # the epoch donates it; `learner` shares its arrays
        state, totals, next_step = train.train_epoch(
          graphdef, loop_cfg, state, pool, plan, first_step=first_step
        )
      assert next_step == 3  # ceil(37 / 16)
      finals[loop, dtype, first_step] = start, state, totals
  for first_step, seen in ((0, 37), (2, 5)):
    start, host, host_totals = finals["host", jnp.float32, first_step]
    _, scan, scan_totals = finals["scan", jnp.float32, first_step]
    _, reference, reference_totals = finals["host", jnp.float64, first_step]
    assert float(scan_totals["count"]) == float(host_totals["count"]) == seen
    drift = relative_distance(host, reference, start)
    assert 0 < drift < 1e-3  # float32 ran in float32, float64 in float64
    assert relative_distance(scan, host, start) <= DRIFT_FACTOR * drift
    loss_drift = abs(float(host_totals["loss"]) - float(reference_totals["loss"]))
    assert abs(float(scan_totals["loss"]) - float(host_totals["loss"])) <= DRIFT_FACTOR * max(
      loss_drift, 1e-6 * abs(float(reference_totals["loss"]))
    )
  with pytest.raises(ConfigError, match="unknown train.epoch_loop 'gpu'"):
    train.resolve_epoch_loop("gpu")


def test_recipe_summary_names_the_choices():
  from lplgrad_jax.configs import cifar10

  line = optimizer.recipe_summary(cifar10.get_config())
  assert line == (
    "recipe: init pytorch, BatchNorm running variance unbiased, normalisation "
    "fixed mean (0.4914, 0.4822, 0.4465) std (0.2023, 0.1994, 0.201); lr 0.1 x0.1 "
    "at epochs (160,), loss-head lr constant, features detached after epoch 120"
  )
  assert "normalisation pool statistics" in optimizer.recipe_summary(tiny_config())
