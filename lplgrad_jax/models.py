"""Main models (ResNet-18/34/50, WRN-28-k, ViT, a user's own) and the loss-prediction module.

`logits, features = ResNet18(...)(x)`: `features` holds the outputs of the four
residual stages, which the loss-prediction module reads. Layout follows the
PyTorch models used by the LPLgrad and Learning Loss authors (kuangliu's
CIFAR ResNet): convolutions without bias, explicit symmetric padding, BatchNorm
with PyTorch's momentum (0.1 <-> Flax 0.9) and epsilon.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lplgrad_jax import layer_hooks
from lplgrad_jax.errors import ConfigError
from lplgrad_jax.errors import check_choice

# Activations and matmul inputs; parameters and BatchNorm statistics stay float32.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def at_least_float32(x: jax.Array) -> jax.Array:
  """`x` in float32, or in float64 where it already is (the tests' float64 reference)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


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
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


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
      cin,
      cout,
      kernel_size=(size, size),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      use_bias=False,
      kernel_init=_PYTORCH_KERNEL_INIT if self.init == "pytorch" else _HE_CONV_INIT,
      rngs=rngs,
    )

  def dense(self, cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Linear:
    if self.init == "he":
      return nnx.Linear(cin, cout, rngs=rngs)
    return nnx.Linear(
      cin, cout, kernel_init=_PYTORCH_KERNEL_INIT, bias_init=_pytorch_bias_init(cin), rngs=rngs
    )

  def batch_norm(self, features: int, rngs: nnx.Rngs) -> BatchNorm:
    return BatchNorm(
      features,
      momentum=_BN_MOMENTUM,
      epsilon=_BN_EPSILON,
      unbiased_running_var=self.bn_running_var == "unbiased",
      rngs=rngs,
    )


class BatchNorm(nnx.BatchNorm):
  """Flax's BatchNorm (its parameters, statistics and inference) with PyTorch's training mode.

  Training mode computes the batch statistics once: the mean, then the variance as
  mean((x - mean)^2), as PyTorch does, not Flax's default E[x^2] - E[x]^2, which in
  float32 cancels wherever the mean is large against the spread (after every ReLU):
  about ten times the error, and an error that depends on how XLA:CPU sums on each
  machine (docs/cpu_numerics.md). The batch is normalised with the biased variance;
  with `unbiased_running_var` the running variance takes var * n / (n - 1), n the
  (unmasked) values per channel, as in PyTorch.
  """

  def __init__(self, features: int, *, unbiased_running_var: bool, **kwargs):
    super().__init__(features, use_fast_variance=False, **kwargs)
    self.unbiased_running_var = unbiased_running_var

  def __call__(self, x, use_running_average=None, *, mask=None):
    inference = self.use_running_average if use_running_average is None else use_running_average
    plain = self.axis_name is None and self.axis in (-1, x.ndim - 1)
    if inference or not plain or self.scale is None or self.bias is None:
      return super().__call__(x, use_running_average, mask=mask)
    x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
    values = at_least_float32(x)  # statistics in float32 also under a bfloat16 compute dtype
    axes = tuple(range(x.ndim - 1))
    where = None if mask is None else jnp.broadcast_to(mask, x.shape)
    mean = jnp.mean(values, axes, where=where)
    if self.use_fast_variance:  # Flax's default, kept for experiments/bench.py --bn_variance
      var = jnp.maximum(jnp.mean(jnp.square(values), axes, where=where) - jnp.square(mean), 0)
    else:
      var = jnp.mean(jnp.square(values - mean), axes, where=where)
    running_var = var
    if self.unbiased_running_var:
      n = x[..., 0].size if mask is None else jnp.sum(where[..., 0].astype(values.dtype))
      running_var = var * (n / jnp.maximum(n - 1, 1))
    m = self.momentum
    self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean)
    self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * running_var)
    y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype or jnp.result_type(x, scale, bias))


def _projection(layers: Layers, cin: int, cout: int, stride: int, rngs: nnx.Rngs):
  """(1x1 conv, BatchNorm) of a residual shortcut where the shape changes, else (None, None)."""
  if stride == 1 and cin == cout:
    return None, None
  return layers.conv(cin, cout, 1, stride, rngs), layers.batch_norm(cout, rngs)


class BasicBlock(nnx.Module):
  """Two 3x3 convolutions with an identity or 1x1-projection shortcut."""

  def __init__(self, cin: int, cout: int, stride: int, *, layers: Layers, rngs: nnx.Rngs):
    self.conv1 = layers.conv(cin, cout, 3, stride, rngs)
    self.bn1 = layers.batch_norm(cout, rngs)
    self.conv2 = layers.conv(cout, cout, 3, 1, rngs)
    self.bn2 = layers.batch_norm(cout, rngs)
    self.shortcut_conv, self.shortcut_bn = _projection(layers, cin, cout, stride, rngs)

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

  def __init__(self, classifier: ResNet18, loss_head: LossPredictionModule | None):
    self.classifier = classifier
    self.loss_head = loss_head


