"""Exact per-example gradient norms of any Flax NNX model, from one batched backward pass.

`per_example_grad_norms(model, loss_fn, inputs)` returns, for every example i,
the norm of d loss_i / d params over all `nnx.Param`s of `model`, with no
cooperation from the model: its layers are intercepted from outside.

How. While the model is traced, the `__call__` of the standard layer classes
(`INTERCEPTED`) is replaced (`_intercept`) by a wrapper that records the layer's
input and adds a zero perturbation to its output. One batched backward pass of
sum_i loss_i with respect to those perturbations gives, row by row, each
example's output gradient g of every layer call (`_batched_grads`). Where that
cannot be used (some leftover parameters below, or a layer call not batched along
axis 0), the model runs on each example as a batch of one under
`jax.vmap(jax.grad)` (`_vmapped_grads`): XLA still sees one batched pass.
From the layer's input a and g, each parameter tensor's per-example gradient
norm has a closed form, computed without materialising what costs more:
  Linear, LinearGeneral  kernel sum_t a_t g_t^T over the tokens t of the example:
                         directly (T p o) or as the Gram form
                         <A A^T, G G^T> (T^2 (p + o)), whichever is cheaper;
                         bias sum_t g_t
  Conv (any rank, stride, padding, dilation, feature groups)  the same per kernel
                         offset, on strided slices of the padded input (no
                         patch matrix), per feature group
  Embed                  sum_{t,s} [id_t = id_s] g_t.g_s
  other intercepted layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm, Einsum,
                         unusual Conv / Linear settings)  the layer's own vjp
                         for its parameters alone, per example
A layer called several times (shared or tied weights) gets the norm of its summed
per-example gradient: the calls' tokens are concatenated (or per-example grads
summed) before the norm.

Every other parameter, and every parameter that is also read outside its layer's
call (found in the jaxpr, `make_plan`), is a "leftover": its per-example gradient
is taken directly. Where each use of a leftover meets the batch by broadcasting
(a class token broadcast to the batch, positions added to the tokens, a custom
layer's scale or shift: `_find_taps` reads the batched pass's jaxpr), a zero
perturbation of that use's output gives it row by row in the batched pass.
Otherwise the leftover is an extra argument of the vmapped pass. Either way it
costs its own size per example and no second pass. Leftovers are reported once
(`logging`), with their path, why, and which pass served them.

Requirements: in inference mode (BatchNorm running averages, dropout off: see
`inference_view`), each example's loss depends on that example alone, and the
model accepts a batch of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import linear as nnx_linear
from jax.extend import core as jex_core

REDUCTIONS = ("layer_sum", "frobenius")
INTERCEPTED = (
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
_ORIGINAL_CALLS = {cls: cls.__call__ for cls in INTERCEPTED}
_LOCK = threading.RLock()
_STATE = threading.local()
_REPORTED: set[tuple[str, bool]] = set()
Path = tuple


def inference_view(model: nnx.Module) -> nnx.Module:
  """`model` with BatchNorm running averages and dropout off (shares its arrays)."""
  return nnx.view(model, use_running_average=True, deterministic=True, raise_if_not_found=False)


# ---------------------------------------------------------------------------------------------
# Interception


@dataclasses.dataclass
class _Call:
  """One intercepted layer call: which layer, which class's call ran, its static arguments."""

  module_path: Path
  base: type
  args_tree: Any  # treedef of (args, kwargs)
  static_leaves: tuple  # the non-array leaves (None, flags), in order; arrays are None
  out_shape: jax.ShapeDtypeStruct


