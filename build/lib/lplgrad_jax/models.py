"""ResNet-18 main model and the loss-prediction (auxiliary) module, in Flax NNX.

`logits, features = ResNet18(...)(x)`: `features` holds the outputs of the four
residual stages, which the loss-prediction module reads. Layout follows the
PyTorch models used by the LPLgrad and Learning Loss authors (kuangliu's
CIFAR ResNet): convolutions without bias, explicit symmetric padding, BatchNorm
with PyTorch's momentum (0.1 <-> Flax 0.9) and epsilon.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lplgrad_jax.errors import ConfigError

# Activations and matmul inputs; parameters and BatchNorm statistics stay float32.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
# He initialisation (fan_out) as in torchvision's ResNets.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(cin: int, cout: int, size: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
  pad = (size - 1) // 2
  return nnx.Conv(
      cin, cout, kernel_size=(size, size), strides=(stride, stride),
      padding=((pad, pad), (pad, pad)), use_bias=False,
      kernel_init=_conv_init, rngs=rngs)


def _batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(features, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON,
                       rngs=rngs)


def _layer(module, x, tap, mask=None):
  """Applies a parametrised layer; `tap(module, input, output) -> output` may observe it.

  The fast per-example gradient norms (query.py) use the tap to read each
  layer's input and to add a zero perturbation whose gradient is the layer's
  per-example output gradient.
  """
  y = module(x, mask=mask) if isinstance(module, nnx.BatchNorm) else module(x)
  return y if tap is None else tap(module, x, y)


class BasicBlock(nnx.Module):
  """Two 3x3 convolutions with an identity or 1x1-projection shortcut."""

  def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = _conv(cin, cout, 3, stride, rngs)
    self.bn1 = _batch_norm(cout, rngs)
    self.conv2 = _conv(cout, cout, 3, 1, rngs)
    self.bn2 = _batch_norm(cout, rngs)
    if stride != 1 or cin != cout:
      self.shortcut_conv = _conv(cin, cout, 1, stride, rngs)
      self.shortcut_bn = _batch_norm(cout, rngs)
    else:
      self.shortcut_conv = None
      self.shortcut_bn = None

  def __call__(self, x, mask=None, tap=None):
    y = nnx.relu(_layer(self.bn1, _layer(self.conv1, x, tap), tap, mask))
    y = _layer(self.bn2, _layer(self.conv2, y, tap), tap, mask)
    if self.shortcut_conv is not None:
      x = _layer(self.shortcut_bn, _layer(self.shortcut_conv, x, tap), tap, mask)
    return nnx.relu(y + x)


class ResNet18(nnx.Module):
  """ResNet-18 returning `(logits, (stage1, stage2, stage3, stage4))`.

  stem="cifar": 3x3/stride-1 convolution, no max-pool (32x32 inputs).
  stem="imagenet": 7x7/stride-2 convolution and 3x3/stride-2 max-pool.
  `mask` (N,) marks the real examples of a padded batch: BatchNorm statistics
  are computed over those alone. `tap` observes every parametrised layer (see `_layer`).
  """

  stage_sizes = (2, 2, 2, 2)

  def __init__(self, num_classes: int, *, width: int = 64, stem: str = "cifar",
               in_channels: int = 3, rngs: nnx.Rngs):
    if stem not in ("cifar", "imagenet"):
      raise ConfigError(f"unknown model stem {stem!r}: expected 'cifar' or 'imagenet'")
    self.stem = stem
    self.stage_channels = tuple(width * 2**i for i in range(4))
    self.stem_conv = _conv(in_channels, width, 3 if stem == "cifar" else 7,
                           1 if stem == "cifar" else 2, rngs)
    self.stem_bn = _batch_norm(width, rngs)
    blocks = []
    cin = width
    for i, (cout, depth) in enumerate(zip(self.stage_channels, self.stage_sizes)):
      stage = []
      for j in range(depth):
        stride = 2 if (i > 0 and j == 0) else 1
        stage.append(BasicBlock(cin, cout, stride, rngs=rngs))
        cin = cout
      blocks.append(nnx.List(stage))
    self.stages = nnx.List(blocks)
    self.head = nnx.Linear(cin, num_classes, rngs=rngs)

  def __call__(self, x, mask=None, tap=None):
    if mask is not None:
      mask = mask.astype(bool).reshape(-1, 1, 1, 1)
    y = nnx.relu(_layer(self.stem_bn, _layer(self.stem_conv, x, tap), tap, mask))
    if self.stem == "imagenet":
      y = nnx.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features = []
    for stage in self.stages:
      for block in stage:
        y = block(y, mask, tap)
      features.append(y)
    pooled = jnp.mean(y, axis=(1, 2))
    # float32 logits whatever the compute dtype: softmax, entropy and losses need the range.
    return _layer(self.head, pooled, tap).astype(jnp.float32), tuple(features)


class LossPredictionModule(nnx.Module):
  """Yoo & Kweon's loss-prediction head: per stage GAP -> Dense -> ReLU, concat -> Dense(1)."""

  def __init__(self, stage_channels: Sequence[int], *, hidden: int = 128,
               rngs: nnx.Rngs):
    self.stage_dense = nnx.List(
        [nnx.Linear(c, hidden, rngs=rngs) for c in stage_channels])
    self.out = nnx.Linear(hidden * len(stage_channels), 1, rngs=rngs)

  def __call__(self, features) -> jax.Array:
    hidden = [nnx.relu(dense(jnp.mean(f, axis=(1, 2))))
              for dense, f in zip(self.stage_dense, features)]
    return self.out(jnp.concatenate(hidden, axis=-1))[:, 0].astype(jnp.float32)


