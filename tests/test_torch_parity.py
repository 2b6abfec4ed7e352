"""Golden parity with the authors' PyTorch recipe (fixture from experiments/torch_parity.py).

The fixture holds the PyTorch side's results from the same starting weights and inputs:
train-mode outputs and joint loss on a batch, parameters and BatchNorm statistics after
three SGD steps (plain, detached, past the main model's decay), and per-image query scores.
Errors are relative to each array's largest magnitude. No PyTorch needed.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT
from flax import nnx

from lplgrad_jax import query
from lplgrad_jax import train

sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))
import torch_parity  # noqa: E402  (imports torch only to regenerate the fixture)

_relative_error = torch_parity._relative_error


@pytest.fixture(scope="module")
def parity():
  """(fixture arrays, config, learner with the fixture's starting weights, graphdef, params,
  stats, (mean, std))."""
  fixture = dict(np.load(torch_parity.FIXTURE))
  config = torch_parity.parity_config()
  learner, params, stats = torch_parity.jax_learner(config)
  nnx.update(
    learner,
    torch_parity.unflatten(params, "init", fixture),
    torch_parity.unflatten(stats, "init", fixture),
  )
  graphdef, params, stats = nnx.split(learner, nnx.Param, nnx.BatchStat)
  normalization = tuple(jnp.asarray(config.data[k], jnp.float32) for k in ("mean", "std"))
  return fixture, config, learner, graphdef, params, stats, normalization


def test_fixture_crosses_the_detach_epoch_and_the_milestone(parity):
  fixture, config, *_ = parity
  epochs = [int(e) for e in fixture["step_epochs"]]
  assert [train.detach_features_at(config.train, e) for e in epochs] == [False, True, True]
  rates = [train.learning_rate_at(config.train, e) for e in epochs]
  assert rates[-1].main == pytest.approx(0.1 * rates[-1].aux) and rates[0].main == rates[0].aux


def test_forward_and_joint_loss_match_pytorch(parity):
  fixture, config, _, graphdef, params, stats, (mean, std) = parity
  cfg = train.StepConfig.from_config(config.train, torch_parity.BATCH, use_aux=True)

  @jax.jit
  def forward(params, stats, images, labels):
    learner = nnx.merge(graphdef, params, stats, copy=True)  # training mode, as PyTorch's
    logits, features = learner.classifier(images)
    loss, (_, metrics) = train._loss_fn(
      params, graphdef, stats, train.Batch(images, labels, jnp.ones(8)), False, cfg
    )
    return logits, features, learner.loss_head(features), loss, metrics

  logits, features, predicted, loss, metrics = forward(
    params,
    stats,
    train.normalize(jnp.asarray(fixture["images"][0]), mean, std),
    jnp.asarray(fixture["labels"][0]),
  )
  assert _relative_error(logits, fixture["forward/logits"]) < 1e-5
  for i, f in enumerate(features):
    assert _relative_error(f, fixture[f"forward/features/{i}"]) < 1e-5
  assert _relative_error(predicted, fixture["forward/predicted"]) < 1e-5
  for name in ("main_loss", "aux_loss"):
    assert float(metrics[name]) / 8 == pytest.approx(float(fixture[f"forward/{name}"]), rel=1e-6)
  assert float(loss) == pytest.approx(float(fixture["forward/joint_loss"]), rel=1e-6)


@pytest.fixture(scope="module")
def stepped(parity):
  """The learner after one SGD step on each of the fixture's batches, as campaign epochs run."""
  fixture, config, learner, _, _, _, (mean, std) = parity
  cfg = train.StepConfig.from_config(config.train, torch_parity.BATCH, use_aux=True)
  graphdef, state = train.create_train_state(nnx.clone(learner), cfg)
  step = jax.jit(train.train_step, static_argnums=(0, 1))
  for images, labels, epoch in zip(fixture["images"], fixture["labels"], fixture["step_epochs"]):
    batch = train.Batch(
      train.normalize(jnp.asarray(images), mean, std), jnp.asarray(labels), jnp.ones(len(labels))
    )
    state, _ = step(
      graphdef,
      cfg,
      state,
      batch,
      train.learning_rate_at(config.train, int(epoch)),
      train.detach_features_at(config.train, int(epoch)),
    )
  return graphdef, state


def test_parameters_and_batchnorm_statistics_after_three_steps(parity, stepped):
  fixture = parity[0]
  _, state = stepped
  arrays = {
    **torch_parity.flatten(state.params, "after"),
    **torch_parity.flatten(state.batch_stats, "after"),
  }
  assert sorted(arrays) == sorted(k for k in fixture if k.startswith("after/"))
  errors = {k: _relative_error(v, fixture[k]) for k, v in arrays.items()}
  worst = max(errors, key=errors.get)
  assert errors[worst] < 1e-5, (worst, errors[worst])


@pytest.mark.parametrize("reduction", query.REDUCTIONS)
def test_query_scores_and_ranking(parity, stepped, reduction):
  fixture, _, learner, *_, normalization = parity
  graphdef, state = stepped
  trained = nnx.merge(graphdef, state.params, state.batch_stats)
  images = fixture["query_images"]
  logits = query.model_outputs(trained, images, normalization, 8)["logits"]
  assert _relative_error(logits, fixture["query/logits"]) < 1e-5
  scores = query.entropy_grad_norms(
    trained.classifier, images, reduction=reduction, normalization=normalization, chunk_size=8
  )
  expected = fixture[f"query/{reduction}"]
  assert _relative_error(scores, expected) < 1e-4
  np.testing.assert_array_equal(np.argsort(scores), np.argsort(expected))
