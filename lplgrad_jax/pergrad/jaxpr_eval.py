"""The one place pergrad reads JAX's program representation below its public API.

`taps` evaluates a jaxpr equation by equation so that it can add a perturbation to
one equation's output; JAX has no public interpreter with such a hook. The jaxpr's
structure (`eqns`, `invars`, `outvars`, `primitive`, `params`, `Literal`) is the one
`jax.extend.core` exports; binding an equation as `jax.core.eval_jaxpr` does needs
two internal attributes (`eqn.ctx.manager`, `Primitive.get_bind_params`), used
only here and checked by tests/test_pergrad.py against `jax.core.eval_jaxpr`.
"""

from __future__ import annotations

from jax.extend import core as jex_core


def is_literal(var) -> bool:
  return isinstance(var, jex_core.Literal)


def read(env: dict, var):
  """The value of an equation's input: a literal's own, or the one `env` holds."""
  return var.val if is_literal(var) else env[var]


def bind(eqn, values: list):
  """Applies one jaxpr equation to `values`, as `jax.core.eval_jaxpr` applies it."""
  with eqn.ctx.manager:
    return eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))


def used_vars(jaxpr) -> set:
  """The variables some equation, or the output, reads."""
  used = set()
  for eqn in jaxpr.eqns:
    used.update(v for v in eqn.invars if not is_literal(v))
  used.update(v for v in jaxpr.outvars if not is_literal(v))
  return used


def eval_jaxpr(closed, args: list, after_eqn=None) -> list:
  """Evaluates a closed jaxpr on `args`; `after_eqn(index, eqn, inputs, outputs)`, where
  given, sees each equation's input values and may replace its outputs."""
  env = dict(zip(closed.jaxpr.constvars, closed.consts))
  env.update(zip(closed.jaxpr.invars, args))
  for index, eqn in enumerate(closed.jaxpr.eqns):
    values = [read(env, v) for v in eqn.invars]
    out = bind(eqn, values)
    if after_eqn is not None:
      out = after_eqn(index, eqn, values, out)
    if eqn.primitive.multiple_results:
      env.update(zip(eqn.outvars, out))
    else:
      env[eqn.outvars[0]] = out
  return [read(env, v) for v in closed.jaxpr.outvars]
