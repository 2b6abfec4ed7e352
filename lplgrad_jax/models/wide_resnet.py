"""Wide ResNet (Zagoruyko & Komodakis), returning `(logits, stage outputs)`."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from lplgrad_jax.errors import ConfigError
from lplgrad_jax.models.layers import Layers
from lplgrad_jax.models.layers import at_least_float32


class WideBlock(nnx.Module):
  """Pre-activation block of Zagoruyko & Komodakis: BN-ReLU-conv3x3, twice."""

  def __init__(self, cin: int, cout: int, stride: int, *, layers: Layers, rngs: nnx.Rngs):
    self.bn1, self.conv1 = layers.batch_norm(cin, rngs), layers.conv(cin, cout, 3, stride, rngs)
    self.bn2, self.conv2 = layers.batch_norm(cout, rngs), layers.conv(cout, cout, 3, 1, rngs)
    self.shortcut = layers.conv(cin, cout, 1, stride, rngs) if stride != 1 or cin != cout else None

  def __call__(self, x):
    activated = nnx.relu(self.bn1(x))
    y = self.conv2(nnx.relu(self.bn2(self.conv1(activated))))
    return y + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nnx.Module):
  """WRN-depth-k (3 groups of (depth - 4) / 6 blocks, widths 16k, 32k, 64k) for 32x32 inputs."""

  def __init__(
    self,
    num_classes: int,
    *,
    depth: int = 28,
    widen: int = 10,
    in_channels: int = 3,
    layers: Layers = Layers(),
    rngs: nnx.Rngs,
  ):
    if (depth - 4) % 6:
      raise ConfigError(f"WideResNet depth={depth}: expected 6n + 4 (e.g. 28)")
    self.stage_channels = tuple(16 * widen * 2**i for i in range(3))
    self.stem = layers.conv(in_channels, 16, 3, 1, rngs)
    cin, groups = 16, []
    for i, cout in enumerate(self.stage_channels):
      groups.append(
        nnx.List(
          [
            WideBlock(
              cin if j == 0 else cout, cout, 2 if i > 0 and j == 0 else 1, layers=layers, rngs=rngs
            )
            for j in range((depth - 4) // 6)
          ]
        )
      )
      cin = cout
    self.groups = nnx.List(groups)
    self.bn = layers.batch_norm(cin, rngs)
    self.head = layers.dense(cin, num_classes, rngs)

  def __call__(self, x):
    y, features = self.stem(x), []
    for group in self.groups:
      for block in group:
        y = block(y)
      features.append(y)
    y = jnp.mean(nnx.relu(self.bn(y)), axis=(1, 2))
    return at_least_float32(self.head(y)), tuple(features)
