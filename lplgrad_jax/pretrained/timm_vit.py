"""timm's VisionTransformer names (vit_small_patch16_224, vit_base_patch16_224, ...) for the
project's ViT, and the resampling of position embeddings to another image size.

timm: patch_embed.proj, cls_token, pos_embed, blocks.N.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}, norm, head. One qkv linear layer holds the query, key and value
projections (output axis ordered (3, heads, head_dim)); Flax keeps three.
"""

from __future__ import annotations

import math

import numpy as np

from lplgrad_jax.models.vit import ViT
from lplgrad_jax.pretrained.state_dict import Entry
from lplgrad_jax.pretrained.state_dict import conv_kernel
from lplgrad_jax.pretrained.state_dict import linear_kernel
from lplgrad_jax.pretrained.state_dict import tensor

NAMES = "timm"
HEAD_WEIGHT = "head.weight"
HINT = (
  "timm's ViTs need model.name='vit_s16' or 'vit_b16' (patch 16, MLP ratio 4, exact GELU) "
  "with the file's width and depth"
)


def _layer_norm(prefix: str, ln) -> dict[str, Entry]:
  return {f"{prefix}.weight": tensor(ln.scale), f"{prefix}.bias": tensor(ln.bias)}


def _qkv(attention) -> dict[str, Entry]:
  """timm's fused (3 * dim, dim) qkv weight and (3 * dim,) bias as query, key and value."""
  parts = (attention.query, attention.key, attention.value)
  dim, heads, head_dim = parts[0].kernel.shape

  def write_weight(w):
    split = w.T.reshape(dim, 3, heads, head_dim)
    for i, part in enumerate(parts):
      tensor(part.kernel).write(split[:, i])

  def write_bias(b):
    split = b.reshape(3, heads, head_dim)
    for i, part in enumerate(parts):
      tensor(part.bias).write(split[i])

  return {
    "attn.qkv.weight": Entry((3 * dim, dim), write_weight),
    "attn.qkv.bias": Entry((3 * dim,), write_bias),
  }


def _proj(out) -> dict[str, Entry]:
  """timm's (dim, dim) output projection as Flax's (heads, head_dim, dim) kernel."""
  heads, head_dim, dim = out.kernel.shape
  return {
    "attn.proj.weight": Entry(
      (dim, dim), lambda w: tensor(out.kernel).write(w.T.reshape(heads, head_dim, dim))
    ),
    "attn.proj.bias": tensor(out.bias),
  }


def _positions(positions) -> Entry:
  """pos_embed (1, 1 + g*g, dim) of any square grid g, resampled to the model's grid."""
  _, tokens, dim = positions.shape
  grid = math.isqrt(tokens - 1)

  def fits(shape):
    return len(shape) == 3 and shape[0] == 1 and shape[2] == dim and _is_square(shape[1] - 1)

  def write(p):
    tensor(positions).write(resample_positions(p, grid))

  return Entry(tuple(positions.shape), write, fits=fits)


def entries(net: ViT) -> dict[str, Entry]:
  """The state dict names of `net` as timm writes them."""
  found = {
    "patch_embed.proj.weight": conv_kernel(net.patch.kernel),
    "patch_embed.proj.bias": tensor(net.patch.bias),
    "cls_token": tensor(net.cls_token),
    "pos_embed": _positions(net.positions),
  }
  for n, block in enumerate(net.blocks):
    named = {
      **_layer_norm("norm1", block.ln1),
      **_qkv(block.attention),
      **_proj(block.attention.out),
      **_layer_norm("norm2", block.ln2),
      "mlp.fc1.weight": linear_kernel(block.mlp_in.kernel),
      "mlp.fc1.bias": tensor(block.mlp_in.bias),
      "mlp.fc2.weight": linear_kernel(block.mlp_out.kernel),
      "mlp.fc2.bias": tensor(block.mlp_out.bias),
    }
    found.update({f"blocks.{n}.{name}": entry for name, entry in named.items()})
  found.update(_layer_norm("norm", net.ln))
  found["head.weight"] = linear_kernel(net.head.kernel, head=True)
  found["head.bias"] = tensor(net.head.bias, head=True)
  return found


def _is_square(n: int) -> bool:
  return n > 0 and math.isqrt(n) ** 2 == n


def resample_positions(positions: np.ndarray, grid: int) -> np.ndarray:
  """Position embeddings (1, 1 + g*g, dim) -> (1, 1 + grid*grid, dim), the class token's kept.

  As timm's resample_abs_pos_embed: PyTorch's bicubic interpolation with antialiasing
  (F.interpolate(mode="bicubic", antialias=True), the filter of Pillow) on the g x g grid.
  """
  old = math.isqrt(positions.shape[1] - 1)
  if old == grid:
    return positions
  weights = _antialiased_bicubic(old, grid)  # (grid, old)
  patches = positions[0, 1:].astype(np.float64).reshape(old, old, -1)
  resized = np.einsum("ia,jb,abd->ijd", weights, weights, patches)
  return np.concatenate(
    [positions[:, :1], resized.reshape(1, grid * grid, -1).astype(positions.dtype)], axis=1
  )


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  """Keys' cubic convolution kernel; a = -0.5 in PyTorch's antialiased mode and in Pillow."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _antialiased_bicubic(size_in: int, size_out: int) -> np.ndarray:
  """The (size_out, size_in) matrix of PyTorch's antialiased bicubic resize along one axis
  (aten/src/ATen/native/cpu/UpSampleKernel.cpp, align_corners=False): the kernel widened by
  the scale when shrinking, cut at the edges, each row normalised to sum to one."""
  scale = size_in / size_out
  support = 2.0 * max(scale, 1.0)
  inv_scale = 1.0 / max(scale, 1.0)
  matrix = np.zeros((size_out, size_in))
  for i in range(size_out):
    center = scale * (i + 0.5)
    first = max(int(center - support + 0.5), 0)
    last = min(int(center + support + 0.5), size_in)
    taps = np.arange(first, last)
    w = _bicubic((taps - center + 0.5) * inv_scale)
    matrix[i, taps] = w / w.sum()
  return matrix
