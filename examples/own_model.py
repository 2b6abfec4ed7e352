"""A model of one's own for `--config.model.name=module:examples.own_model:small_cnn`.

Any Flax NNX module works: `factory(num_classes, rngs)` returns it, and calling it on a
batch of images (N, H, W, 3) returns `(logits, features)`, features being a tuple of stage
outputs ((N, H, W, C), (N, T, C) or (N, C)) that the loss-prediction module pools. It needs
no `mask` argument and no hooks: BatchNorm statistics of padded training batches are masked
from outside, and the query intercepts its layers to score per-example gradients.
"""

import jax.numpy as jnp
from flax import nnx


class SmallCNN(nnx.Module):
  def __init__(self, num_classes: int, rngs: nnx.Rngs, width: int = 16):
    self.conv1 = nnx.Conv(3, width, (3, 3), rngs=rngs)
    self.norm1 = nnx.BatchNorm(width, rngs=rngs)
    self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, rngs=rngs)
    self.norm2 = nnx.GroupNorm(2 * width, num_groups=4, rngs=rngs)
    self.head = nnx.Linear(2 * width, num_classes, rngs=rngs)

  def __call__(self, x):
    stage1 = nnx.relu(self.norm1(self.conv1(x)))
    stage2 = nnx.relu(self.norm2(self.conv2(stage1)))
    return self.head(jnp.mean(stage2, axis=(1, 2))), (stage1, stage2)


def small_cnn(num_classes: int, rngs: nnx.Rngs) -> nnx.Module:
  return SmallCNN(num_classes, rngs)