class _Recorder:
  """Collects calls during one trace; `perturbations` (or shadowing) applied to outputs."""

  def __init__(self, model: nnx.Module, perturbations=None, shadow: bool = False):
    self.module_paths = {
      id(node): path for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)
    }
    self.perturbations = None if perturbations is None else iter(perturbations)
    self.shadow = shadow
    self.calls: list[_Call] = []
    self.arrays: list[list[jax.Array]] = []

  def __call__(self, base, module, args, kwargs):
    leaves, tree = jax.tree.flatten((args, kwargs))
    is_array = [isinstance(x, (jax.Array, np.ndarray)) for x in leaves]
    call = _ORIGINAL_CALLS[base]
    if self.shadow:
      # The layer's output no longer reads its parameters: any remaining use in the
      # jaxpr is a use outside the layer's call.
      with _zeroed_params(module):
        out = call(module, *args, **kwargs)
    else:
      out = call(module, *args, **kwargs)
    self.calls.append(
      _Call(
        self.module_paths.get(id(module)),
        base,
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
def _zeroed_params(module):
  saved = [(var, var[...]) for var in _own_params(module).values()]
  try:
    for var, value in saved:
      var[...] = jnp.zeros(value.shape, value.dtype)
    yield
  finally:
    for var, value in saved:
      var[...] = value


def _own_params(module) -> dict[str, nnx.Param]:
  return {name: value for name, value in vars(module).items() if isinstance(value, nnx.Param)}


def _make_wrapper(base):
  original = _ORIGINAL_CALLS[base]

  @functools.wraps(original)
  def wrapper(self, *args, **kwargs):
    recorder = getattr(_STATE, "recorder", None)
    if recorder is None:
      return original(self, *args, **kwargs)
    _STATE.recorder = None  # a layer's own internals are not intercepted again
    try:
      return recorder(base, self, args, kwargs)
    finally:
      _STATE.recorder = recorder

  return wrapper


_WRAPPERS = {cls: _make_wrapper(cls) for cls in INTERCEPTED}


@contextlib.contextmanager
def _intercept(recorder: _Recorder):
  """Routes every call of an INTERCEPTED class (and subclasses that inherit it) to `recorder`."""
  with _LOCK:
    for cls, wrapper in _WRAPPERS.items():
      cls.__call__ = wrapper
    _STATE.recorder = recorder
    try:
      yield recorder
    finally:
      _STATE.recorder = None
      for cls, original in _ORIGINAL_CALLS.items():
        cls.__call__ = original


# ---------------------------------------------------------------------------------------------
# The plan: which parameters get closed forms, which are leftovers


@dataclasses.dataclass(frozen=True)
class Plan:
  calls: tuple  # _Call per intercepted layer call, in call order
  tapped: frozenset  # parameter paths whose norms come from the layer calls
  leftovers: tuple  # (path, reason) of the parameters differentiated directly


def _param_paths(model) -> dict[int, Path]:
  return {id(node): path for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)}


def _used_invars(jaxpr) -> set:
  used = set()
  for eqn in jaxpr.eqns:
    used.update(v for v in eqn.invars if not isinstance(v, jex_core.Literal))
  used.update(v for v in jaxpr.outvars if not isinstance(v, jex_core.Literal))
  return used


def make_plan(graphdef, params, rest, example, apply_fn) -> Plan:
  """Traces one example with intercepted layers shadowed to find each parameter's path.

  `apply_fn(model, x)` is the scalar loss of one example `x` (a batch of one).
  """

  def shadowed(p, x):
    model = nnx.merge(graphdef, p, rest)
    with _intercept(_Recorder(model, shadow=True)) as recorder:
      loss = apply_fn(model, x)
    holder["calls"] = recorder.calls
    holder["model"] = model
    return loss

  holder = {}
  closed = jax.make_jaxpr(shadowed)(params, example)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  used = _used_invars(closed.jaxpr)
  used_outside = {i for i, v in enumerate(closed.jaxpr.invars[: len(flat)]) if v in used}
  paths = [path for path, _ in nnx.to_flat_state(params)]
  model, calls = holder["model"], holder["calls"]
  modules = dict(_modules(model))
  owner = {}
  for call in calls:
    layer = modules[call.module_path]
    ids = _param_paths(model)
    for var in _own_params(layer).values():
      owner[ids[id(var)]] = (call.module_path, type(layer).__name__)
  tapped, leftovers = set(), []
  for i, path in enumerate(paths):
    if path in owner and i not in used_outside:
      tapped.add(path)
    elif path in owner:
      leftovers.append((path, f"also read outside its {owner[path][1]} call"))
    else:
      leftovers.append((path, _leftover_reason(model, path)))
  return Plan(tuple(calls), frozenset(tapped), tuple(leftovers))


def _leftover_reason(model, path) -> str:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if parent is model or not isinstance(parent, nnx.Module):
    return "raw nnx.Param"
  if isinstance(parent, INTERCEPTED):
    return f"its {type(parent).__name__} layer is never called"
  return f"unsupported layer {type(parent).__name__}"


def _modules(model):
  return ((path, node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module))


_LOG = logging.getLogger(__name__)


def report(plan: Plan, batched: bool, log: logging.Logger = _LOG) -> None:
  """Logs the leftover parameters, and which pass served them, once per distinct set."""
  if not plan.leftovers:
    return
  text = "; ".join(f"{'/'.join(map(str, path))} ({reason})" for path, reason in plan.leftovers)
  how = (
    "in the batched pass, where they meet the batch by broadcasting"
    if batched
    else "per example: the whole model runs as batches of one (vmap), slower"
  )
  if (text, batched) not in _REPORTED:
    _REPORTED.add((text, batched))
    log.warning(
      "per-example gradients taken directly (no closed form) for %d parameter tensor(s), %s: %s",
      len(plan.leftovers),
      how,
      text,
    )


# ---------------------------------------------------------------------------------------------
# Per-layer contributions (for one example) and their squared norms


@dataclasses.dataclass
class _Outer:
  """Per-example kernel gradient sum_t sum_k a_k,t g_t^T, kept factored.

  `shifted`: per kernel offset k, (T, groups, p) inputs; `grads`: (T, groups, o).
  """

  shifted: list
  grads: jax.Array
  shape: tuple


@dataclasses.dataclass
class _Lookup:
  ids: jax.Array  # (T,)
  grads: jax.Array  # (T, D)
  shape: tuple


def _dense_rule(module, x, g, axes):
  """Linear / LinearGeneral: tokens are the non-contracted axes."""
  axes = tuple(a % x.ndim for a in axes)
  x = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
  p = math.prod(x.shape[x.ndim - len(axes) :])
  a = x.reshape(-1, 1, p).astype(g.dtype)
  g = g.reshape(a.shape[0], 1, -1)
  out = {"kernel": _Outer([a], g, module.kernel.shape)}
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


def _conv_rule(module, x, g):
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
  out = {"kernel": _Outer(shifted, grads, module.kernel.shape)}
  if module.bias is not None:
    out["bias"] = jnp.sum(g.reshape(-1, g.shape[-1]).astype(jnp.float32), axis=0)
  return out


def _batch_norm_rule(module, x, g):
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


def _plain_args(args, kwargs) -> bool:
  return len(args) == 1 and all(v is None for v in kwargs.values())


def _closed_form(module, base, args, kwargs, g):
  """Factored per-example gradients of `module`'s parameters, or None (then `_local_rule`)."""
  if not _plain_args(args, kwargs):
    return None
  x = args[0]
  if base is nnx.Linear and module.dot_general is jax.lax.dot_general:
    return _dense_rule(module, x, g, (-1,))
  if (
    base is nnx.LinearGeneral
    and not module.batch_axis
    and module.dot_general is None
    and module.dot_general_cls is None
  ):
    return _dense_rule(
      module, x, g, module.axis if isinstance(module.axis, tuple) else (module.axis,)
    )
  if (
    base is nnx.Conv
    and module.mask is None
    and module.conv_general_dilated is jax.lax.conv_general_dilated
    and all(d == 1 for d in np.atleast_1d(module.input_dilation or 1))
  ):
    return _conv_rule(module, x, g)
  if (
    base is nnx.BatchNorm
    and module.use_running_average
    and module.axis in (-1, x.ndim - 1)
    and module.axis_name is None
  ):
    return _batch_norm_rule(module, x, g)
  if base is nnx.Embed and module.num_embeddings > 1:
    return {"embedding": _Lookup(x.reshape(-1), g.reshape(-1, g.shape[-1]), module.embedding.shape)}
  return None


def _local_rule(module, base, args, kwargs, g):
  """Per-example gradients of the layer's own parameters through its vjp (one example)."""
  graphdef, own, rest = nnx.split(module, _is_own_param, ...)

  def apply(values):
    return _ORIGINAL_CALLS[base](nnx.merge(graphdef, values, rest), *args, **kwargs)

  _, vjp = jax.vjp(apply, own)
  (grads,) = vjp(g)
  return {path[0]: value[...] for path, value in nnx.to_flat_state(grads)}


def _is_own_param(path, node) -> bool:
  return isinstance(node, nnx.Param) and len(path) == 1


def _materialise(part) -> jax.Array:
  if isinstance(part, _Outer):
    per_offset = [
      jnp.einsum("tgp,tgo->pgo", a, part.grads, preferred_element_type=jnp.float32)
      for a in part.shifted
    ]
    return jnp.stack([k.reshape(k.shape[0], -1) for k in per_offset]).reshape(part.shape)
  if isinstance(part, _Lookup):
    return jnp.zeros(part.shape, jnp.float32).at[part.ids].add(part.grads.astype(jnp.float32))
  return part.astype(jnp.float32)


def gram_is_cheaper(tokens: int, inputs: int, outputs: int) -> bool:
  """Whether a kernel's per-example squared norm costs less as the Gram form <A A^T, G G^T>
  (tokens^2 (inputs + outputs)) than from its products A^T G (tokens inputs outputs)."""
  return tokens * inputs * outputs > tokens * tokens * (inputs + outputs)


def _squared_norm(parts: list) -> jax.Array:
  """||sum of the parts||^2 for one parameter tensor of one example."""
  dot = functools.partial(
    jnp.einsum, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
  )
  if all(isinstance(p, _Outer) for p in parts):
    shifted = [jnp.concatenate(s) for s in zip(*(p.shifted for p in parts))]
    g = jnp.concatenate([p.grads for p in parts])
    t, groups, o = g.shape
    p_size = shifted[0].shape[-1] * len(shifted)
    # Without feature groups the group axis is dropped: a batch axis between the token and
    # feature axes costs a transpose of every operand (measured 1.5x slower on CPU).
    spec = "t{0}p,t{0}o->{0}po" if groups > 1 else "tp,to->po"
    if groups == 1:
      shifted, g = [a[:, 0] for a in shifted], g[:, 0]
    if not gram_is_cheaper(t, p_size, o):
      # Offsets partition the kernel's entries: a sum over offsets of ||a_k^T g||^2.
      return sum(jnp.sum(jnp.square(dot(spec.format("g"), a, g))) for a in shifted)
    u = jnp.concatenate(shifted, axis=-1)
    gram = "t{0}p,s{0}p->{0}ts" if groups > 1 else "tp,sp->ts"
    return jnp.sum(dot(gram.format("g"), u, u) * dot(gram.format("g"), g, g))
  if all(isinstance(p, _Lookup) for p in parts):
    ids = jnp.concatenate([p.ids for p in parts])
    g = jnp.concatenate([p.grads for p in parts]).astype(jnp.float32)
    return jnp.sum((ids[:, None] == ids[None, :]) * dot("td,sd->ts", g, g))
  return jnp.sum(jnp.square(sum(_materialise(p) for p in parts)))


# ---------------------------------------------------------------------------------------------
# The scorer


def _example_loss(loss_fn):
  def apply(model, x):
    return loss_fn(model(x[None]))[0]

  return apply


def squared_norms(graphdef, params, rest, inputs, loss_fn: Callable) -> jax.Array:
  """(N, K) per-example squared gradient norms of the K parameter tensors (traceable).

  `loss_fn(outputs) -> (N,)` per-example losses of the model's outputs.
  """
  apply = _example_loss(loss_fn)
  plan = make_plan(graphdef, params, rest, inputs[0], apply)
  model = nnx.merge(graphdef, params, rest)
  grads = _batched_grads(model, plan, inputs, loss_fn)
  report(plan, batched=grads is not None)
  if grads is None:
    grads = _vmapped_grads(model, plan, inputs, apply)
  return _norms_from_grads(model, plan, *grads)


def _vmapped_grads(model, plan: Plan, inputs, apply):
  """Each example as a batch of one under vmap(grad): leftovers get per-example gradients."""
  leftover_paths = {path for path, _ in plan.leftovers}
  is_leftover = lambda path, node: isinstance(node, nnx.Param) and path in leftover_paths
  graphdef, leftover, rest = nnx.split(model, is_leftover, ...)

  def example(perturbations, left, x):
    m = nnx.merge(graphdef, left, rest)
    with _intercept(_Recorder(m, perturbations)) as recorder:
      loss = apply(m, x)
    return loss, recorder.arrays

  zeros = [jnp.zeros(c.out_shape.shape, c.out_shape.dtype) for c in plan.calls]
  (out_grads, left_grads), arrays = jax.vmap(
    jax.grad(example, argnums=(0, 1), has_aux=True), in_axes=(None, None, 0)
  )(zeros, leftover, inputs)
  return arrays, out_grads, left_grads


def _batched_grads(model, plan: Plan, inputs, loss_fn):
  """The whole batch at once, when every layer call is batched along axis 0 (else None).

  The gradient of sum_i loss_i with respect to a zero perturbation of a layer's
  output is, row by row, each example's output gradient. Leftover parameters
  take this pass too where each of their uses meets the batch by broadcasting
  (`_find_taps`: a class token, positions added to the tokens, a layer scale);
  otherwise None. Returned as the vmapped pass would: a leading batch axis, then
  the example as a batch of one.
  """
  n = inputs.shape[0]
  leftover_paths = {path for path, _ in plan.leftovers}
  is_leftover = lambda path, node: isinstance(node, nnx.Param) and path in leftover_paths
  graphdef, leftover, rest = nnx.split(model, is_leftover, ...)
  left_values, left_tree = jax.tree.flatten(leftover)

  def total(perturbations, values, x):
    m = nnx.merge(graphdef, jax.tree.unflatten(left_tree, values), rest)
    with _intercept(_Recorder(m, perturbations)) as recorder:
      loss = jnp.sum(loss_fn(m(x)))
    return loss, recorder.arrays

  recorder = _Recorder(model)

  def trace():
    with _intercept(recorder):
      model(inputs)

  jax.eval_shape(trace)
  out_shapes = [c.out_shape for c in recorder.calls]
  if len(out_shapes) != len(plan.calls):
    return None
  for call, out, arr in zip(plan.calls, out_shapes, recorder.arrays):
    if (
      call.out_shape.shape[:1] != (1,)
      or out.shape != (n,) + call.out_shape.shape[1:]
      or any(a.shape[:1] != (n,) for a in arr)
    ):
      return None
  zeros = [jnp.zeros(s.shape, s.dtype) for s in out_shapes]
  expand = lambda tree: jax.tree.map(lambda a: jnp.expand_dims(a, 1), tree)
  if not left_values:
    out_grads, arrays = jax.grad(total, has_aux=True)(zeros, [], inputs)
    return expand(arrays), expand(out_grads), []
  closed, out_shapes = jax.make_jaxpr(total, return_shape=True)(zeros, left_values, inputs)
  # The same trace one example larger tells which values carry the batch axis.
  larger = lambda a: jax.ShapeDtypeStruct((n + 1,) + a.shape[1:], a.dtype)
  closed_larger = jax.make_jaxpr(total)([larger(z) for z in zeros], left_values, larger(inputs))
  first = len(zeros)
  taps = _find_taps(closed.jaxpr, closed_larger.jaxpr, first, len(left_values))
  if taps is None:
    return None

  def tapped(perturbations, tap_perturbations):
    outs, saved = _eval_tapped(
      closed, taps, tap_perturbations, [*perturbations, *left_values, inputs]
    )
    loss, arrays = jax.tree.unflatten(jax.tree.structure(out_shapes), outs)
    return loss, (arrays, saved)

  tap_avals = [closed.jaxpr.eqns[t.eqn].outvars[0].aval for t in taps]
  tap_zeros = [jnp.zeros(a.shape, a.dtype) for a in tap_avals]
  (out_grads, tap_grads), (arrays, saved) = jax.grad(tapped, argnums=(0, 1), has_aux=True)(
    zeros, tap_zeros
  )
  left_grads = [jnp.zeros((n,) + v.shape, jnp.float32) for v in left_values]
  for tap, ct, other in zip(taps, tap_grads, saved):
    left_grads[tap.leftover] += _leftover_grad(
      closed.jaxpr, tap, ct, other, left_values[tap.leftover]
    )
  return expand(arrays), expand(out_grads), left_grads


@dataclasses.dataclass(frozen=True)
class _Tap:
  """Where a leftover parameter meets the batch: the output of equation `eqn`.

  `chain`: the batch-free equations from the parameter to `operand`, the
  equation's input that the parameter reaches. The gradient with respect to a
  zero perturbation of that output holds, row by row, each example's gradient.
  """

  eqn: int
  leftover: int  # its index among the leftovers
  source: int  # its index among the jaxpr's inputs
  chain: tuple
  operand: int


_MEETS_THE_BATCH = ("broadcast_in_dim", "add", "sub", "mul")


def _find_taps(jaxpr, larger, first: int, count: int) -> list[_Tap] | None:
  """The taps of leftover invars first..first+count-1, or None where a use is not a broadcast.

  `larger`: the same function traced one example larger (batched values differ in shape).
  """
  if len(jaxpr.eqns) != len(larger.eqns):
    return None
  derived = {v: (j, ()) for j, v in enumerate(jaxpr.invars[first : first + count])}
  taps = []
  for index, (eqn, twin) in enumerate(zip(jaxpr.eqns, larger.eqns)):
    if eqn.primitive != twin.primitive:
      return None
    ins = [k for k, v in enumerate(eqn.invars) if not isinstance(v, jex_core.Literal)]
    reached = [k for k in ins if eqn.invars[k] in derived]
    if not reached:
      continue
    (j, chain), *others = [derived[eqn.invars[k]] for k in reached]
    if any(o[0] != j for o in others) or len(eqn.outvars) != 1:
      return None  # two leftovers combined, or a multi-output equation
    out, out_larger = eqn.outvars[0].aval.shape, twin.outvars[0].aval.shape
    batched = out != out_larger
    if batched and (out[1:] != out_larger[1:] or out_larger[0] != out[0] + 1):
      return None  # the batch is not (only) the leading axis
    if not batched and len(reached) == len(ins):
      derived[eqn.outvars[0]] = (j, chain + (index,))  # still one tensor for the whole batch
      continue
    operand = reached[0]
    shape = eqn.invars[operand].aval.shape
    if not (
      batched
      and len(reached) == 1
      and eqn.primitive.name in _MEETS_THE_BATCH
      and (eqn.primitive.name == "broadcast_in_dim" or (len(shape) == len(out) and shape[0] == 1))
      and (
        eqn.primitive.name != "broadcast_in_dim"
        or 0 not in eqn.params["broadcast_dimensions"]
        or shape[eqn.params["broadcast_dimensions"].index(0)] == 1
      )
    ):
      return None
    taps.append(_Tap(index, j, first + j, chain, operand))
  if any(v in derived for v in jaxpr.outvars if not isinstance(v, jex_core.Literal)):
    return None
  return taps


def _eval_tapped(closed, taps, tap_perturbations, args):
  """Evaluates `closed` with each tap's perturbation added to its equation's output.

  Also returns, per tap, the other operand of a `mul` (what its gradient needs).
  """
  at = {t.eqn: (t, p) for t, p in zip(taps, tap_perturbations)}
  env = dict(zip(closed.jaxpr.constvars, closed.consts))
  env.update(zip(closed.jaxpr.invars, args))
  saved = {}
  for index, eqn in enumerate(closed.jaxpr.eqns):
    values = [_read(env, v) for v in eqn.invars]
    out = _bind(eqn, values)
    if index in at:
      tap, perturbation = at[index]
      saved[index] = values[1 - tap.operand] if eqn.primitive.name == "mul" else None
      out = out + perturbation
    if eqn.primitive.multiple_results:
      env.update(zip(eqn.outvars, out))
    else:
      env[eqn.outvars[0]] = out
  return [_read(env, v) for v in closed.jaxpr.outvars], [saved[t.eqn] for t in taps]


def _read(env: dict, var):
  return var.val if isinstance(var, jex_core.Literal) else env[var]


def _bind(eqn, values):
  """One jaxpr equation applied to `values` (as `jax.core.eval_jaxpr` applies it)."""
  with eqn.ctx.manager:
    return eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))


