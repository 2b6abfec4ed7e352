"""Linear mode (`model.train_mode="linear"`): a frozen backbone, its features computed once per
campaign, and a linear classifier head and the loss-prediction module trained on them.

An image's features: the global-average-pooled output of each stage (what the loss head
reads) and the input of the classifier `head` (ResNet: the pooled last stage; ViT: the class
token after the final LayerNorm), concatenated, in inference mode. They are computed when a
run starts (once per campaign; again after a stop, such as a human oracle's wait for
labels). `LinearProbe` reads these in place of images and is an ordinary main model of the
campaign, so training, the query, every strategy and the checkpoints run unchanged on it, at
the cost of one dense layer per image.

Its only parameters are the head's W and b, so LPLgrad's score has a closed form: with h the
head's input, p = softmax(logits) and H the entropy, g = dH/dlogits = -p (log p + H) and
dH/dW = h g^T, whose norms are ||h|| ||g|| and ||g||. The fast scorer (pergrad) computes exactly
these products of norms for a dense layer; `closed_form_scores` states them for the tests.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lplgrad_jax import layer_hooks
from lplgrad_jax.chunks import map_chunks
from lplgrad_jax.errors import ConfigError
from lplgrad_jax.models import ActiveLearner
from lplgrad_jax.models import at_least_float32
from lplgrad_jax.models import pool_feature
from lplgrad_jax.models.backbone import inner_model
from lplgrad_jax.train import normalize

# finetune: every layer trains on the images | linear: a frozen backbone's features.
TRAIN_MODES = ("finetune", "linear")


class LinearProbe(nnx.Module):
  """The classifier head of a frozen backbone, on `frozen_features` rows: (logits, pooled
  stage outputs)."""

  def __init__(self, head: nnx.Linear, stage_channels: tuple[int, ...]):
    self.head = head  # the backbone's own head module: trained here, it classifies images there
    self.stage_channels = tuple(stage_channels)

  def __call__(self, features, mask=None):
    del mask  # no batch statistics
    parts = jnp.split(features, np.cumsum(self.stage_channels), axis=-1)
    return at_least_float32(self.head(parts[-1])), tuple(parts[:-1])


def classifier_head(classifier: nnx.Module) -> nnx.Linear:
  net = inner_model(classifier)
  head = getattr(net, "head", None)
  if not isinstance(head, nnx.Linear):
    raise ConfigError(
      f"model.train_mode='linear' needs a model whose classifier is one linear layer named "
      f"`head` ({type(net).__name__} has none): expected resnet18/34/50, vit, vit_s16, vit_b16"
    )
  return head


def probe_of(learner: ActiveLearner) -> ActiveLearner:
  """The learner of linear mode: `learner`'s head (the same module) on its frozen features,
  and its loss head."""
  classifier = learner.classifier
  return ActiveLearner(
    LinearProbe(classifier_head(classifier), classifier.stage_channels), learner.loss_head
  )


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _features_batch(graphdef, state, images_uint8, mean, std):
  classifier = nnx.merge(graphdef, state)
  head = classifier_head(classifier)
  head_inputs = []

  def keep_input(layer, call, args, kwargs):
    if layer is head:
      head_inputs.append(args[0])
    return call(*args, **kwargs)

  with layer_hooks.intercept(classifier, (nnx.Linear,), keep_input):
    _, stages = classifier(normalize(images_uint8, mean, std))
  return jnp.concatenate([pool_feature(s) for s in stages] + head_inputs, axis=-1)


def frozen_features(
  classifier: nnx.Module, images: np.ndarray, normalization, batch_size: int, progress=False
) -> np.ndarray:
  """(N, sum(stage_channels) + head inputs) float32 features of uint8 images, in inference
  mode (BatchNorm with its running statistics); `progress`: a bar over the batches."""
  if not len(images):  # a labeling folder without test/
    head = classifier_head(classifier)
    return np.zeros((0, sum(classifier.stage_channels) + head.in_features), np.float32)
  model = nnx.clone(classifier)
  model.eval()
  graphdef, state = nnx.split(model)
  mean, std = (np.asarray(a, np.float32) for a in normalization)
  (features,) = map_chunks(
    lambda chunk: (_features_batch(graphdef, state, chunk, mean, std),),
    images,
    batch_size,
    progress="frozen features" if progress else "",
  )
  return features.astype(np.float32)


def freeze(
  learner: ActiveLearner, dataset, normalization, batch_size: int, progress: bool = False
) -> tuple[ActiveLearner, tuple[np.ndarray, np.ndarray]]:
  """Linear mode's learner (`probe_of(learner)`) and the frozen features of `dataset`'s
  training and test images."""
  features = tuple(
    frozen_features(learner.classifier, x, normalization, batch_size, progress)
    for x in (dataset.x_train, dataset.x_test)
  )
  return probe_of(learner), features


def with_features(dataset, x_train: np.ndarray, x_test: np.ndarray):
  """`dataset` (its labels, names, files) with frozen features in place of its images."""
  return dataclasses.replace(dataset, x_train=x_train, x_test=x_test)


def closed_form_scores(probe: LinearProbe, features: jax.Array, reduction: str) -> jax.Array:
  """LPLgrad's per-image score of a linear probe without autodiff: ||dH/dW|| = ||h|| ||g||,
  ||dH/db|| = ||g||, summed (layer_sum) or in quadrature (frobenius)."""
  h = jnp.split(features, np.cumsum(probe.stage_channels), axis=-1)[-1]
  log_p = jax.nn.log_softmax(probe.head(h))
  p = jnp.exp(log_p)
  entropy = -jnp.sum(p * log_p, axis=-1, keepdims=True)
  g = jnp.linalg.norm(-p * (log_p + entropy), axis=-1)
  h_norm = jnp.linalg.norm(h, axis=-1)
  if reduction == "layer_sum":
    return h_norm * g + g
  return g * jnp.sqrt(h_norm**2 + 1)
