"""Squared norms of per-example gradients kept in factored form (the ghost norm).

For one example, a dense or convolution kernel's gradient is a sum over the
example's tokens t (positions, sequence steps) of outer products,
  G = sum_t a_t g_t^T = A^T G_out,   A: (T, p) layer inputs, G_out: (T, o) output grads
(for a convolution, p spans the kernel's offsets: a_t is the patch under offset k).
Its squared Frobenius norm can be computed two ways:
  direct:  ||A^T G_out||^2, forming the p x o matrix: T p o multiply-adds;
  ghost:   <A A^T, G_out G_out^T>, two T x T Gram matrices: T^2 (p + o).
Li, Tramèr, Liang, Hashimoto, "Large language models can be strong differentially
private learners" (ICLR 2022) introduced the ghost form for sequences; Bu, Wang,
Zha, Karypis, "Differentially private optimization on large model at small cost"
(BK, ICML 2023) choose per layer whichever is cheaper, as `gram_is_cheaper` does.
For a convolution the direct form is taken offset by offset: the offsets partition
the kernel's entries, so ||G||^2 = sum_k ||A_k^T G_out||^2 and no patch matrix is
built (Rochette, Manoel, Tramel, "Efficient per-example gradient computations in
convolutional neural networks", 2019, build the same sums as one convolution).

An embedding's gradient is sum_t e_{id_t} g_t^T: its squared norm is
sum_{t,s} [id_t = id_s] g_t . g_s, without the table-sized matrix.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class Outer:
  """A kernel's per-example gradient sum_k sum_t a_{k,t} g_t^T, kept factored.

  `shifted`: per kernel offset k, the (T, groups, p) inputs it sees; `grads`:
  (T, groups, o) output gradients; `shape`: the kernel's.
  """

  shifted: list[jax.Array]
  grads: jax.Array
  shape: tuple


@dataclasses.dataclass
class Lookup:
  """An embedding table's per-example gradient sum_t e_{ids_t} grads_t^T, kept factored."""

  ids: jax.Array  # (T,)
  grads: jax.Array  # (T, D)
  shape: tuple


def gram_is_cheaper(tokens: int, inputs: int, outputs: int) -> bool:
  """Whether a kernel's per-example squared norm costs less as the Gram form <A A^T, G G^T>
  (tokens^2 (inputs + outputs)) than from its products A^T G (tokens inputs outputs)."""
  return tokens * inputs * outputs > tokens * tokens * (inputs + outputs)


_dot = functools.partial(
  jnp.einsum, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
)


def squared_norm(parts: list) -> jax.Array:
  """||sum of the parts||^2 for one parameter tensor of one example.

  Several parts: the calls of one layer (shared or tied weights); their tokens are
  concatenated, which sums their gradients before the norm.
  """
  if all(isinstance(p, Outer) for p in parts):
    return _outer_squared_norm(parts)
  if all(isinstance(p, Lookup) for p in parts):
    ids = jnp.concatenate([p.ids for p in parts])
    g = jnp.concatenate([p.grads for p in parts]).astype(jnp.float32)
    return jnp.sum((ids[:, None] == ids[None, :]) * _dot("td,sd->ts", g, g))
  return jnp.sum(jnp.square(sum(_materialise(p) for p in parts)))


def _outer_squared_norm(parts: list[Outer]) -> jax.Array:
  shifted = [jnp.concatenate(s) for s in zip(*(p.shifted for p in parts))]
  g = jnp.concatenate([p.grads for p in parts])
  t, groups, o = g.shape
  p_size = shifted[0].shape[-1] * len(shifted)
  # Without feature groups the group axis is dropped: a batch axis between the token and
  # feature axes costs a transpose of every operand (measured 1.5x slower on CPU).
  if groups == 1:
    shifted, g = [a[:, 0] for a in shifted], g[:, 0]
  spec = (lambda s: s.format("g")) if groups > 1 else (lambda s: s.format(""))
  if not gram_is_cheaper(t, p_size, o):
    return sum(jnp.sum(jnp.square(_dot(spec("t{0}p,t{0}o->{0}po"), a, g))) for a in shifted)
  u = jnp.concatenate(shifted, axis=-1)
  gram = spec("t{0}p,s{0}p->{0}ts")
  return jnp.sum(_dot(gram, u, u) * _dot(gram, g, g))


def _materialise(part) -> jax.Array:
  """The part as the parameter's full (float32) per-example gradient."""
  if isinstance(part, Outer):
    per_offset = [
      jnp.einsum("tgp,tgo->pgo", a, part.grads, preferred_element_type=jnp.float32)
      for a in part.shifted
    ]
    return jnp.stack([k.reshape(k.shape[0], -1) for k in per_offset]).reshape(part.shape)
  if isinstance(part, Lookup):
    return jnp.zeros(part.shape, jnp.float32).at[part.ids].add(part.grads.astype(jnp.float32))
  return part.astype(jnp.float32)
