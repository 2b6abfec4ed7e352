"""layer_hooks.intercept: hooks reach the chosen layers of one model, and nothing else."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lplgrad_jax import layer_hooks
from lplgrad_jax import models


class Pair(nnx.Module):
  def __init__(self, rngs):
    self.first = nnx.Linear(2, 2, rngs=rngs)
    self.second = nnx.Linear(2, 2, rngs=rngs)

  def __call__(self, x):
    return self.second(self.first(x))


def _plus(amount):
  def hook(layer, call, args, kwargs):
    return call(*args, **kwargs) + amount

  return hook


X = jnp.array([[1.0, -2.0]])


def test_hooks_reach_only_the_model_they_were_given():
  hooked, other = Pair(nnx.Rngs(0)), Pair(nnx.Rngs(0))
  plain = np.asarray(other(X))
  call_before = nnx.Linear.__call__
  want = np.asarray(other.second(other.first(X) + 1.0) + 1.0)  # both layers add 1 after them
  with layer_hooks.intercept(hooked, (nnx.Linear,), _plus(1.0)):
    np.testing.assert_allclose(hooked(X), want, rtol=1e-6)
    np.testing.assert_array_equal(other(X), plain)  # same class, other instances: untouched
    assert nnx.Linear.__call__ is call_before
  assert type(hooked.first) is nnx.Linear
  np.testing.assert_array_equal(hooked(X), plain)


def test_nested_hooks_see_the_outer_hook_as_the_call():
  model = Pair(nnx.Rngs(1))
  inner = lambda layer, call, args, kwargs: 2.0 * call(*args, **kwargs)
  with layer_hooks.intercept(model.first, (nnx.Linear,), _plus(1.0)):
    with layer_hooks.intercept(model.first, (nnx.Linear,), inner):
      got = model.first(X)
    np.testing.assert_allclose(model.first(X), got / 2.0)
  plain = model.first(X)
  np.testing.assert_allclose(got, 2.0 * (plain + 1.0))


def test_a_hook_held_in_one_thread_does_not_reach_another_model_in_another():
  hooked, other = Pair(nnx.Rngs(2)), Pair(nnx.Rngs(2))
  plain = np.asarray(other(X))
  opened, done = threading.Event(), threading.Event()

  def hold():
    with layer_hooks.intercept(hooked, (nnx.Linear,), _plus(5.0)):
      opened.set()
      done.wait(30)

  thread = threading.Thread(target=hold)
  thread.start()
  try:
    assert opened.wait(30)
    np.testing.assert_array_equal(other(X), plain)
  finally:
    done.set()
    thread.join()


def test_a_subclass_with_its_own_call_is_hooked_at_that_call_under_jit():
  bn = models.BatchNorm(2, unbiased_running_var=True, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(bn)
  seen, after = [], []

  def record(layer, call, args, kwargs):
    seen.append(layer_hooks.unhooked_class(layer))
    return call(*args, **kwargs)

  @jax.jit
  def apply(state, x):
    layer = nnx.merge(graphdef, state)
    with layer_hooks.intercept(layer, (nnx.BatchNorm,), record):
      y = layer(x)
    assert type(layer) is models.BatchNorm
    after.append(nnx.split(layer)[0])
    return y

  y = apply(state, jnp.ones((3, 2)))
  assert seen == [models.BatchNorm] and y.shape == (3, 2)
  assert after == [graphdef]
