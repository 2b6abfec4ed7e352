"""Pretrained weights from a local file (`model.pretrained`): torchvision's ResNets and timm's
ViTs, read from .safetensors or .npz (NumPy alone) or .pth (with PyTorch).

    learner = create_learner(config.model, num_classes, use_aux=True, key=key)

loads `config.model.pretrained` into the main model (lplgrad_jax.models.create_learner calls
`load_pretrained`); the loss head and a classifier head for another class count keep their
random initialisation. Images are then normalised with the statistics the weights were
trained with (`IMAGENET_MEAN`, `IMAGENET_STD`) unless `data.normalization` says otherwise.
"""

from __future__ import annotations

from flax import nnx

from lplgrad_jax.errors import ConfigError
from lplgrad_jax.models.backbone import inner_model
from lplgrad_jax.models.resnet import ResNet18
from lplgrad_jax.models.vit import ViT
from lplgrad_jax.pretrained import timm_vit
from lplgrad_jax.pretrained import torchvision_resnet
from lplgrad_jax.pretrained.state_dict import Loaded
from lplgrad_jax.pretrained.state_dict import load_entries
from lplgrad_jax.pretrained.weights_file import read_state_dict

__all__ = [
  "IMAGENET_MEAN",
  "IMAGENET_STD",
  "INCEPTION_MEAN",
  "INCEPTION_STD",
  "Loaded",
  "describe",
  "load_pretrained",
  "normalization",
  "read_state_dict",
]

# torchvision's weights were trained on images normalised with ImageNet's statistics; timm's
# default ViT-S/16 and ViT-B/16 weights (augreg) with 0.5 and 0.5 (Inception's convention).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)

# The model classes (with their subclasses) whose weights have a naming, and that naming.
_NAMINGS = ((ResNet18, torchvision_resnet), (ViT, timm_vit))
# The (mean, std) of the images each naming's weights were trained on.
_NORMALIZATIONS = {
  torchvision_resnet: (IMAGENET_MEAN, IMAGENET_STD),
  timm_vit: (INCEPTION_MEAN, INCEPTION_STD),
}


def _naming_of(model_config):
  """The naming `model_config.name`'s weights load through (the model need not be built)."""
  return timm_vit if model_config.name.startswith("vit") else torchvision_resnet


def normalization(model_config) -> tuple[tuple, tuple] | None:
  """(mean, std) of the images `model_config.pretrained`'s weights were trained on, by the
  naming they load through; None without weights."""
  if not model_config.get("pretrained"):
    return None
  return _NORMALIZATIONS[_naming_of(model_config)]


def describe(model_config, num_classes: int) -> str:
  """One line on the weights a campaign starts from ("" without): the file, its naming, and
  whether its classifier head is kept or drawn anew for `num_classes` classes."""
  path = model_config.get("pretrained")
  if not path:
    return ""
  naming = _naming_of(model_config)
  head = read_state_dict(path).get(naming.HEAD_WEIGHT)
  if head is None:
    kept = f"it has no classifier head: one is drawn for {num_classes} classes"
  elif head.shape[0] != num_classes:
    kept = f"its {head.shape[0]}-class head is drawn anew for {num_classes} classes"
  else:
    kept = f"its {num_classes}-class head is kept"
  mode = model_config.get("train_mode", "finetune")
  frozen = "; the backbone frozen (linear mode)" if mode == "linear" else ""
  return f"pretrained weights: {path} ({naming.NAMES} names); {kept}{frozen}"


def load_pretrained(classifier: nnx.Module, path: str) -> Loaded:
  """Writes the weights of the file `path` into `classifier` (in place), strictly."""
  net = inner_model(classifier)
  for cls, naming in _NAMINGS:
    if isinstance(net, cls):
      return load_entries(naming.entries(net), read_state_dict(path), path, naming.HINT)
  raise ConfigError(
    f"model.pretrained={path!r}: no pretrained naming for {type(net).__name__}: expected "
    "model.name resnet18, resnet34, resnet50 (torchvision), vit_s16 or vit_b16 (timm)"
  )
