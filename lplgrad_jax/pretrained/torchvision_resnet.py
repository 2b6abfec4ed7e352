"""torchvision's ResNet names (resnet18, resnet34, resnet50) for the project's ResNets.

torchvision: conv1, bn1, layer{1-4}.{block}.conv{1-3} / bn{1-3}, the projection shortcut as
downsample.0 (1x1 convolution) and downsample.1 (BatchNorm), fc. Its weights need
`model.stem="imagenet"` (7x7/2 convolution and 3x3/2 max-pool) and width 64.
"""

from __future__ import annotations

from lplgrad_jax.models.resnet import ResNet18
from lplgrad_jax.pretrained.state_dict import Entry
from lplgrad_jax.pretrained.state_dict import conv_kernel
from lplgrad_jax.pretrained.state_dict import linear_kernel
from lplgrad_jax.pretrained.state_dict import tensor

HINT = "torchvision's ResNets need model.stem='imagenet' and model.width=64"
NAMES = "torchvision"
HEAD_WEIGHT = "fc.weight"


def _batch_norm(prefix: str, bn) -> dict[str, Entry]:
  return {
    f"{prefix}.weight": tensor(bn.scale),
    f"{prefix}.bias": tensor(bn.bias),
    f"{prefix}.running_mean": tensor(bn.mean),
    f"{prefix}.running_var": tensor(bn.var),
  }


def entries(net: ResNet18) -> dict[str, Entry]:
  """The state dict names of `net` (ResNet18, 34 or 50) as torchvision writes them."""
  found = {"conv1.weight": conv_kernel(net.stem_conv.kernel), **_batch_norm("bn1", net.stem_bn)}
  for i, stage in enumerate(net.stages):
    for j, block in enumerate(stage):
      prefix = f"layer{i + 1}.{j}"
      for k in (1, 2, 3):
        if hasattr(block, f"conv{k}"):  # the Bottleneck's third
          found[f"{prefix}.conv{k}.weight"] = conv_kernel(getattr(block, f"conv{k}").kernel)
          found.update(_batch_norm(f"{prefix}.bn{k}", getattr(block, f"bn{k}")))
      if block.shortcut_conv is not None:
        found[f"{prefix}.downsample.0.weight"] = conv_kernel(block.shortcut_conv.kernel)
        found.update(_batch_norm(f"{prefix}.downsample.1", block.shortcut_bn))
  found["fc.weight"] = linear_kernel(net.head.kernel, head=True)
  found["fc.bias"] = tensor(net.head.bias, head=True)
  return found
