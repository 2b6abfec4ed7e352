"""ResNet-18/34/50 returning `(logits, (stage1, ..., stage4))`, CIFAR or ImageNet stem."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from lplgrad_jax.errors import ConfigError
from lplgrad_jax.models.layers import Layers
from lplgrad_jax.models.layers import at_least_float32
from lplgrad_jax.models.layers import projection


class BasicBlock(nnx.Module):
  """Two 3x3 convolutions with an identity or 1x1-projection shortcut."""

  def __init__(self, cin: int, cout: int, stride: int, *, layers: Layers, rngs: nnx.Rngs):
    self.conv1 = layers.conv(cin, cout, 3, stride, rngs)
    self.bn1 = layers.batch_norm(cout, rngs)
    self.conv2 = layers.conv(cout, cout, 3, 1, rngs)
    self.bn2 = layers.batch_norm(cout, rngs)
    self.shortcut_conv, self.shortcut_bn = projection(layers, cin, cout, stride, rngs)

  def __call__(self, x, mask=None):
    y = nnx.relu(self.bn1(self.conv1(x), mask=mask))
    y = self.bn2(self.conv2(y), mask=mask)
    if self.shortcut_conv is not None:
      x = self.shortcut_bn(self.shortcut_conv(x), mask=mask)
    return nnx.relu(y + x)


class ResNet18(nnx.Module):
  """ResNet-18 returning `(logits, (stage1, stage2, stage3, stage4))`.

  stem="cifar": 3x3/stride-1 convolution, no max-pool (32x32 inputs).
  stem="imagenet": 7x7/stride-2 convolution and 3x3/stride-2 max-pool.
  `mask` (N,) marks the real examples of a padded batch: BatchNorm statistics
  are computed over those alone.
  """

  stage_sizes = (2, 2, 2, 2)
  block = BasicBlock
  expansion = 1  # block output channels / block width

  def __init__(
    self,
    num_classes: int,
    *,
    width: int = 64,
    stem: str = "cifar",
    in_channels: int = 3,
    layers: Layers = Layers(),
    rngs: nnx.Rngs,
  ):
    if stem not in ("cifar", "imagenet"):
      raise ConfigError(f"unknown model stem {stem!r}: expected 'cifar' or 'imagenet'")
    self.stem = stem
    self.stage_channels = tuple(width * 2**i * self.expansion for i in range(4))
    self.stem_conv = layers.conv(
      in_channels, width, 3 if stem == "cifar" else 7, 1 if stem == "cifar" else 2, rngs
    )
    self.stem_bn = layers.batch_norm(width, rngs)
    blocks = []
    cin = width
    for i, (cout, depth) in enumerate(zip(self.stage_channels, self.stage_sizes)):
      stage = []
      for j in range(depth):
        stride = 2 if (i > 0 and j == 0) else 1
        stage.append(self.block(cin, cout, stride, layers=layers, rngs=rngs))
        cin = cout
      blocks.append(nnx.List(stage))
    self.stages = nnx.List(blocks)
    self.head = layers.dense(cin, num_classes, rngs)

  def __call__(self, x, mask=None):
    if mask is not None:
      mask = mask.astype(bool).reshape(-1, 1, 1, 1)
    y = nnx.relu(self.stem_bn(self.stem_conv(x), mask=mask))
    if self.stem == "imagenet":
      y = nnx.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features = []
    for stage in self.stages:
      for block in stage:
        y = block(y, mask)
      features.append(y)
    pooled = jnp.mean(y, axis=(1, 2))
    # float32 logits whatever the compute dtype: softmax, entropy and losses need the range.
    return at_least_float32(self.head(pooled)), tuple(features)


class Bottleneck(nnx.Module):
  """1x1 reduce, 3x3 (stride), 1x1 expand (x4) with a projection shortcut where shapes change."""

  def __init__(self, cin: int, cout: int, stride: int, *, layers: Layers, rngs: nnx.Rngs):
    mid = cout // ResNet50.expansion
    self.conv1, self.bn1 = layers.conv(cin, mid, 1, 1, rngs), layers.batch_norm(mid, rngs)
    self.conv2, self.bn2 = layers.conv(mid, mid, 3, stride, rngs), layers.batch_norm(mid, rngs)
    self.conv3, self.bn3 = layers.conv(mid, cout, 1, 1, rngs), layers.batch_norm(cout, rngs)
    self.shortcut_conv, self.shortcut_bn = projection(layers, cin, cout, stride, rngs)

  def __call__(self, x, mask=None):
    y = nnx.relu(self.bn1(self.conv1(x), mask=mask))
    y = nnx.relu(self.bn2(self.conv2(y), mask=mask))
    y = self.bn3(self.conv3(y), mask=mask)
    if self.shortcut_conv is not None:
      x = self.shortcut_bn(self.shortcut_conv(x), mask=mask)
    return nnx.relu(y + x)


class ResNet34(ResNet18):
  stage_sizes = (3, 4, 6, 3)


class ResNet50(ResNet18):
  stage_sizes = (3, 4, 6, 3)
  block = Bottleneck
  expansion = 4
