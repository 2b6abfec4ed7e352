"""Leftover parameters that meet the batch by broadcasting: per-example gradients in the
batched pass.

A "leftover" is a parameter no recorded layer call accounts for (a class token, a
position table, a custom layer's scale). Its per-example gradient costs its own
size per example, but it still needs the example's share of the backward pass.
Where the parameter meets the batch the way a class token does, `x_i = f(w)
broadcast to every example i`, the gradient with respect to a zero perturbation
e of that broadcast's output is, row by row, d loss_i / d x_i, and
d loss_i / d w = (d f/d w)^T (d loss_i / d x_i): the same "gradient at a
perturbation" trick as the layer calls (`capture`), applied to one equation of
the program instead of one layer.

Finding those equations. A tap is the first equation where a value computed from
the leftover alone (batch-free) meets a value that carries the batch axis. Which
values carry the batch axis is read from shapes: the program is traced twice,
for N and N + 1 examples, and a value carries the batch (in its leading axis)
exactly when its leading dimension grows by one between the two traces. The
equations before the tap (the "chain", e.g. tanh(w), 2 * b) are batch-free and
are differentiated as they are. A tap must be a broadcast, or an elementwise
add / sub / mul of a size-1 leading axis against the batch; any other meeting
(a matmul with the batch, a gather) returns None, and the caller takes the
per-example (vmapped) pass instead.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lplgrad_jax.pergrad import jaxpr_eval

_MEETS_THE_BATCH = ("broadcast_in_dim", "add", "sub", "mul")


@dataclasses.dataclass(frozen=True)
class Tap:
  """Where one leftover meets the batch: the output of equation `eqn`.

  `chain`: the batch-free equations from the leftover to `operand`, the input of
  `eqn` that the leftover reaches.
  """

  eqn: int
  leftover: int  # its index among the leftovers
  source: int  # its index among the jaxpr's inputs
  chain: tuple
  operand: int


def batched_grads(total, zeros: list, left_values: list, inputs):
  """One batched backward pass of `total` with per-example gradients of the leftovers.

  `total(perturbations, left_values, inputs) -> (sum of losses, aux)` adds
  `perturbations` (like `zeros`) to the recorded layer calls' outputs.
  Returns (grads w.r.t. the perturbations, aux, [(N, *value.shape) per leftover]),
  or None where a leftover does not meet the batch by broadcasting.
  """
  n = inputs.shape[0]
  closed, out_shapes = jax.make_jaxpr(total, return_shape=True)(zeros, left_values, inputs)
  larger = lambda a: jax.ShapeDtypeStruct((n + 1,) + a.shape[1:], a.dtype)
  closed_larger = jax.make_jaxpr(total)([larger(z) for z in zeros], left_values, larger(inputs))
  taps = find_taps(closed.jaxpr, closed_larger.jaxpr, len(zeros), len(left_values))
  if taps is None:
    return None
  at = {t.eqn: t for t in taps}
  aux_tree = jax.tree.structure(out_shapes)

  def tapped(perturbations, tap_perturbations):
    by_eqn = dict(zip((t.eqn for t in taps), tap_perturbations))
    saved = {}

    def perturb(index, eqn, values, out):
      if index not in at:
        return out
      # A mul tap's gradient needs the other operand.
      saved[index] = values[1 - at[index].operand] if eqn.primitive.name == "mul" else None
      return out + by_eqn[index]

    outs = jaxpr_eval.eval_jaxpr(closed, [*perturbations, *left_values, inputs], perturb)
    loss, aux = jax.tree.unflatten(aux_tree, outs)
    return loss, (aux, [saved[t.eqn] for t in taps])

  tap_zeros = [
    jnp.zeros(a.shape, a.dtype) for a in (closed.jaxpr.eqns[t.eqn].outvars[0].aval for t in taps)
  ]
  (out_grads, tap_grads), (aux, saved) = jax.grad(tapped, argnums=(0, 1), has_aux=True)(
    zeros, tap_zeros
  )
  left_grads = [jnp.zeros((n,) + v.shape, jnp.float32) for v in left_values]
  for tap, ct, other in zip(taps, tap_grads, saved):
    left_grads[tap.leftover] += _leftover_grad(
      closed.jaxpr, tap, ct, other, left_values[tap.leftover]
    )
  return out_grads, aux, left_grads


def find_taps(jaxpr, larger, first: int, count: int) -> list[Tap] | None:
  """The taps of the leftover inputs first..first+count-1 of `jaxpr`, or None.

  `larger`: the same program traced one example larger.
  """
  if len(jaxpr.eqns) != len(larger.eqns):
    return None
  derived = {v: (j, ()) for j, v in enumerate(jaxpr.invars[first : first + count])}
  taps = []
  for index, (eqn, twin) in enumerate(zip(jaxpr.eqns, larger.eqns)):
    if eqn.primitive != twin.primitive:
      return None
    ins = [k for k, v in enumerate(eqn.invars) if not jaxpr_eval.is_literal(v)]
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
      derived[eqn.outvars[0]] = (j, chain + (index,))  # still batch-free
      continue
    if not (batched and len(reached) == 1 and _broadcasts(eqn, reached[0], out)):
      return None
    taps.append(Tap(index, j, first + j, chain, reached[0]))
  if any(v in derived for v in jaxpr.outvars if not jaxpr_eval.is_literal(v)):
    return None
  return taps


def _broadcasts(eqn, operand: int, out: tuple) -> bool:
  """Whether `eqn` spreads its batch-free input `operand` over the batch (leading) axis."""
  name = eqn.primitive.name
  shape = eqn.invars[operand].aval.shape
  if name not in _MEETS_THE_BATCH:
    return False
  if name != "broadcast_in_dim":
    return len(shape) == len(out) and shape[0] == 1
  dims = eqn.params["broadcast_dimensions"]
  return 0 not in dims or shape[dims.index(0)] == 1


def _leftover_grad(jaxpr, tap: Tap, ct, other, value) -> jax.Array:
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


def _run_chain(jaxpr, tap: Tap, value):
  """The batch-free equations from a leftover's value to the tap's operand."""
  env = {jaxpr.invars[tap.source]: value}
  for index in tap.chain:
    eqn = jaxpr.eqns[index]
    env[eqn.outvars[0]] = jaxpr_eval.bind(eqn, [jaxpr_eval.read(env, v) for v in eqn.invars])
  return env[jaxpr.eqns[tap.eqn].invars[tap.operand]]
