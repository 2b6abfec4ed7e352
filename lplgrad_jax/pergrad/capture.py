"""Capturing each layer call's input, and the gradient at its output.

The per-example gradient of a layer's parameters is a function of two things per
example: what the layer read (its input a) and the gradient of the example's loss
with respect to what it wrote (g = d loss_i / d out). Opacus gets them from
PyTorch's forward and backward hooks; JAX has no hooks, so this module records the
input while the model runs and obtains g as a gradient with respect to a
perturbation: each recorded call's output becomes `out + e` with e = 0, and
d(sum_i loss_i)/d e is g, row by row, for every example at once (the examples do
not interact). Goodfellow, "Efficient per-example gradient computations" (2015).

The layers are recorded through `layer_hooks.intercept`, on the instances of the
traced model only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lplgrad_jax import layer_hooks

# The layer classes whose calls are recorded (their subclasses too). Each has a rule in
# `layer_rules`: a closed form, or its own vjp per example.
RECORDED = (
  nnx.Conv,
  nnx.Linear,
  nnx.LinearGeneral,
  nnx.Einsum,
  nnx.Embed,
  nnx.BatchNorm,
  nnx.LayerNorm,
  nnx.GroupNorm,
  nnx.RMSNorm,
)
Path = tuple


@dataclasses.dataclass
class LayerCall:
  """One recorded layer call: which layer, the function it ran, its non-array arguments."""

  module_path: Path
  function: Callable  # the `__call__` the layer's class runs
  layer_class: str
  args_tree: Any  # treedef of (args, kwargs)
  static_leaves: tuple  # the non-array leaves (None, flags), in order; arrays are None
  out_shape: jax.ShapeDtypeStruct

  def arguments(self, arrays) -> tuple[tuple, dict]:
    """(args, kwargs) of the call, from its recorded arrays."""
    leaves = iter(arrays)
    return jax.tree.unflatten(
      self.args_tree, [next(leaves) if s is None else s for s in self.static_leaves]
    )


class Recorder:
  """Records the calls of one model's layers during one trace.

  `perturbations`: added to the calls' outputs in order (the pass that yields g).
  `shadow`: each call runs with its layer's own parameters zeroed, so that any
  use of them left in the traced program is a use outside the layer's call.
  """

  def __init__(self, model: nnx.Module, perturbations: Iterable | None = None, shadow=False):
    self.model = model
    self.module_paths = {id(node): path for path, node in module_items(model)}
    self.perturbations = None if perturbations is None else iter(perturbations)
    self.shadow = shadow
    self.calls: list[LayerCall] = []
    self.arrays: list[list[jax.Array]] = []  # per call, its array arguments
    self._inside = False

  def _hook(self, layer, call, args, kwargs):
    if self._inside:  # a recorded layer's own internals are not recorded again
      return call(*args, **kwargs)
    self._inside = True
    try:
      with zeroed_params(layer) if self.shadow else contextlib.nullcontext():
        out = call(*args, **kwargs)
    finally:
      self._inside = False
    leaves, tree = jax.tree.flatten((args, kwargs))
    is_array = [isinstance(x, (jax.Array, np.ndarray)) for x in leaves]
    cls = layer_hooks.unhooked_class(layer)
    self.calls.append(
      LayerCall(
        self.module_paths.get(id(layer)),
        cls.__call__,
        cls.__name__,
        tree,
        tuple(None if a else x for a, x in zip(is_array, leaves)),
        jax.ShapeDtypeStruct(out.shape, out.dtype),
      )
    )
    self.arrays.append([x for a, x in zip(is_array, leaves) if a])
    if self.perturbations is not None:
      out = out + next(self.perturbations)
    return out

  @contextlib.contextmanager
  def recording(self):
    with layer_hooks.intercept(self.model, RECORDED, self._hook):
      yield self


def module_items(model: nnx.Module):
  """(path, module) of every module of `model`, itself included."""
  return ((path, node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module))


def own_params(module: nnx.Module) -> dict[str, nnx.Param]:
  """The parameters held by `module` itself (not by its submodules), by attribute name."""
  return {name: value for name, value in vars(module).items() if isinstance(value, nnx.Param)}


@contextlib.contextmanager
def zeroed_params(module: nnx.Module):
  saved = [(var, var[...]) for var in own_params(module).values()]
  try:
    for var, value in saved:
      var[...] = jnp.zeros(value.shape, value.dtype)
    yield
  finally:
    for var, value in saved:
      var[...] = value
