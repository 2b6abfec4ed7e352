"""Golden fixtures of pretrained weights: tiny PyTorch models with torchvision's and timm's
tensor names, their weights and their outputs.

Hand-written PyTorch modules laid out as torchvision's ResNet-18 / ResNet-50 and timm's
VisionTransformer (same module names, so the same state dict names), at tiny widths, with
random weights and random BatchNorm statistics and affine parameters. Writes to
tests/data/pretrained/:
  resnet18_w4.safetensors  ResNet-18, width 4, ImageNet stem, 10 classes (float32)
  resnet50_w2.npz          ResNet-50 (Bottleneck), width 2, 10 classes
  vit_d24.safetensors      ViT: width 24, depth 2, 2 heads, patch 8, MLP ratio 4, 32 px
  expected.npz             the inputs (NHWC), each model's float64 logits and stage outputs
                           (NHWC / (N, tokens, C)) in eval mode, and the ViT's position
                           embeddings resampled by timm's rule (F.interpolate, bicubic,
                           antialias) to grids 6 and 2
tests/test_pretrained.py checks lplgrad_jax against these without PyTorch.

  python experiments/pretrained_fixtures.py           # needs torch
  python experiments/pretrained_fixtures.py --check   # also needs torchvision and timm

--check builds the real torchvision resnet18 / resnet50 and timm vit_small_patch16_224, checks
that the hand-written modules at full size have the same names and shapes and compute the
same outputs from the same weights, and writes tests/data/pretrained/manifest.json (every name
and shape of the three real state dicts) for tests/test_pretrained.py.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO_ROOT, "tests", "data", "pretrained")
NUM_CLASSES = 10
IMAGES = 2
IMAGE_SIZE = 32
VIT = {"dim": 24, "depth": 2, "heads": 2, "patch": 8}
RESAMPLED_GRIDS = (6, 2)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, width, stride):
    super().__init__()
    cout = width * self.expansion
    self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.downsample = _downsample(cin, cout, stride)

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, width, stride):
    super().__init__()
    cout = width * self.expansion
    self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # torchvision's v1.5
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(cout)
    self.downsample = _downsample(cin, cout, stride)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(y)))))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


def _downsample(cin, cout, stride):
  if stride == 1 and cin == cout:
    return None
  return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
  """torchvision.models.ResNet's layout at any stem width; returns (logits, stage outputs)."""

  def __init__(self, block, depths, width, num_classes):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    cin = width
    for i, depth in enumerate(depths):
      blocks = []
      for j in range(depth):
        blocks.append(block(cin, width * 2**i, 2 if i > 0 and j == 0 else 1))
        cin = width * 2**i * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    y = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    stages = []
    for i in range(4):
      y = getattr(self, f"layer{i + 1}")(y)
      stages.append(y)
    return self.fc(y.mean((2, 3))), stages


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    n, t, c = x.shape
    q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5, dim=-1)
    return self.proj((weights @ v).transpose(1, 2).reshape(n, t, c))


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as timm's nn.GELU


class Block(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, 4 * dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, dim, patch):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch, patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
  """timm's VisionTransformer layout (class token, global_pool="token"); returns (logits,
  block outputs)."""

  def __init__(self, dim, depth, heads, patch, image_size, num_classes):
    super().__init__()
    self.patch_embed = PatchEmbed(dim, patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, dim))
    self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.head = nn.Linear(dim, num_classes)

  def forward(self, x):
    y = self.patch_embed(x)
    y = torch.cat([self.cls_token.expand(len(y), -1, -1), y], dim=1) + self.pos_embed
    outputs = []
    for block in self.blocks:
      y = block(y)
      outputs.append(y)
    return self.head(self.norm(y)[:, 0]), outputs


