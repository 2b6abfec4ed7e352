"""Backbone registry, user model factories, masked BatchNorm of padded batches, and a short
campaign with every backbone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from lplgrad_jax import campaign
from lplgrad_jax import models
from lplgrad_jax.configs import default
from lplgrad_jax.errors import ConfigError

OWN_MODEL = "module:examples.own_model:small_cnn"


def _model_config(name, width=1):
  config = default.get_config().model
  config.name, config.width, config.depth, config.heads = name, width, 1, 2
  return config


def logits_only(num_classes, rngs):
  """A user factory whose model returns no features."""
  return nnx.Linear(3, num_classes, rngs=rngs)


def test_registry_refuses_duplicates_and_unknown_names():
  with pytest.raises(ConfigError, match="'resnet18' is already registered"):
    models.register_model("resnet18", lambda *a: None)
  with pytest.raises(ConfigError, match="unknown model 'resnet19'"):
    models.create_learner(_model_config("resnet19"), 3, use_aux=False, key=jax.random.key(0))
  for spec, why in (
    ("module:nope", "expected 'module:package.module:factory'"),
    ("module:examples.own_model:missing", "cannot load 'missing'"),
    ("module:json:dumps", r"expected factory\(num_classes, rngs\)"),
    ("module:test_backbones:logits_only", "expected it to return \\(logits, features\\)"),
  ):
    with pytest.raises(ConfigError, match=why):
      models.create_learner(_model_config(spec), 3, use_aux=False, key=jax.random.key(0))


def test_user_model_batch_norm_ignores_padded_rows():
  # The padded rows of a training batch must not move BatchNorm statistics: a batch with
  # garbage padding gives the same outputs and statistics as the real rows alone.
  learner = models.create_learner(
    _model_config(OWN_MODEL), 4, use_aux=True, key=jax.random.key(0), image_size=8
  )
  assert learner.classifier.stage_channels == (16, 32)
  real = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
  padded = jnp.concatenate([real, 100.0 * jnp.ones((2, 8, 8, 3))])
  mask = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0])
  original_call = nnx.BatchNorm.__call__
  alone, with_pad = nnx.clone(learner.classifier), nnx.clone(learner.classifier)
  logits, _ = alone(real)
  logits_padded, _ = with_pad(padded, mask=mask)
  np.testing.assert_allclose(logits_padded[:3], logits, rtol=1e-5, atol=1e-5)
  for a, b in zip(
    jax.tree.leaves(nnx.state(alone, nnx.BatchStat)),
    jax.tree.leaves(nnx.state(with_pad, nnx.BatchStat)),
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert nnx.BatchNorm.__call__ is original_call  # the masking is undone after the call


@pytest.mark.parametrize(
  "name,width",
  [
    ("resnet34", 1),
    ("resnet50", 1),
    ("wide_resnet28", 1),
    ("vit", 8),
    (OWN_MODEL, 1),
  ],
)
def test_campaign_runs_with_each_backbone(name, width, tmp_path):
  config = tiny_config(
    **{
      "model.name": name,
      "model.width": width,
      "model.depth": 1,
      "model.heads": 2,
      "al.num_rounds": 2,
      "train.epochs": 1,
      "train.lr_milestones": (),
    }
  )
  results = campaign.run(config, str(tmp_path))
  rounds = results["rounds"]
  assert [r["num_labeled"] for r in rounds] == [20, 30]
  assert len(set(rounds[0]["queried_ids"]) - set(rounds[0]["labeled_ids"])) == 10
  assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rounds)
