"""A small Vision Transformer returning `(logits, block outputs)`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lplgrad_jax.errors import ConfigError
from lplgrad_jax.models.layers import at_least_float32


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