class Bottleneck(nnx.Module):
  """1x1 reduce, 3x3 (stride), 1x1 expand (x4) with a projection shortcut where shapes change."""

  def __init__(self, cin: int, cout: int, stride: int, *, layers: Layers, rngs: nnx.Rngs):
    mid = cout // ResNet50.expansion
    self.conv1, self.bn1 = layers.conv(cin, mid, 1, 1, rngs), layers.batch_norm(mid, rngs)
    self.conv2, self.bn2 = layers.conv(mid, mid, 3, stride, rngs), layers.batch_norm(mid, rngs)
    self.conv3, self.bn3 = layers.conv(mid, cout, 1, 1, rngs), layers.batch_norm(cout, rngs)
    self.shortcut_conv, self.shortcut_bn = _projection(layers, cin, cout, stride, rngs)

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


class ViTBlock(nnx.Module):
  """Pre-LayerNorm transformer block: multi-head self-attention and a GELU MLP (x2 hidden)."""

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp_in = nnx.Linear(dim, 2 * dim, rngs=rngs)
    self.mlp_out = nnx.Linear(2 * dim, dim, rngs=rngs)

  def __call__(self, x):
    x = x + self.attention(self.ln1(x))
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.ln2(x))))


class ViT(nnx.Module):
  """A small Vision Transformer: patch-embedding conv, class token, learned positions."""

  def __init__(
    self,
    num_classes: int,
    *,
    width: int = 64,
    depth: int = 6,
    heads: int = 4,
    patch: int = 4,
    image_size: int = 32,
    in_channels: int = 3,
    rngs: nnx.Rngs,
  ):
    if image_size % patch or width % heads:
      raise ConfigError(
        f"ViT: image size {image_size} must be a multiple of patch {patch} and "
        f"width {width} a multiple of heads {heads}"
      )
    self.stage_channels = (width,) * depth
    self.patch = nnx.Conv(
      in_channels, width, (patch, patch), strides=patch, padding="VALID", rngs=rngs
    )
    self.cls_token = nnx.Param(jnp.zeros((1, 1, width)))
    tokens = (image_size // patch) ** 2 + 1
    self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, width)))
    self.blocks = nnx.List([ViTBlock(width, heads, rngs=rngs) for _ in range(depth)])
    self.ln = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, num_classes, rngs=rngs)

  def __call__(self, x):
    y = self.patch(x)
    y = y.reshape(y.shape[0], -1, y.shape[-1])
    cls = jnp.broadcast_to(self.cls_token[...], (y.shape[0], 1, y.shape[-1])).astype(y.dtype)
    y = jnp.concatenate([cls, y], axis=1) + self.positions[...]
    features = []
    for block in self.blocks:
      y = block(y)
      features.append(y)
    return at_least_float32(self.head(self.ln(y)[:, 0])), tuple(features)


def _masked_batch_norm(net: nnx.Module, mask: jax.Array):
  """Every BatchNorm call of `net` on a batch of len(mask) rows computes its statistics over
  the real rows.

  For models that take no `mask`: padded rows would otherwise enter the batch statistics.
  """
  rows = mask.astype(bool)

  def with_mask(layer, call, args, kwargs):
    x = args[0] if args else kwargs["x"]
    if kwargs.get("mask") is None and x.ndim >= 2 and x.shape[0] == rows.shape[0]:
      kwargs = {**kwargs, "mask": rows.reshape((-1,) + (1,) * (x.ndim - 1))}
    return call(*args, **kwargs)

  return layer_hooks.intercept(net, (nnx.BatchNorm,), with_mask)


class Backbone(nnx.Module):
  """Adapts a model `net(x) -> (logits, features)` to the campaign's `(x, mask=None)` call.

  `stage_channels` (what the loss head reads) come from the features' last axes.
  """

  def __init__(self, net: nnx.Module, image_size: int, in_channels: int = 3):
    self.net = net
    example = jax.ShapeDtypeStruct((2, image_size, image_size, in_channels), jnp.float32)
    try:
      logits, features = jax.eval_shape(
        lambda x: nnx.view(net, use_running_average=True, raise_if_not_found=False)(x), example
      )
    except (TypeError, ValueError) as e:
      raise ConfigError(
        f"model {type(net).__name__} on a {example.shape} batch: expected it "
        f"to return (logits, features) ({type(e).__name__}: {e})"
      ) from None
    if logits.ndim != 2 or not isinstance(features, (tuple, list)) or not features:
      raise ConfigError(
        f"model {type(net).__name__} returned logits {logits.shape} and "
        f"{type(features).__name__} features: expected (N, classes) logits and "
        "a non-empty tuple of stage outputs"
      )
    self.stage_channels = tuple(int(f.shape[-1]) for f in features)

  def __call__(self, x, mask=None):
    if mask is None:
      return self.net(x)
    with _masked_batch_norm(self.net, mask):
      return self.net(x)


