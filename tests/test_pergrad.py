"""pergrad's exact per-example gradient norms against jax.vmap(jax.grad), on models that do
not cooperate: convolutions of every kind, attention, norms, tied layers, raw and custom params."""

import logging
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import built
from conftest import forward
from flax import nnx

from lplgrad_jax import pergrad
from lplgrad_jax import query
from lplgrad_jax.models import ResNet18
from lplgrad_jax.models import ResNet50
from lplgrad_jax.models import ViT
from lplgrad_jax.models import WideResNet
from lplgrad_jax.pergrad import jaxpr_eval
from lplgrad_jax.pergrad import passes


class TinyViT(nnx.Module):
  """Patch-embedding conv, raw class token and positional embedding, pre-LN attention block."""

  def __init__(self, num_classes, *, dim=8, patch=4, size=8, rngs):
    self.patch = nnx.Conv(3, dim, (patch, patch), strides=patch, padding="VALID", rngs=rngs)
    self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, dim)))
    self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, (size // patch) ** 2 + 1, dim)))
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(2, dim, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
    self.mlp2 = nnx.Linear(2 * dim, dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)

  def __call__(self, x):
    y = self.patch(x)
    y = y.reshape(y.shape[0], -1, y.shape[-1])
    cls = jnp.broadcast_to(self.cls_token[...], (y.shape[0], 1, y.shape[-1]))
    y = jnp.concatenate([cls, y], axis=1) + self.pos[...]
    y = y + self.attn(self.ln1(y))
    y = y + self.mlp2(nnx.gelu(self.mlp1(self.ln2(y))))
    return self.head(y[:, 0]), (y,)


class GroupNormCNN(nnx.Module):
  """GroupNorm, a dilated depthwise conv, a grouped 'SAME' conv with bias and stride 2."""

  def __init__(self, num_classes, *, rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
    self.gn = nnx.GroupNorm(8, num_groups=2, rngs=rngs)
    self.depthwise = nnx.Conv(
      8,
      8,
      (3, 3),
      kernel_dilation=2,
      feature_group_count=8,
      padding="SAME",
      use_bias=False,
      rngs=rngs,
    )
    self.grouped = nnx.Conv(
      8, 6, (3, 2), strides=2, feature_group_count=2, padding="SAME", rngs=rngs
    )
    self.head = nnx.Linear(6, num_classes, rngs=rngs)

  def __call__(self, x):
    y = nnx.relu(self.gn(self.stem(x)))
    y = nnx.relu(self.grouped(self.depthwise(y) + y))
    return self.head(jnp.mean(y, axis=(1, 2)))


class TiedMLP(nnx.Module):
  """One hidden layer applied twice (shared weights)."""

  def __init__(self, num_classes, *, rngs):
    self.inp = nnx.Linear(12, 6, rngs=rngs)
    self.hidden = nnx.Linear(6, 6, rngs=rngs)
    self.out = nnx.Linear(6, num_classes, rngs=rngs)

  def __call__(self, x):
    y = nnx.tanh(self.inp(x.reshape(x.shape[0], -1)))
    y = nnx.tanh(self.hidden(y))
    return self.out(nnx.tanh(self.hidden(y)))


class Mix(nnx.Module):
  """A custom layer pergrad has no rule for: a raw weight matrix applied by a matmul."""

  def __init__(self, features, *, rngs):
    noise = jax.random.normal(rngs.params(), (features, features))
    self.w = nnx.Param(jnp.eye(features) + 0.1 * noise)

  def __call__(self, x):
    return x @ self.w[...]


class CustomLayerNet(nnx.Module):
  def __init__(self, num_classes, *, rngs):
    self.dense = nnx.Linear(12, 5, rngs=rngs)
    self.mix = Mix(5, rngs=rngs)
    self.out = nnx.Linear(5, num_classes, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.tanh(self.mix(self.dense(x.reshape(x.shape[0], -1)))))


class Affine(nnx.Module):
  """A custom layer whose raw params meet the batch by broadcasting: x * tanh(w) - 2b."""

  def __init__(self, features, *, rngs):
    self.w = nnx.Param(1.0 + 0.1 * jax.random.normal(rngs.params(), (features,)))
    self.b = nnx.Param(0.1 * jax.random.normal(rngs.params(), (features,)))

  def __call__(self, x):
    return x * jnp.tanh(self.w[...]) - 2.0 * self.b[...]


class AffineNet(nnx.Module):
  """The custom Affine layer applied twice (its params' per-example gradients add up)."""

  def __init__(self, num_classes, *, rngs):
    self.dense = nnx.Linear(12, 5, rngs=rngs)
    self.affine = Affine(5, rngs=rngs)
    self.out = nnx.Linear(5, num_classes, rngs=rngs)

  def __call__(self, x):
    y = self.affine(nnx.relu(self.affine(self.dense(x.reshape(x.shape[0], -1)))))
    return self.out(y)


class TimeMajorNet(nnx.Module):
  """Positions added with the tokens leading and the batch second: the per-example pass."""

  def __init__(self, num_classes, *, rngs):
    self.dense = nnx.Linear(3, 4, rngs=rngs)
    self.pos = nnx.Param(jax.random.normal(rngs.params(), (4, 1, 4)))
    self.out = nnx.Linear(4, num_classes, rngs=rngs)

  def __call__(self, x):
    y = self.dense(x.reshape(x.shape[0], -1, 3))  # (N, 4 tokens, 4)
    y = jnp.swapaxes(jnp.swapaxes(y, 0, 1) + self.pos[...], 0, 1)
    return self.out(jnp.mean(nnx.tanh(y), axis=1))


class TokenNet(nnx.Module):
  """Embed with repeated ids, RMSNorm, LinearGeneral to heads, Einsum, tied output (attend)."""

  def __init__(self, num_classes, *, rngs):
    self.embed = nnx.Embed(7, 6, rngs=rngs)
    self.norm = nnx.RMSNorm(6, rngs=rngs)
    self.heads = nnx.LinearGeneral(6, (2, 3), rngs=rngs)
    self.mix = nnx.Einsum("nthd,hdk->ntk", (2, 3, 6), (6,), rngs=rngs)
    self.out = nnx.Linear(6, num_classes, rngs=rngs)

  def __call__(self, ids):
    y = self.norm(self.embed(ids))
    y = y + self.mix(nnx.relu(self.heads(y)))
    return self.out(jnp.mean(y, axis=1)) + jnp.mean(self.embed.attend(y), axis=(1, 2))[:, None]


def _trained_like(model, x, scale=0.3):
  """Random non-trivial parameters (biases, norm scales) and BatchNorm statistics."""
  graphdef, state = nnx.split(model)
  leaves, tree = jax.tree.flatten(state)
  # NumPy draws and sums: JAX's eager operations compile once per tensor shape (seconds).
  rng = np.random.default_rng(11)
  leaves = [
    jnp.asarray(np.asarray(a) + (scale * rng.standard_normal(a.shape)).astype(a.dtype))
    if jnp.issubdtype(a.dtype, jnp.floating)
    else a
    for a in leaves
  ]
  model = nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))
  if any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_graph(model)):
    # Training mode moves the running statistics.
    forward(model, x)
  return model