class ActiveLearner(nnx.Module):
  """The jointly trained pair: `classifier` (main model) and optional `loss_head`."""

  def __init__(self, classifier: ResNet18, loss_head: LossPredictionModule | None):
    self.classifier = classifier
    self.loss_head = loss_head


_MODELS = {"resnet18": ResNet18}


def with_compute_dtype(module: nnx.Module, dtype: str) -> nnx.Module:
  """A copy of `module`, sharing its arrays, whose layers compute in `dtype`.

  Convolutions and dense layers cast their inputs and weights to `dtype`
  (bfloat16: fp32 accumulation on accelerators' matrix units); BatchNorm
  reduces in float32 and keeps float32 statistics; gradients reach the
  float32 parameters through the casts. The dtype lives in the graphdef, so
  training and the query may each choose their own.
  """
  if dtype not in COMPUTE_DTYPES:
    raise ConfigError(f"unknown compute dtype {dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
  copy = nnx.merge(*nnx.split(module))
  for _, layer in nnx.iter_modules(copy):
    if isinstance(layer, (nnx.Conv, nnx.Linear, nnx.BatchNorm)):
      layer.dtype = COMPUTE_DTYPES[dtype]
  return copy


def create_learner(model_config, num_classes: int, *, use_aux: bool,
                   key: jax.Array) -> ActiveLearner:
  """Builds the main model (chosen by `model_config.name`) and its loss head."""
  if model_config.name not in _MODELS:
    raise ConfigError(f"unknown model {model_config.name!r}: expected one of {sorted(_MODELS)}")
  if model_config.width < 1:
    raise ConfigError(f"model.width={model_config.width} must be a positive integer")
  rngs = nnx.Rngs(params=key)
  classifier = _MODELS[model_config.name](
      num_classes, width=model_config.width, stem=model_config.stem, rngs=rngs)
  loss_head = (LossPredictionModule(classifier.stage_channels,
                                    hidden=model_config.loss_head_width, rngs=rngs)
               if use_aux else None)
  return ActiveLearner(classifier, loss_head)
