"""Per-layer rules: one example's parameter gradients from a layer's input a and output
gradient g (`capture`), in a form `ghost_norm` takes the norm of.

  Linear, LinearGeneral    kernel  sum_t a_t g_t^T over the example's tokens t (all
                                   axes but the contracted ones): Outer([a], g)
                           bias    sum_t g_t
  Conv (any rank, stride, kernel   sum_k sum_t a_{k,t} g_t^T, a_{k,t} the input under
    padding, dilation,             kernel offset k at output position t: a strided
    feature groups)                slice of the padded input per offset, per group
                           bias    sum_t g_t
  BatchNorm (inference)    scale   sum_t g_t (x_t - mean) / sqrt(var + eps)
                           bias    sum_t g_t
  Embed                    table   sum_t e_{id_t} g_t^T: Lookup(ids, g)
  any other recorded call  (LayerNorm, GroupNorm, RMSNorm, Einsum, a subclass with its
                           own __call__, an unusual setting): the layer's own vjp for
                           its parameters alone, on the one example (`local_rule`)
Each rule applies only where the layer runs its class's standard `__call__` with one
positional input; its settings are checked in `closed_form`.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import linear as nnx_linear

from lplgrad_jax.pergrad.ghost_norm import Lookup
from lplgrad_jax.pergrad.ghost_norm import Outer


def closed_form(module, function, args, kwargs, g) -> dict | None:
  """{parameter name: its factored gradient} of `module`'s call `function(module, *args,
  **kwargs)` with output gradient `g`, or None where no rule below applies."""
  if len(args) != 1 or any(v is not None for v in kwargs.values()):
    return None
  x = args[0]
  if function is nnx.Linear.__call__ and module.dot_general is jax.lax.dot_general:
    return _dense(module, x, g, (-1,))
  if (
    function is nnx.LinearGeneral.__call__
    and not module.batch_axis
    and module.dot_general is None
    and module.dot_general_cls is None
  ):
    axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    return _dense(module, x, g, axes)
  if (
    function is nnx.Conv.__call__
    and module.mask is None
    and module.conv_general_dilated is jax.lax.conv_general_dilated
    and all(d == 1 for d in np.atleast_1d(module.input_dilation or 1))
  ):
    return _conv(module, x, g)
  if (
    function is nnx.BatchNorm.__call__
    and module.use_running_average
    and module.axis in (-1, x.ndim - 1)
    and module.axis_name is None
  ):
    return _batch_norm(module, x, g)
  if function is nnx.Embed.__call__ and module.num_embeddings > 1:
    return {"embedding": Lookup(x.reshape(-1), g.reshape(-1, g.shape[-1]), module.embedding.shape)}
  return None


def local_rule(module, function, args, kwargs, g) -> dict:
  """The layer's own parameters' gradients through its vjp, for one example."""
  graphdef, own, rest = nnx.split(module, _is_own_param, ...)

  def apply(values):
    return function(nnx.merge(graphdef, values, rest), *args, **kwargs)

  _, vjp = jax.vjp(apply, own)
  (grads,) = vjp(g)
  return {path[0]: value[...] for path, value in nnx.to_flat_state(grads)}


def _is_own_param(path, node) -> bool:
  return isinstance(node, nnx.Param) and len(path) == 1


def _dense(module, x, g, axes):
  """Linear / LinearGeneral: the tokens are the non-contracted axes."""
  axes = tuple(a % x.ndim for a in axes)
  x = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
  p = math.prod(x.shape[x.ndim - len(axes) :])
  a = x.reshape(-1, 1, p).astype(g.dtype)
  g = g.reshape(a.shape[0], 1, -1)
  out = {"kernel": Outer([a], g, module.kernel.shape)}
  if module.bias is not None:
    out["bias"] = jnp.sum(g.astype(jnp.float32), axis=(0, 1)).reshape(module.bias.shape)
  return out


def _conv_padding(module, x, kernel_size, dilation, strides):
  padding = nnx_linear.canonicalize_padding(module.padding, len(kernel_size))
  if padding == "VALID":
    return [(0, 0)] * len(kernel_size)
  if padding == "SAME":
    effective = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    return jax.lax.padtype_to_pads(x.shape[-len(kernel_size) - 1 : -1], effective, strides, "SAME")
  return None if isinstance(padding, str) else [tuple(p) for p in padding]


def _conv(module, x, g):
  """Conv: the input seen by each kernel offset is a strided slice of the padded input.

  Plain slices: `lax.conv_general_dilated_patches` builds the same columns with a
  grouped convolution, which measured 1.7x slower for the whole scorer on CPU.
  """
  rank = len(module.kernel_size)
  broadcast = lambda v: (v or 1,) * rank if v is None or isinstance(v, int) else tuple(v)
  strides, dilation = broadcast(module.strides), broadcast(module.kernel_dilation)
  padding = _conv_padding(module, x, module.kernel_size, dilation, strides)
  if padding is None:
    return None
  x = x.reshape((-1,) + x.shape[-rank - 1 :])
  x = jnp.pad(x, [(0, 0)] + list(padding) + [(0, 0)])
  out_sizes = g.shape[-rank - 1 : -1]
  groups = module.feature_group_count
  shifted = []
  for offset in itertools.product(*(range(k) for k in module.kernel_size)):
    index = tuple(
      slice(o * d, o * d + s * (n - 1) + 1, s)
      for o, d, s, n in zip(offset, dilation, strides, out_sizes)
    )
    shifted.append(
      x[(slice(None),) + index].reshape(-1, groups, x.shape[-1] // groups).astype(g.dtype)
    )
  grads = g.reshape(-1, groups, g.shape[-1] // groups)
  out = {"kernel": Outer(shifted, grads, module.kernel.shape)}
  if module.bias is not None:
    out["bias"] = jnp.sum(g.reshape(-1, g.shape[-1]).astype(jnp.float32), axis=0)
  return out


def _batch_norm(module, x, g):
  """Inference BatchNorm: scale sum_t g_t x_hat_t, bias sum_t g_t."""
  x, g = x.astype(jnp.float32), g.astype(jnp.float32)
  reduce_axes = tuple(range(x.ndim - 1))
  out = {}
  if module.scale is not None:
    x_hat = (x - module.mean[...]) * jax.lax.rsqrt(module.var[...] + module.epsilon)
    out["scale"] = jnp.sum(g * x_hat, axis=reduce_axes)
  if module.bias is not None:
    out["bias"] = jnp.sum(g, axis=reduce_axes)
  return out