def _entropy(outputs):
  return query.output_entropy(outputs)


def _reference(model, x):
  """(layer_sum, frobenius) from per-example jax.grad under vmap, norms in float64."""
  graphdef, params, rest = nnx.split(pergrad.inference_view(model), nnx.Param, ...)
  per_example = jax.grad(lambda p, xi: _entropy(nnx.merge(graphdef, p, rest)(xi[None]))[0])
  grads = jax.jit(jax.vmap(per_example, in_axes=(None, 0)))(params, x)
  squared = np.stack(
    [
      np.sum(np.square(np.asarray(g, np.float64).reshape(len(x), -1)), axis=1)
      for g in jax.tree.leaves(grads)
    ],
    axis=1,
  )
  return np.sum(np.sqrt(squared), axis=1), np.sqrt(np.sum(squared, axis=1))


def _fast(model, x):
  graphdef, params, rest = nnx.split(pergrad.inference_view(model), nnx.Param, ...)
  squared = jax.jit(lambda p, r, x: pergrad.squared_norms(graphdef, p, r, x, _entropy))(
    params, rest, x
  )
  return tuple(np.asarray(pergrad.reduce(squared, r)) for r in pergrad.REDUCTIONS)


def _images(n=3, size=8, seed=7):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


class ShallowResNet18(ResNet18):
  """ResNet-18's blocks (strided, projected), one per stage: the full depth is in test_query."""

  stage_sizes = (1, 1, 1, 1)


CASES = {
  "resnet18": (lambda: built(ShallowResNet18, 5, width=2, seed=0), _images),
  "vit": (lambda: built(TinyViT, 5, seed=1), _images),
  "groupnorm_depthwise": (lambda: built(GroupNormCNN, 5, seed=2), _images),
  "tied_mlp": (lambda: built(TiedMLP, 5, seed=3), lambda: _images(size=2)),
  "custom_layer": (lambda: built(CustomLayerNet, 5, seed=4), lambda: _images(size=2)),
  "affine_twice": (lambda: built(AffineNet, 5, seed=10), lambda: _images(size=2)),
  "time_major": (lambda: built(TimeMajorNet, 5, seed=11), lambda: _images(size=2)),
  "tokens": (
    lambda: built(TokenNet, 5, seed=5),
    lambda: jnp.array([[1, 3, 1, 6], [0, 0, 0, 2], [5, 4, 3, 2]]),
  ),
}


