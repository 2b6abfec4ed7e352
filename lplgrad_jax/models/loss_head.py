"""The loss-prediction module (Yoo & Kweon, "Learning loss for active learning", CVPR 2019) and
the pair it is trained with."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lplgrad_jax.models.layers import Layers
from lplgrad_jax.models.layers import at_least_float32


def pool_feature(feature: jax.Array) -> jax.Array:
  """Global average pool of a stage output (N, H, W, C), (N, T, C) or (N, C) to (N, C)."""
  return jnp.mean(feature, axis=tuple(range(1, feature.ndim - 1))) if feature.ndim > 2 else feature


class LossPredictionModule(nnx.Module):
  """Yoo & Kweon's loss-prediction head: per stage GAP -> Dense -> ReLU, concat -> Dense(1)."""

  def __init__(
    self,
    stage_channels: Sequence[int],
    *,
    hidden: int = 128,
    layers: Layers = Layers(),
    rngs: nnx.Rngs,
  ):
    self.stage_dense = nnx.List([layers.dense(c, hidden, rngs) for c in stage_channels])
    self.out = layers.dense(hidden * len(stage_channels), 1, rngs)

  def __call__(self, features) -> jax.Array:
    hidden = [nnx.relu(dense(pool_feature(f))) for dense, f in zip(self.stage_dense, features)]
    return at_least_float32(self.out(jnp.concatenate(hidden, axis=-1))[:, 0])


class ActiveLearner(nnx.Module):
  """The jointly trained pair: `classifier` (main model) and optional `loss_head`."""

  def __init__(self, classifier: nnx.Module, loss_head: LossPredictionModule | None):
    self.classifier = classifier
    self.loss_head = loss_head
