"""ResNet-18 main model and the loss-prediction (auxiliary) module, in Flax NNX.

`logits, features = ResNet18(...)(x)`: `features` holds the outputs of the four
residual stages, which the loss-prediction module reads. Layout follows the
PyTorch models used by the LPLgrad and Learning Loss authors (kuangliu's
CIFAR ResNet): convolutions without bias, explicit symmetric padding, BatchNorm
with PyTorch's momentum (0.1 <-> Flax 0.9) and epsilon, and by default PyTorch's
initialisation and running-variance update (`Layers`; README: Fidelity to the
authors' code).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lplgrad_jax.errors import ConfigError, check_choice

# Activations and matmul inputs; parameters and BatchNorm statistics stay float32.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
# model.init: "pytorch" (the authors' code: PyTorch's default for every conv and linear
# layer, kaiming_uniform(a=sqrt(5)), i.e. weights and biases uniform in +-1/sqrt(fan_in));
# "he": He-normal (fan_out) convolutions as torchvision, lecun_normal / zero-bias dense.
INITS = ("pytorch", "he")
# model.bn_running_var: "unbiased" (PyTorch: the running variance is updated with the batch
# variance times n/(n-1)); "biased" (Flax: the batch variance as normalised with).
BN_RUNNING_VARS = ("unbiased", "biased")
# bound sqrt(3 * scale / fan_in) = 1/sqrt(fan_in): PyTorch's kaiming_uniform(a=sqrt(5)).
_PYTORCH_KERNEL_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# He initialisation (fan_out) as in torchvision's ResNets.
_HE_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pytorch_bias_init(fan_in: int):
  bound = 1.0 / fan_in**0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                  bound)


@dataclasses.dataclass(frozen=True)
class Layers:
  """Builds conv, dense and BatchNorm layers with one initialisation and running-variance rule."""
  init: str = "pytorch"
  bn_running_var: str = "unbiased"

  def __post_init__(self):
    check_choice(self.init, INITS, "model.init")
    check_choice(self.bn_running_var, BN_RUNNING_VARS, "model.bn_running_var")

  def conv(self, cin: int, cout: int, size: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    pad = (size - 1) // 2
    return nnx.Conv(
        cin, cout, kernel_size=(size, size), strides=(stride, stride),
        padding=((pad, pad), (pad, pad)), use_bias=False,
        kernel_init=_PYTORCH_KERNEL_INIT if self.init == "pytorch" else _HE_CONV_INIT, rngs=rngs)

  def dense(self, cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Linear:
    if self.init == "he":
      return nnx.Linear(cin, cout, rngs=rngs)
    return nnx.Linear(cin, cout, kernel_init=_PYTORCH_KERNEL_INIT,
                      bias_init=_pytorch_bias_init(cin), rngs=rngs)

  def batch_norm(self, features: int, rngs: nnx.Rngs) -> "BatchNorm":
    return BatchNorm(features, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON,
                     unbiased_running_var=self.bn_running_var == "unbiased", rngs=rngs)


class BatchNorm(nnx.BatchNorm):
  """Flax's BatchNorm whose running variance may follow PyTorch's unbiased update.

  With `unbiased_running_var` the training-mode update stores
  momentum * var + (1 - momentum) * batch_var * n / (n - 1), n the number of
  (unmasked) values per channel over the whole batch; the batch is still
  normalised with the biased batch variance, as in PyTorch.
  """

  def __init__(self, features: int, *, unbiased_running_var: bool, **kwargs):
    super().__init__(features, **kwargs)
    self.unbiased_running_var = unbiased_running_var

  def __call__(self, x, use_running_average=None, *, mask=None):
    previous = self.var[...]
    y = super().__call__(x, use_running_average, mask=mask)
    training = not (self.use_running_average if use_running_average is None
                    else use_running_average)
    if training and self.unbiased_running_var:
      x = x.astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      where = None if mask is None else jnp.broadcast_to(mask, x.shape)
      # The batch variance as Flax's BatchNorm computes it (E[x^2] - E[x]^2).
      mean = jnp.mean(x, axes, where=where)
      var = jnp.maximum(0.0, jnp.mean(jnp.square(x), axes, where=where) - jnp.square(mean))
      n = (x[..., 0].size if mask is None
           else jnp.sum(where[..., 0].astype(jnp.float32)))
      self.var[...] = jax.lax.stop_gradient(
          self.momentum * previous + (1 - self.momentum) * var * (n / jnp.maximum(n - 1, 1)))
    return y


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

  def __init__(self, cin: int, cout: int, stride: int, *, layers: Layers, rngs: nnx.Rngs):
    self.conv1 = layers.conv(cin, cout, 3, stride, rngs)
    self.bn1 = layers.batch_norm(cout, rngs)
    self.conv2 = layers.conv(cout, cout, 3, 1, rngs)
    self.bn2 = layers.batch_norm(cout, rngs)
    if stride != 1 or cin != cout:
      self.shortcut_conv = layers.conv(cin, cout, 1, stride, rngs)
      self.shortcut_bn = layers.batch_norm(cout, rngs)
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
               in_channels: int = 3, layers: Layers = Layers(), rngs: nnx.Rngs):
    if stem not in ("cifar", "imagenet"):
      raise ConfigError(f"unknown model stem {stem!r}: expected 'cifar' or 'imagenet'")
    self.stem = stem
    self.stage_channels = tuple(width * 2**i for i in range(4))
    self.stem_conv = layers.conv(in_channels, width, 3 if stem == "cifar" else 7,
                                 1 if stem == "cifar" else 2, rngs)
    self.stem_bn = layers.batch_norm(width, rngs)
    blocks = []
    cin = width
    for i, (cout, depth) in enumerate(zip(self.stage_channels, self.stage_sizes)):
      stage = []
      for j in range(depth):
        stride = 2 if (i > 0 and j == 0) else 1
        stage.append(BasicBlock(cin, cout, stride, layers=layers, rngs=rngs))
        cin = cout
      blocks.append(nnx.List(stage))
    self.stages = nnx.List(blocks)
    self.head = layers.dense(cin, num_classes, rngs)

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
               layers: Layers = Layers(), rngs: nnx.Rngs):
    self.stage_dense = nnx.List([layers.dense(c, hidden, rngs) for c in stage_channels])
    self.out = layers.dense(hidden * len(stage_channels), 1, rngs)

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
  check_choice(dtype, COMPUTE_DTYPES, "compute dtype")
  copy = nnx.merge(*nnx.split(module))
  for _, layer in nnx.iter_modules(copy):
    if isinstance(layer, (nnx.Conv, nnx.Linear, nnx.BatchNorm)):
      layer.dtype = COMPUTE_DTYPES[dtype]
  return copy


def create_learner(model_config, num_classes: int, *, use_aux: bool,
                   key: jax.Array) -> ActiveLearner:
  """Builds the main model (chosen by `model_config.name`) and its loss head."""
  check_choice(model_config.name, sorted(_MODELS), "model")
  if model_config.width < 1:
    raise ConfigError(f"model.width={model_config.width} must be a positive integer")
  layers = Layers(model_config.get("init", "pytorch"),
                  model_config.get("bn_running_var", "unbiased"))
  rngs = nnx.Rngs(params=key)
  classifier = _MODELS[model_config.name](
      num_classes, width=model_config.width, stem=model_config.stem, layers=layers, rngs=rngs)
  loss_head = (LossPredictionModule(classifier.stage_channels,
                                    hidden=model_config.loss_head_width, layers=layers,
                                    rngs=rngs)
               if use_aux else None)
  return ActiveLearner(classifier, loss_head)