@pytest.mark.parametrize("name", CASES)
def test_fast_norms_equal_vmap_grad(name):
  build, inputs = CASES[name]
  x = inputs()
  model = _trained_like(build(), x)
  fast, ref = _fast(model, x), _reference(model, x)
  for got, want in zip(fast, ref):
    np.testing.assert_allclose(got, want, rtol=1e-4)
  assert np.all(fast[1] < fast[0])


def test_the_whole_batch_route_of_accelerators_equals_the_cpus_steps():
  # CI has only CPUs, which take the norms a few images at a time (a loop); accelerators take
  # the whole batch in one vmap, lax.platform_dependent's default branch, forced here. Five
  # images: the loop's last step is padded (a batch of one is test_query's).
  model = _trained_like(built(ShallowResNet18, 5, width=2, seed=0), _images())
  x = _images(n=5)
  graphdef, params, rest = nnx.split(pergrad.inference_view(model), nnx.Param, ...)

  def loops():  # a new function each time: make_jaxpr reuses the traces of a function
    norms = lambda p, r, x: pergrad.squared_norms(graphdef, p, r, x, _entropy)
    return "scan" in str(jax.make_jaxpr(norms)(params, rest, x))

  whole_batch = lambda *a, default, **_: default(*a)
  with mock.patch.object(jax.lax, "platform_dependent", whole_batch):
    assert not loops()
    whole = _fast(model, x)
  assert loops()
  steps, ref = _fast(model, x), _reference(model, x)
  for got_whole, got_steps, want in zip(whole, steps, ref):
    np.testing.assert_allclose(got_whole, want, rtol=1e-4)
    np.testing.assert_allclose(got_steps, want, rtol=1e-4)


def test_the_cpus_loop_holds_one_copy_of_the_layer_rules_whatever_the_batch():
  # lax.map over steps of CPU_EXAMPLES_PER_STEP examples would add a second copy of the rules
  # for a remainder: a batch with one is padded to whole steps instead.
  model = built(ShallowResNet18, 5, width=2, seed=0)
  graphdef, params, rest = nnx.split(pergrad.inference_view(model), nnx.Param, ...)

  def products(n):  # a new function each time: make_jaxpr reuses the traces of a function
    norms = lambda p, r, x: pergrad.squared_norms(graphdef, p, r, x, _entropy)
    return str(jax.make_jaxpr(norms)(params, rest, _images(n=n))).count("dot_general")

  k = pergrad.CPU_EXAMPLES_PER_STEP
  assert products(2 * k + 1) == products(2 * k) > 0


def _plan(model, x):
  graphdef, params, rest = nnx.split(pergrad.inference_view(model), nnx.Param, ...)
  return pergrad.make_plan(graphdef, params, rest, x[0], lambda m, xi: _entropy(m(xi[None]))[0])


def test_plan_names_each_leftover_and_why():
  x = _images()
  vit = _plan(built(TinyViT, 5, seed=1), x)
  assert dict(vit.leftovers) == {("cls_token",): "raw nnx.Param", ("pos",): "raw nnx.Param"}
  # Attention's four projections and both LayerNorms have closed forms or layer rules.
  assert ("attn", "query", "kernel") in vit.tapped and ("ln2", "scale") in vit.tapped
  custom = _plan(built(CustomLayerNet, 5, seed=4), _images(size=2))
  assert dict(custom.leftovers) == {("mix", "w"): "unsupported layer Mix"}
  tokens = _plan(built(TokenNet, 5, seed=5), jnp.zeros((1, 4), jnp.int32))
  assert dict(tokens.leftovers) == {("embed", "embedding"): "also read outside its Embed call"}
  tied = _plan(built(TiedMLP, 5, seed=3), _images(size=2))
  assert not tied.leftovers
  assert [c.module_path for c in tied.calls] == [("inp",), ("hidden",), ("hidden",), ("out",)]


def test_leftovers_are_reported_once_with_the_pass_they_took(caplog):
  pergrad.plan._REPORTED.clear()
  with caplog.at_level(logging.WARNING, logger="lplgrad_jax.pergrad"):
    for n in (2, 3):  # two compilations, one report per model
      for build in (CustomLayerNet, AffineNet):
        pergrad.per_example_grad_norms(built(build, 5, seed=6), _entropy, _images(n, 2))
  messages = [r.getMessage() for r in caplog.records if "taken directly" in r.getMessage()]
  assert len(messages) == 2, messages
  assert "mix/w (unsupported layer Mix)" in messages[0] and "per example" in messages[0]
  assert "affine/b (unsupported layer Affine); affine/w (unsupported" in messages[1]
  assert "in the batched pass" in messages[1]