def randomise(model: nn.Module, generator: torch.Generator, scale: float) -> None:
  """Random weights (normal, `scale` / sqrt(fan_in)) and BatchNorm / LayerNorm statistics and
  affine parameters, so that every tensor's role shows in the outputs."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2:
        p.copy_(torch.randn(p.shape, generator=generator) * scale / np.sqrt(p[0].numel()))
      elif name.endswith("weight"):  # norm scales
        p.copy_(0.5 + torch.rand(p.shape, generator=generator))
      else:
        p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=generator))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
        m.num_batches_tracked.fill_(7)


def state_arrays(model: nn.Module) -> dict[str, np.ndarray]:
  return {n: t.detach().float().numpy() for n, t in model.state_dict().items()}


def outputs(model: nn.Module, images_nhwc: np.ndarray):
  """float64 eval-mode logits and stage outputs, the latter channels-last."""
  model = model.double().eval()
  with torch.no_grad():
    logits, stages = model(torch.from_numpy(images_nhwc).double().permute(0, 3, 1, 2))
  last = lambda t: t.permute(0, 2, 3, 1) if t.ndim == 4 else t
  return logits.numpy(), [last(s).numpy() for s in stages]


def resampled_positions(pos_embed: np.ndarray, grid: int) -> np.ndarray:
  """timm's resample_abs_pos_embed: the class token kept, the grid F.interpolated."""
  t = torch.from_numpy(pos_embed).double()
  old = int(round((t.shape[1] - 1) ** 0.5))
  patches = t[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
  patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True)
  return torch.cat([t[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1).numpy()


def tiny_models(generator):
  models = {
    "resnet18_w4": ResNet(BasicBlock, (2, 2, 2, 2), 4, NUM_CLASSES),
    "resnet50_w2": ResNet(Bottleneck, (3, 4, 6, 3), 2, NUM_CLASSES),
    "vit_d24": VisionTransformer(**VIT, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES),
  }
  for name, model in models.items():
    randomise(model, generator, scale=1.0 if name.startswith("resnet") else 2.0)
  return models


def write_fixtures() -> None:
  from safetensors.numpy import save_file

  generator = torch.Generator().manual_seed(0)
  images = torch.randn((IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3), generator=generator).numpy()
  expected = {"images": images}
  os.makedirs(OUT, exist_ok=True)
  for name, model in tiny_models(generator).items():
    arrays = state_arrays(model)
    if name == "resnet50_w2":
      np.savez(os.path.join(OUT, f"{name}.npz"), **arrays)
    else:
      save_file(arrays, os.path.join(OUT, f"{name}.safetensors"))
    logits, stages = outputs(model, images)
    expected[f"{name}/logits"] = logits
    for i, s in enumerate(stages):
      expected[f"{name}/stage{i}"] = s
    if name.startswith("vit"):
      for grid in RESAMPLED_GRIDS:
        expected[f"{name}/pos_embed_grid{grid}"] = resampled_positions(arrays["pos_embed"], grid)
  np.savez_compressed(os.path.join(OUT, "expected.npz"), **expected)
  print(f"wrote {os.path.relpath(OUT, REPO_ROOT)}: {', '.join(sorted(os.listdir(OUT)))}")


def check_against_libraries() -> None:
  """The hand-written modules against torchvision's and timm's, at full size."""
  import timm
  import torchvision

  generator = torch.Generator().manual_seed(1)
  images = torch.randn((2, 3, 224, 224), generator=generator)
  real = {
    "torchvision.resnet18": torchvision.models.resnet18(),
    "torchvision.resnet50": torchvision.models.resnet50(),
    "timm.vit_small_patch16_224": timm.create_model("vit_small_patch16_224", pretrained=False),
  }
  mine = {
    "torchvision.resnet18": ResNet(BasicBlock, (2, 2, 2, 2), 64, 1000),
    "torchvision.resnet50": ResNet(Bottleneck, (3, 4, 6, 3), 64, 1000),
    "timm.vit_small_patch16_224": VisionTransformer(384, 12, 6, 16, 224, 1000),
  }
  manifest = {}
  for name, model in real.items():
    randomise(model, generator, scale=1.0)
    state = model.state_dict()
    shapes = {n: list(t.shape) for n, t in state.items()}
    mine_shapes = {n: list(t.shape) for n, t in mine[name].state_dict().items()}
    if shapes != mine_shapes:
      raise SystemExit(
        f"{name}: the hand-written names or shapes differ: "
        f"{sorted(set(shapes.items()) ^ set(mine_shapes.items()))[:6]}"
      )
    mine[name].load_state_dict(state)
    with torch.no_grad():
      theirs = model.eval()(images)
      ours = mine[name].eval()(images)[0]
    error = float((theirs - ours).norm() / theirs.norm())
    print(
      f"{name}: {len(shapes)} tensors, same names and shapes; logits relative error {error:.1e}"
    )
    if error > 1e-5:
      raise SystemExit(f"{name}: the hand-written module computes something else")
    manifest[name] = shapes
  # timm's resampling of position embeddings (which computes in float32) against the fixture's
  from timm.layers import resample_abs_pos_embed

  pos = torch.randn((1, 17, 8), generator=generator, dtype=torch.float64)
  for grid in RESAMPLED_GRIDS:
    theirs = resample_abs_pos_embed(pos, (grid, grid), num_prefix_tokens=1)
    error = float((theirs - torch.from_numpy(resampled_positions(pos.numpy(), grid))).abs().max())
    print(f"timm resample_abs_pos_embed to grid {grid}: max difference {error:.1e}")
    if error > 1e-5:
      raise SystemExit("the fixture's resampling differs from timm's")
  with open(os.path.join(OUT, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=0)
  print("wrote tests/data/pretrained/manifest.json")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--check", action="store_true", help="also check against torchvision/timm")
  args = parser.parse_args()
  write_fixtures()
  if args.check:
    check_against_libraries()


if __name__ == "__main__":
  main()
