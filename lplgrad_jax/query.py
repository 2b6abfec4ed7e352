"""Query scorers: per-image scores computed from the current models.

`entropy_grad_norms` is LPLgrad's score: the entropy H of softmax(main model)
is treated as a loss and each image is scored by the norm of dH/dw over all
main-model parameters, BatchNorm in inference mode (so each image's score
depends on that image alone). Two exact reductions over the parameter tensors
(one tensor per conv kernel, BatchNorm scale, BatchNorm bias, dense kernel,
dense bias, as in the PyTorch model):
  "layer_sum"  sum over tensors of each tensor's L2 norm (the authors' code)
  "frobenius"  the global L2 norm over all parameters (the paper's eq. 8)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from lplgrad_jax.errors import ConfigError

REDUCTIONS = ("layer_sum", "frobenius")


def entropy(logits: jax.Array) -> jax.Array:
  """Predictive entropy of softmax(logits) along the last axis."""
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def reduce_tensor_norms(squared_norms: list[jax.Array], reduction: str) -> jax.Array:
  """Combines per-tensor squared L2 norms (each of shape (N,)) into one score per image."""
  stacked = jnp.stack(squared_norms)
  if reduction == "layer_sum":
    return jnp.sum(jnp.sqrt(stacked), axis=0)
  return jnp.sqrt(jnp.sum(stacked, axis=0))


def _image_entropy(params, graphdef, rest, image):
  model = nnx.merge(graphdef, params, rest)
  logits, _ = model(image[None])
  return entropy(logits[0])


@functools.partial(jax.jit, static_argnames=("graphdef", "reduction"))
def _vmap_grad_scores(graphdef, params, rest, images, mean, std, reduction):
  if images.dtype == jnp.uint8:
    images = (images.astype(jnp.float32) / 255.0 - mean) / std
  grads = jax.vmap(jax.grad(_image_entropy), in_axes=(None, None, None, 0))(
      params, graphdef, rest, images)
  squared = [jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1)
             for g in jax.tree.leaves(grads)]
  return reduce_tensor_norms(squared, reduction)


def _split_for_inference(model: nnx.Module):
  """(graphdef, params, rest) of `model` with BatchNorm in inference mode."""
  return nnx.split(nnx.view(model, use_running_average=True), nnx.Param, ...)


def entropy_grad_norms(model: nnx.Module, images, *, reduction: str = "layer_sum",
                       chunk_size: int = 64, normalization=None,
                       progress: bool = False) -> np.ndarray:
  """One score per image: ||d entropy(softmax(model(x))) / d params||.

  Args:
    model: the main model (`logits, features = model(x)`); it is not changed.
    images: (N, H, W, 3) float32 inputs, or uint8 with `normalization`.
    reduction: "layer_sum" or "frobenius" (see module docstring).
    chunk_size: images per compiled call; bounds memory (the vmap holds
      `chunk_size` copies of the gradient).
    normalization: (mean, std) per channel for uint8 images.
    progress: show a progress bar over chunks.
  """
  if reduction not in REDUCTIONS:
    raise ConfigError(f"unknown gradient-norm reduction {reduction!r}: expected one of {REDUCTIONS}")
  images = np.asarray(images)
  if images.dtype == np.uint8 and normalization is None:
    raise ValueError("uint8 images need normalization=(mean, std)")
  mean, std = (np.zeros(3, np.float32), np.ones(3, np.float32)) if normalization is None \
      else (np.asarray(normalization[0], np.float32), np.asarray(normalization[1], np.float32))
  graphdef, params, rest = _split_for_inference(model)
  n = len(images)
  scores = []
  for start in tqdm(range(0, n, chunk_size), desc="query", unit="chunk",
                    disable=not progress, leave=False):
    chunk = images[start:start + chunk_size]
    real = len(chunk)
    if real < chunk_size:  # pad so every chunk shares one compiled shape
      chunk = np.concatenate([chunk, np.zeros((chunk_size - real,) + chunk.shape[1:], chunk.dtype)])
    scores.append(np.asarray(_vmap_grad_scores(graphdef, params, rest, chunk, mean, std,
                                               reduction))[:real])
  return np.concatenate(scores) if scores else np.zeros((0,), np.float32)