def _passes(model, x):
  """(batched or None, vmapped) per-example squared norms of the two passes."""
  graphdef, params, rest = nnx.split(pergrad.inference_view(model), nnx.Param, ...)
  apply = pergrad.example_loss(_entropy)
  plan = pergrad.make_plan(graphdef, params, rest, x[0], apply)
  merged = nnx.merge(graphdef, params, rest)
  batched = passes.batched_pass(merged, plan, x, _entropy)
  vmapped = passes.vmapped_pass(merged, plan, x, apply)
  norms = lambda got: None if got is None else pergrad.norms_from_captured(merged, plan, got)
  return norms(batched), norms(vmapped)


@pytest.mark.parametrize("name", ["vit", "affine_twice", "custom_layer", "tokens", "time_major"])
def test_leftovers_take_the_batched_pass_where_they_meet_the_batch_by_broadcasting(name):
  # A class token (broadcast), positions (add), a layer's scale and shift (mul, sub, with
  # batch-free steps before them) take the batched pass; a raw matmul weight, an embedding
  # also read by `attend` (a gather, a dot) and positions added where the batch is not the
  # leading axis make the whole model take the vmapped one.
  build, inputs = CASES[name]
  x = inputs()
  model = _trained_like(build(), x)
  batched, vmapped = _passes(model, x)
  if name in ("custom_layer", "tokens", "time_major"):
    assert batched is None
  else:
    np.testing.assert_allclose(batched, vmapped, rtol=1e-5)
  # Whichever pass served them, the norms are those of per-example jax.grad.
  squared = np.asarray(vmapped if batched is None else batched, np.float64)
  for got, want in zip(
    (np.sum(np.sqrt(squared), 1), np.sqrt(np.sum(squared, 1))), _reference(model, x)
  ):
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_batched_and_vmapped_passes_agree():
  # No leftovers: one batched pass; forcing the per-example pass gives the same norms.
  batched, vmapped = _passes(_trained_like(built(GroupNormCNN, 5, seed=2), _images()), _images())
  np.testing.assert_allclose(batched, vmapped, rtol=1e-5)


class ShallowResNet50(ResNet50):
  """ResNet-50's bottleneck blocks, one per stage: the rules, at a fraction of the compile."""

  stage_sizes = (1, 1, 1, 1)


BACKBONES = {
  "resnet50_bottleneck": (lambda: built(ShallowResNet50, 5, width=1, seed=7), _images),
  # Smaller perturbations: at 0.3 this stack saturates the softmax (entropy and gradient ~0).
  "wide_resnet": (lambda: built(WideResNet, 5, depth=10, widen=1, seed=8), _images, 0.05),
  "vit_backbone": (
    lambda: built(ViT, 5, width=8, depth=1, heads=2, image_size=8, seed=9),
    _images,
  ),
}


@pytest.mark.parametrize("name", BACKBONES)
def test_backbones_fast_norms_equal_vmap_grad(name):
  build, inputs, *scale = BACKBONES[name]
  x = inputs()
  model = _trained_like(build(), x, *scale)
  fast, ref = _fast(model, x), _reference(model, x)
  assert np.all(ref[0] > 1e-3)  # a non-degenerate case
  for got, want in zip(fast, ref):
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_jaxpr_adapter_evaluates_as_jax_does_and_perturbs_one_equation():
  # jaxpr_eval is pergrad's one use of JAX internals: equations with a custom_jvp (relu), a
  # nested jit, a named scope and several results must bind as jax.core.eval_jaxpr binds them.
  def f(x, w):
    with jax.named_scope("block"):
      y = jax.jit(lambda a: jnp.sort(a, axis=-1))(nnx.relu(x) * w)
    values, indices = jax.lax.top_k(y, 2)
    return jnp.sum(values) + jnp.sum(indices), y * 2.0

  x, w = jnp.array([[0.5, -1.0, 2.0]]), jnp.array([3.0, 1.0, -2.0])
  closed = jax.make_jaxpr(f)(x, w)
  got = jaxpr_eval.eval_jaxpr(closed, [x, w])
  want = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, x, w)
  for g, r, direct in zip(got, want, f(x, w)):
    np.testing.assert_array_equal(g, r)
    np.testing.assert_array_equal(g, direct)
  last = len(closed.jaxpr.eqns) - 1  # y * 2.0
  assert closed.jaxpr.eqns[last].primitive.name == "mul"
  shifted = jaxpr_eval.eval_jaxpr(
    closed, [x, w], lambda i, eqn, values, out: out + 0.5 if i == last else out
  )
  np.testing.assert_array_equal(shifted[1], want[1] + 0.5)
  np.testing.assert_array_equal(shifted[0], want[0])
