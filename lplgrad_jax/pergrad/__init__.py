"""Exact per-example gradient norms of any Flax NNX model, from one batched backward pass.

`per_example_grad_norms(model, loss_fn, inputs)` returns, for every example i, the
norm of d loss_i / d params over all `nnx.Param`s of `model`. The model needs no
changes: its layers are recorded from outside. The steps, one module each:

  capture      While the model runs, each call of a standard layer (Conv, Linear,
               BatchNorm, ...) records its input a; the gradient with respect to a
               zero added to its output gives each example's output gradient g.
  plan         One example traced with those calls' parameters zeroed tells which
               parameters the calls account for; the rest are "leftovers".
  passes       One backward pass captures a and g for the whole batch (or, where a
               layer or leftover does not allow it, the per-example vmap pass).
  layer_rules  From a and g, each layer's per-example parameter gradient, factored.
  ghost_norm   Its squared norm without forming it where that is cheaper.
  taps         Leftovers that meet the batch by broadcasting (a class token, a
               position table) get per-example gradients in the batched pass.
  jaxpr_eval   The one adapter to JAX's internals, which `taps` needs.

Requirements: in inference mode (BatchNorm running averages, dropout off: see
`inference_view`), each example's loss depends on that example alone, and the
model accepts a batch of one. Leftovers are reported once (`logging`), with their
path, why, and which pass served them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lplgrad_jax.pergrad import capture
from lplgrad_jax.pergrad import ghost_norm
from lplgrad_jax.pergrad import layer_rules
from lplgrad_jax.pergrad import passes
from lplgrad_jax.pergrad.ghost_norm import gram_is_cheaper
from lplgrad_jax.pergrad.plan import Plan
from lplgrad_jax.pergrad.plan import make_plan
from lplgrad_jax.pergrad.plan import param_paths
from lplgrad_jax.pergrad.plan import report

__all__ = [
  "REDUCTIONS",
  "Plan",
  "example_loss",
  "gram_is_cheaper",
  "inference_view",
  "make_plan",
  "map_in_steps",
  "norms_from_captured",
  "per_example_grad_norms",
  "reduce",
  "report",
  "squared_norms",
]

REDUCTIONS = ("layer_sum", "frobenius")
# Examples per step of the CPU's loop in `norms_from_captured`: of 1, 2, 4 and 8, two gave the
# fastest whole query (experiments/results/query_steps_intel.md).
CPU_EXAMPLES_PER_STEP = 2


def inference_view(model: nnx.Module) -> nnx.Module:
  """`model` with BatchNorm running averages and dropout off (shares its arrays)."""
  return nnx.view(model, use_running_average=True, deterministic=True, raise_if_not_found=False)


def example_loss(loss_fn: Callable) -> Callable:
  """(model, x) -> the scalar loss of one example x, from `loss_fn(outputs) -> (N,)`."""

  def apply(model, x):
    return loss_fn(model(x[None]))[0]

  return apply


def squared_norms(graphdef, params, rest, inputs, loss_fn: Callable) -> jax.Array:
  """(N, K) per-example squared gradient norms of the K parameter tensors (traceable).

  `loss_fn(outputs) -> (N,)` per-example losses of the model's outputs.
  """
  plan = make_plan(graphdef, params, rest, inputs[0], example_loss(loss_fn))
  model = nnx.merge(graphdef, params, rest)
  captured = passes.batched_pass(model, plan, inputs, loss_fn)
  report(plan, batched=captured is not None)
  if captured is None:
    captured = passes.vmapped_pass(model, plan, inputs, example_loss(loss_fn))
  return norms_from_captured(model, plan, captured)


def norms_from_captured(model: nnx.Module, plan: Plan, captured: passes.Captured) -> jax.Array:
  """(N, K) squared norms: the layer rules on each example's captured arrays, summed per
  parameter over its layer's calls, then the leftovers' directly taken gradients."""
  modules = dict(capture.module_items(model))
  paths = param_paths(model)

  def example_norms(layer_inputs, output_grads, leftover_grads):
    parts: dict[tuple, list] = {}
    for call, arrays, g in zip(plan.calls, layer_inputs, output_grads):
      module = modules[call.module_path]
      args, kwargs = call.arguments(arrays)
      rule = layer_rules.closed_form(module, call.function, args, kwargs, g)
      if rule is None:
        rule = layer_rules.local_rule(module, call.function, args, kwargs, g)
      own = capture.own_params(module)
      for name, part in rule.items():
        path = paths[id(own[name])]
        if path in plan.tapped:
          parts.setdefault(path, []).append(part)
    norms = [ghost_norm.squared_norm(p) for p in parts.values()]
    norms += [jnp.sum(jnp.square(v.astype(jnp.float32))) for v in leftover_grads]
    return jnp.stack(norms) if norms else jnp.zeros((0,), jnp.float32)

  def batch_norms(arrays):
    return jax.vmap(example_norms)(*arrays)

  def in_small_steps(arrays):
    return map_in_steps(lambda a: example_norms(*a), arrays, CPU_EXAMPLES_PER_STEP)

  # XLA:CPU runs these small per-example products and Grams faster a few examples at a time
  # than as batched dots over the whole batch (experiments/results/query_grid_intel.md);
  # accelerators take the whole batch. Both branches are traced, one is compiled.
  return jax.lax.platform_dependent(tuple(captured), cpu=in_small_steps, default=batch_norms)


def map_in_steps(fn: Callable, arrays, steps: int) -> jax.Array:
  """`fn` over the examples of `arrays` (a pytree, examples on the leading axis), `steps`
  at a time (`jax.lax.map`). The last step is padded with copies of the last example: for a
  remainder lax.map would compile a second copy of `fn` (1.5x the query's compile time at 3
  examples a chunk)."""
  n = jax.tree.leaves(arrays)[0].shape[0]
  pad = -n % steps
  arrays = jax.tree.map(lambda a: jnp.concatenate([a] + [a[-1:]] * pad), arrays)
  return jax.lax.map(fn, arrays, batch_size=steps)[:n]


def reduce(squared, reduction: str):
  """(N, K) squared tensor norms -> (N,): "layer_sum" (sum of norms) or "frobenius".
  A NumPy array is reduced by NumPy, in its own dtype (the query's, on the host)."""
  xp = np if isinstance(squared, np.ndarray) else jnp
  if reduction == "layer_sum":
    return xp.sum(xp.sqrt(squared), axis=1)
  return xp.sqrt(xp.sum(squared, axis=1))


def per_example_grad_norms(
  model: nnx.Module, loss_fn: Callable, inputs, *, reduction: str = "layer_sum"
) -> jax.Array:
  """||d loss_fn(model(x))_i / d params|| for every example i of `inputs`, exactly.

  Args:
    model: any nnx.Module; evaluated in inference mode (`inference_view`), not changed.
    loss_fn: maps the model's output for a batch to (N,) per-example losses.
    inputs: (N, ...) array; examples must not interact.
    reduction: "layer_sum" (sum over parameter tensors of each tensor's L2 norm) or
      "frobenius" (the global L2 norm).
  For repeated calls on one model, jit `squared_norms` over (params, rest, inputs) instead.
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"unknown reduction {reduction!r}: expected one of {REDUCTIONS}")
  graphdef, params, rest = nnx.split(inference_view(model), nnx.Param, ...)
  return _jitted_norms(graphdef, loss_fn, reduction)(params, rest, jnp.asarray(inputs))


@functools.lru_cache(maxsize=32)
def _jitted_norms(graphdef, loss_fn, reduction):
  return jax.jit(
    lambda params, rest, inputs: reduce(
      squared_norms(graphdef, params, rest, inputs, loss_fn), reduction
    )
  )
