"""Main models (ResNet-18/34/50, WRN-28-k, ViT, a user's own) and the loss-prediction module.

`logits, features = ResNet18(...)(x)`: `features` holds the outputs of the four
residual stages, which the loss-prediction module reads. Layout follows the
PyTorch models used by the LPLgrad and Learning Loss authors (kuangliu's
CIFAR ResNet): convolutions without bias, explicit symmetric padding, BatchNorm
with PyTorch's momentum (0.1 <-> Flax 0.9) and epsilon.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TypeVar

import jax
from flax import nnx

from lplgrad_jax import pretrained
from lplgrad_jax.errors import ConfigError
from lplgrad_jax.errors import check_choice
from lplgrad_jax.models.backbone import Backbone
from lplgrad_jax.models.layers import BN_RUNNING_VARS
from lplgrad_jax.models.layers import COMPUTE_DTYPES
from lplgrad_jax.models.layers import INITS
from lplgrad_jax.models.layers import BatchNorm
from lplgrad_jax.models.layers import Layers
from lplgrad_jax.models.layers import at_least_float32
from lplgrad_jax.models.loss_head import ActiveLearner
from lplgrad_jax.models.loss_head import LossPredictionModule
from lplgrad_jax.models.loss_head import pool_feature
from lplgrad_jax.models.resnet import ResNet18
from lplgrad_jax.models.resnet import ResNet34
from lplgrad_jax.models.resnet import ResNet50
from lplgrad_jax.models.vit import VIT_PRESETS
from lplgrad_jax.models.vit import ViT
from lplgrad_jax.models.wide_resnet import WideResNet

__all__ = [
  "BN_RUNNING_VARS",
  "COMPUTE_DTYPES",
  "INITS",
  "ActiveLearner",
  "Backbone",
  "BatchNorm",
  "Layers",
  "LossPredictionModule",
  "ResNet18",
  "ResNet34",
  "ResNet50",
  "ViT",
  "WideResNet",
  "at_least_float32",
  "create_learner",
  "initialised",
  "pool_feature",
  "register_model",
  "with_compute_dtype",
]


# (model_config, num_classes, image_size, layers, rngs) -> the main model
ModelBuilder = Callable[..., nnx.Module]
M = TypeVar("M", bound=nnx.Module)
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


for _name, _geometry in VIT_PRESETS.items():
  register_model(
    _name,
    lambda c, num_classes, image_size, layers, rngs, g=_geometry: Backbone(
      ViT(num_classes, **g, image_size=image_size, rngs=rngs), image_size
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
  """Builds the main model (chosen by `model_config.name`) and its loss head.

  With `model_config.pretrained` (a weights file), the main model starts from those weights
  (lplgrad_jax.pretrained); its classifier head keeps `key`'s draw where the file's has
  other classes, and the loss head always does.
  """
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

  learner = initialised(build, key)
  weights = model_config.get("pretrained", "")
  if weights:
    pretrained.load_pretrained(learner.classifier, weights)
  return learner


def initialised(build: Callable[[jax.Array], M], key: jax.Array) -> M:
  """`build(key)`, every initial weight drawn by one compiled program.

  Built eagerly, each initialiser compiles once per parameter shape: ~70 small programs
  and seconds for a ResNet-18. A builder that computes with its weights' values, which
  tracing cannot give, runs eagerly.
  """
  graphdef = None

  def initial_state(key: jax.Array) -> nnx.State:
    nonlocal graphdef  # the structure, known once traced
    graphdef, state = nnx.split(build(key))
    return state

  options = _RUN_ONCE_OPTIONS if jax.default_backend() == "cpu" else None
  try:
    state = jax.jit(initial_state, compiler_options=options)(key)
  except _NEEDS_CONCRETE_VALUES:  # e.g. a user's factory
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