def _leftover_grad(jaxpr, tap: _Tap, ct, other, value) -> jax.Array:
  """(N, *value.shape) per-example gradients of one leftover through one tap.

  `ct`: (N, ...) the gradient with respect to the tap's perturbation; `other`:
  the other operand of a `mul` tap.
  """
  eqn = jaxpr.eqns[tap.eqn]
  operand = eqn.invars[tap.operand].aval
  if eqn.primitive.name == "broadcast_in_dim":
    # The same broadcast to a batch of one, transposed per example.
    params = dict(eqn.params, shape=(1,) + tuple(ct.shape[1:]))
    _, pullback = jax.vjp(
      lambda v: eqn.primitive.bind(v, **params), jnp.zeros(operand.shape, operand.dtype)
    )
    per_example = jax.vmap(lambda c: pullback(c[None].astype(operand.dtype))[0])(ct)
  else:
    ct = ct.astype(jnp.float32)
    if eqn.primitive.name == "mul":
      ct = ct * other.astype(jnp.float32)
    elif eqn.primitive.name == "sub" and tap.operand == 1:
      ct = -ct
    axes = tuple(a for a in range(1, ct.ndim) if operand.shape[a] == 1 and ct.shape[a] != 1)
    per_example = jnp.sum(ct, axis=axes, keepdims=True).reshape((-1,) + operand.shape)
  if tap.chain:
    _, pullback = jax.vjp(functools.partial(_run_chain, jaxpr, tap), value)
    per_example = jax.vmap(lambda c: pullback(c.astype(operand.dtype))[0])(per_example)
  return per_example.astype(jnp.float32)


