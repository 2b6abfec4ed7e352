"""The plan: which parameters the recorded layer calls account for, and which are leftovers.

A parameter's per-example gradient can be read off its layer's call (`layer_rules`)
only if the call is the parameter's one and only use. To check that, one example
is traced with every recorded call run on its layer's parameters zeroed (the
recorder's "shadow" mode): any parameter the traced program still reads is read
somewhere else as well (an embedding table reused by `attend`, a weight a custom
layer multiplies by hand). Those, and the parameters of layers without a rule,
are leftovers: their per-example gradients are taken directly (`taps`, or the
per-example pass).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
from flax import nnx

from lplgrad_jax.pergrad import capture
from lplgrad_jax.pergrad import jaxpr_eval
from lplgrad_jax.pergrad.capture import Path

_LOG = logging.getLogger("lplgrad_jax.pergrad")
_REPORTED: set[tuple[str, bool]] = set()


@dataclasses.dataclass(frozen=True)
class Plan:
  calls: tuple[capture.LayerCall, ...]  # the recorded layer calls of one example, in order
  tapped: frozenset[Path]  # parameter paths whose norms come from the layer calls
  leftovers: tuple[tuple[Path, str], ...]  # (path, why) of the parameters taken directly

  @property
  def leftover_paths(self) -> set[Path]:
    return {path for path, _ in self.leftovers}


def param_paths(model: nnx.Module) -> dict[int, Path]:
  """id(parameter variable) -> its path in `model`."""
  return {id(node): path for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)}


def make_plan(graphdef, params, rest, example, example_loss) -> Plan:
  """Traces one example with the recorded calls shadowed to sort the parameters.

  `example_loss(model, x)` is the scalar loss of one example `x` (a batch of one).
  """
  calls = []

  def shadowed(p, x):
    model = nnx.merge(graphdef, p, rest)
    with capture.Recorder(model, shadow=True).recording() as recorder:
      loss = example_loss(model, x)
    calls.extend(recorder.calls)  # static descriptions only: no tracer leaves the trace
    return loss

  closed = jax.make_jaxpr(shadowed)(params, example)
  n_params = len(jax.tree.leaves(params))
  used = jaxpr_eval.used_vars(closed.jaxpr)
  read_outside = {i for i, v in enumerate(closed.jaxpr.invars[:n_params]) if v in used}

  model = nnx.merge(graphdef, params, rest)
  modules, ids = dict(capture.module_items(model)), param_paths(model)
  owner = {}  # parameter path -> the class of the layer whose calls use it
  for call in calls:
    for var in capture.own_params(modules[call.module_path]).values():
      owner[ids[id(var)]] = call.layer_class
  tapped, leftovers = set(), []
  for i, (path, _) in enumerate(nnx.to_flat_state(params)):
    if path in owner and i not in read_outside:
      tapped.add(path)
    elif path in owner:
      leftovers.append((path, f"also read outside its {owner[path]} call"))
    else:
      leftovers.append((path, _leftover_reason(model, path)))
  return Plan(tuple(calls), frozenset(tapped), tuple(leftovers))


def _leftover_reason(model, path) -> str:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if parent is model or not isinstance(parent, nnx.Module):
    return "raw nnx.Param"
  if isinstance(parent, capture.RECORDED):
    return f"its {type(parent).__name__} layer is never called"
  return f"unsupported layer {type(parent).__name__}"


def report(plan: Plan, batched: bool, log: logging.Logger = _LOG) -> None:
  """Logs the leftover parameters, and which pass served them, once per distinct set."""
  if not plan.leftovers:
    return
  text = "; ".join(f"{'/'.join(map(str, path))} ({reason})" for path, reason in plan.leftovers)
  if (text, batched) in _REPORTED:
    return
  _REPORTED.add((text, batched))
  how = (
    "in the batched pass, where they meet the batch by broadcasting"
    if batched
    else "per example: the whole model runs as batches of one (vmap), slower"
  )
  log.warning(
    "per-example gradients taken directly (no closed form) for %d parameter tensor(s), %s: %s",
    len(plan.leftovers),
    how,
    text,
  )
