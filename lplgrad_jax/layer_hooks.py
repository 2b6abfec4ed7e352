"""Intercepting the calls of chosen layers of one model, and of no other.

`intercept(model, classes, hook)`: while the context is open, each call
`layer(*args, **kwargs)` of a layer of `model` that is an instance of `classes`
runs `hook(layer, call, args, kwargs)` instead, where `call(*args, **kwargs)`
runs the layer as it would have run (or the next hook out, when hooks nest).

How: for the duration, each such instance is given a subclass of its own class
whose only change is `__call__`. Flax's classes, other instances, other models
and other threads are untouched, so two traces at once, or a model that hooks
its own layers (`models.Backbone`'s masked BatchNorm) inside a traced scorer
(`pergrad`), cannot meet each other's hooks.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from flax import nnx

# hook(layer, call, args, kwargs) -> the layer's output
Hook = Callable[[nnx.Module, Callable, tuple, dict], Any]

_HOOKED_CLASSES: dict[type, type] = {}  # class -> its hooked subclass, made once per class
_HOOKS: dict[int, list[Hook]] = {}  # id(layer) -> its open hooks, innermost last
_LOCK = threading.Lock()


def _run(layer, unhooked: type, depth: int, args, kwargs):
  hooks = _HOOKS.get(id(layer), ())
  if depth < 0 or depth >= len(hooks):
    return unhooked.__call__(layer, *args, **kwargs)
  call = lambda *a, **k: _run(layer, unhooked, depth - 1, a, k)
  return hooks[depth](layer, call, args, kwargs)


def _hooked_class(cls: type) -> type:
  with _LOCK:
    if cls not in _HOOKED_CLASSES:

      def __call__(self, *args, **kwargs):
        return _run(self, cls, len(_HOOKS.get(id(self), ())) - 1, args, kwargs)

      # Made once per class: each Flax Module subclass registers itself as a pytree type.
      _HOOKED_CLASSES[cls] = type(
        cls.__name__,
        (cls,),
        {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__},
      )
    return _HOOKED_CLASSES[cls]


def unhooked_class(layer: nnx.Module) -> type:
  """The class `layer` had before any hook: the class whose `__call__` it runs."""
  cls = type(layer)
  return cls.__mro__[1] if cls in _HOOKED_CLASSES.values() else cls


def _set_class(layer, cls: type) -> None:
  # Past Flax's __setattr__, which refuses changes to a module made outside the current trace:
  # the class is not state, and the change is undone before the context exits.
  object.__setattr__(layer, "__class__", cls)


@contextlib.contextmanager
def intercept(model: nnx.Module, classes: tuple[type, ...], hook: Hook):
  """Routes the calls of every layer of `model` that is an instance of `classes` to `hook`."""
  layers = [node for _, node in nnx.iter_graph(model) if isinstance(node, classes)]
  for layer in layers:
    stack = _HOOKS.setdefault(id(layer), [])
    if not stack:
      _set_class(layer, _hooked_class(type(layer)))
    stack.append(hook)
  try:
    yield
  finally:
    for layer in layers:
      stack = _HOOKS[id(layer)]
      stack.pop()
      if not stack:
        del _HOOKS[id(layer)]
        _set_class(layer, type(layer).__mro__[1])