def _run_chain(jaxpr, tap: _Tap, value):
  """The batch-free equations from a leftover's value to the tap's operand."""
  env = {jaxpr.invars[tap.source]: value}
  for index in tap.chain:
    eqn = jaxpr.eqns[index]
    env[eqn.outvars[0]] = _bind(eqn, [_read(env, v) for v in eqn.invars])
  return env[jaxpr.eqns[tap.eqn].invars[tap.operand]]


def _norms_from_grads(model, plan: Plan, arrays, out_grads, left_grads):
  """(N, K) squared norms from the recorded layer inputs and output gradients."""
  modules = dict(_modules(model))
  param_paths = _param_paths(model)

  def example_norms(arrays_i, grads_i, left_i):
    parts: dict[Path, list] = {}
    for call, arr, g in zip(plan.calls, arrays_i, grads_i):
      module = modules[call.module_path]
      leaves = iter(arr)
      args, kwargs = jax.tree.unflatten(
        call.args_tree, [next(leaves) if s is None else s for s in call.static_leaves]
      )
      rule = _closed_form(module, call.base, args, kwargs, g)
      if rule is None:
        rule = _local_rule(module, call.base, args, kwargs, g)
      own = _own_params(module)
      for name, part in rule.items():
        path = param_paths[id(own[name])]
        if path in plan.tapped:
          parts.setdefault(path, []).append(part)
    norms = [_squared_norm(p) for p in parts.values()]
    norms += [jnp.sum(jnp.square(v.astype(jnp.float32))) for v in jax.tree.leaves(left_i)]
    return jnp.stack(norms) if norms else jnp.zeros((0,), jnp.float32)

  return jax.vmap(example_norms)(arrays, out_grads, left_grads)


def reduce(squared: jax.Array, reduction: str) -> jax.Array:
  """(N, K) squared tensor norms -> (N,): "layer_sum" (sum of norms) or "frobenius"."""
  if reduction == "layer_sum":
    return jnp.sum(jnp.sqrt(squared), axis=1)
  return jnp.sqrt(jnp.sum(squared, axis=1))


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