# (model_config, num_classes, image_size, layers, rngs) -> the main model
ModelBuilder = Callable[..., nnx.Module]
_MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str, builder: ModelBuilder) -> None:
  """`config.model.name = name` builds `builder(model_config, num_classes, image_size, layers,
  rngs)`."""
  if name in _MODELS:
    raise ConfigError(f"model {name!r} is already registered")
  _MODELS[name] = builder


def _resnet(cls):
  return lambda c, num_classes, image_size, layers, rngs: cls(
    num_classes, width=c.width, stem=c.stem, layers=layers, rngs=rngs
  )


register_model("resnet18", _resnet(ResNet18))
register_model("resnet34", _resnet(ResNet34))
register_model("resnet50", _resnet(ResNet50))
register_model(
  "wide_resnet28",
  lambda c, num_classes, image_size, layers, rngs: Backbone(
    WideResNet(num_classes, depth=28, widen=c.width, layers=layers, rngs=rngs), image_size
  ),
)
# Not a model of the authors' code: Flax's default initialisers (model.init is for the CNNs).
register_model(
  "vit",
  lambda c, num_classes, image_size, layers, rngs: Backbone(
    ViT(num_classes, width=c.width, depth=c.depth, heads=c.heads, image_size=image_size, rngs=rngs),
    image_size,
  ),
)


def _user_model(spec: str, num_classes: int, image_size: int, rngs: nnx.Rngs) -> nnx.Module:
  """`module:pkg.mod:factory`: factory(num_classes, rngs) -> model returning (logits, features)."""
  parts = spec.split(":")
  if len(parts) != 3 or not all(parts[1:]):
    raise ConfigError(f"model {spec!r}: expected 'module:package.module:factory'")
  try:
    factory = getattr(importlib.import_module(parts[1]), parts[2])
  except (ImportError, AttributeError) as e:
    raise ConfigError(
      f"model {spec!r}: cannot load {parts[2]!r} from {parts[1]!r} ({type(e).__name__}: {e})"
    ) from None
  try:
    net = factory(num_classes, rngs)
  except TypeError as e:
    raise ConfigError(
      f"model {spec!r}: expected factory(num_classes, rngs) -> nnx.Module ({e})"
    ) from None
  if not isinstance(net, nnx.Module):
    raise ConfigError(
      f"model {spec!r}: the factory returned {type(net).__name__}, expected an nnx.Module"
    )
  return Backbone(net, image_size)


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


def create_learner(
  model_config, num_classes: int, *, use_aux: bool, key: jax.Array, image_size: int = 32
) -> ActiveLearner:
  """Builds the main model (chosen by `model_config.name`) and its loss head."""
  name = model_config.name
  if not name.startswith("module:") and name not in _MODELS:
    raise ConfigError(
      f"unknown model {name!r}: expected one of {', '.join(sorted(_MODELS))} "
      "or 'module:package.module:factory'"
    )
  if model_config.width < 1:
    raise ConfigError(f"model.width={model_config.width} must be a positive integer")
  layers = Layers(
    model_config.get("init", "pytorch"), model_config.get("bn_running_var", "unbiased")
  )

  def build(key: jax.Array) -> ActiveLearner:
    rngs = nnx.Rngs(params=key)
    classifier = (
      _user_model(name, num_classes, image_size, rngs)
      if name.startswith("module:")
      else _MODELS[name](model_config, num_classes, image_size, layers, rngs)
    )
    loss_head = (
      LossPredictionModule(
        classifier.stage_channels, hidden=model_config.loss_head_width, layers=layers, rngs=rngs
      )
      if use_aux
      else None
    )
    return ActiveLearner(classifier, loss_head)

  # One compiled program draws every initial weight. Built eagerly, each initialiser
  # compiles once per parameter shape: ~70 small programs, seconds of every start-up.
  graphdef = None

  def initial_state(key: jax.Array) -> nnx.State:
    nonlocal graphdef  # the structure, known once traced
    graphdef, state = nnx.split(build(key))
    return state

  options = _RUN_ONCE_OPTIONS if jax.default_backend() == "cpu" else None
  try:
    state = jax.jit(initial_state, compiler_options=options)(key)
  except _NEEDS_CONCRETE_VALUES:  # a user's factory that computes with its weights' values
    return build(key)
  return nnx.merge(graphdef, state)


# XLA:CPU's LLVM optimisations cost seconds on the initialisers' random draws and save
# nothing on a program that runs once.
_RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_NEEDS_CONCRETE_VALUES = (
  jax.errors.ConcretizationTypeError,
  jax.errors.TracerArrayConversionError,
  jax.errors.TracerIntegerConversionError,
)
