"""Vision Transformers returning `(logits, block outputs)`: a small one for 32x32 images, and
ViT-S/16 and ViT-B/16 laid out as timm's, which load timm's weights (lplgrad_jax.pretrained)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lplgrad_jax.errors import ConfigError
from lplgrad_jax.models.layers import at_least_float32


class ViTBlock(nnx.Module):
  """Pre-LayerNorm transformer block: multi-head self-attention and a GELU MLP.

  LayerNorm epsilon 1e-6 (Flax's default and timm's). `exact_gelu`: erf GELU as timm and
  PyTorch's nn.GELU; otherwise the tanh approximation, Flax's default.
  """

  def __init__(self, dim: int, heads: int, *, mlp_ratio: float, exact_gelu: bool, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    hidden = int(dim * mlp_ratio)
    self.mlp_in = nnx.Linear(dim, hidden, rngs=rngs)
    self.mlp_out = nnx.Linear(hidden, dim, rngs=rngs)
    self.exact_gelu = exact_gelu

  def __call__(self, x):
    x = x + self.attention(self.ln1(x))
    hidden = nnx.gelu(self.mlp_in(self.ln2(x)), approximate=not self.exact_gelu)
    return x + self.mlp_out(hidden)


class ViT(nnx.Module):
  """A Vision Transformer: patch-embedding conv, class token, learned positions, pre-LayerNorm
  blocks, a final LayerNorm and a linear head on the class token (timm's layout)."""

  def __init__(
    self,
    num_classes: int,
    *,
    width: int = 64,
    depth: int = 6,
    heads: int = 4,
    patch: int = 4,
    mlp_ratio: float = 2.0,
    exact_gelu: bool = False,
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
    self.blocks = nnx.List(
      [
        ViTBlock(width, heads, mlp_ratio=mlp_ratio, exact_gelu=exact_gelu, rngs=rngs)
        for _ in range(depth)
      ]
    )
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


# timm's vit_small_patch16_224 and vit_base_patch16_224 (Dosovitskiy et al. 2021; Touvron et
# al. 2021): the geometry their weights need, at any image size that 16 divides.
_TIMM_LAYOUT = {"patch": 16, "mlp_ratio": 4.0, "exact_gelu": True}
VIT_PRESETS = {
  "vit_s16": {"width": 384, "depth": 12, "heads": 6, **_TIMM_LAYOUT},
  "vit_b16": {"width": 768, "depth": 12, "heads": 12, **_TIMM_LAYOUT},
}
