"""A user's model `net(x) -> (logits, features)` adapted to the campaign's `(x, mask=None)` call."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lplgrad_jax import layer_hooks
from lplgrad_jax.errors import ConfigError


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


def inner_model(classifier: nnx.Module) -> nnx.Module:
  """The model a `Backbone` adapts (a ViT's, a user's), or `classifier` itself."""
  return classifier.net if isinstance(classifier, Backbone) else classifier


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
