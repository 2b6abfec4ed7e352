"""The backward pass that captures every example's layer inputs and output gradients.

`batched_pass`: the whole batch at once. It applies when every recorded layer call
is batched along axis 0 (a call on N examples has the shapes of the one-example
call with 1 replaced by N) and every leftover parameter meets the batch by
broadcasting (`taps`). `vmapped_pass`: otherwise, each example runs as a batch
of one under `jax.vmap(jax.grad)`, the leftovers as extra arguments; XLA still
sees one batched program, but every layer runs on batches of one.

Both return `Captured` laid out alike: a leading example axis, then the arrays of
the example as a batch of one.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lplgrad_jax.pergrad import taps
from lplgrad_jax.pergrad.capture import Recorder
from lplgrad_jax.pergrad.plan import Plan


class Captured(NamedTuple):
  layer_inputs: list  # per recorded call, its array arguments, each (N, 1, ...)
  output_grads: list  # per recorded call, (N, 1, ...) d loss_i / d output
  leftover_grads: list  # per leftover parameter, (N, *shape)


def _split_leftovers(model: nnx.Module, plan: Plan):
  leftover_paths = plan.leftover_paths
  is_leftover = lambda path, node: isinstance(node, nnx.Param) and path in leftover_paths
  return nnx.split(model, is_leftover, ...)


def _zeros(shapes) -> list[jax.Array]:
  return [jnp.zeros(s.shape, s.dtype) for s in shapes]


def vmapped_pass(model: nnx.Module, plan: Plan, inputs, example_loss) -> Captured:
  """Each example as a batch of one: `example_loss(model, x)` is one example's loss."""
  graphdef, leftover, rest = _split_leftovers(model, plan)

  def example(perturbations, left, x):
    m = nnx.merge(graphdef, left, rest)
    with Recorder(m, perturbations).recording() as recorder:
      loss = example_loss(m, x)
    return loss, recorder.arrays

  zeros = _zeros(c.out_shape for c in plan.calls)
  (out_grads, left_grads), arrays = jax.vmap(
    jax.grad(example, argnums=(0, 1), has_aux=True), in_axes=(None, None, 0)
  )(zeros, leftover, inputs)
  return Captured(arrays, out_grads, jax.tree.leaves(left_grads))


def _batched_output_shapes(model: nnx.Module, plan: Plan, inputs):
  """The recorded calls' output shapes on the whole batch, or None where a call is not
  the one-example call batched along axis 0."""
  n = inputs.shape[0]
  recorder = Recorder(model)

  def trace():
    with recorder.recording():
      model(inputs)

  jax.eval_shape(trace)
  if len(recorder.calls) != len(plan.calls):
    return None
  for one, many, arrays in zip(plan.calls, recorder.calls, recorder.arrays):
    if (
      one.out_shape.shape[:1] != (1,)
      or many.out_shape.shape != (n,) + one.out_shape.shape[1:]
      or any(a.shape[:1] != (n,) for a in arrays)
    ):
      return None
  return [c.out_shape for c in recorder.calls]


def batched_pass(model: nnx.Module, plan: Plan, inputs, loss_fn) -> Captured | None:
  """The whole batch at once (`loss_fn(outputs) -> (N,)` losses), or None."""
  out_shapes = _batched_output_shapes(model, plan, inputs)
  if out_shapes is None:
    return None
  graphdef, leftover, rest = _split_leftovers(model, plan)
  left_values, left_tree = jax.tree.flatten(leftover)

  def total(perturbations, values, x):
    m = nnx.merge(graphdef, jax.tree.unflatten(left_tree, values), rest)
    with Recorder(m, perturbations).recording() as recorder:
      loss = jnp.sum(loss_fn(m(x)))
    return loss, recorder.arrays

  zeros = _zeros(out_shapes)
  if left_values:
    grads = taps.batched_grads(total, zeros, left_values, inputs)
    if grads is None:
      return None
    out_grads, arrays, left_grads = grads
  else:
    out_grads, arrays = jax.grad(total, has_aux=True)(zeros, [], inputs)
    left_grads = []
  as_batches_of_one = lambda tree: jax.tree.map(lambda a: jnp.expand_dims(a, 1), tree)
  return Captured(as_batches_of_one(arrays), as_batches_of_one(out_grads), left_grads)
