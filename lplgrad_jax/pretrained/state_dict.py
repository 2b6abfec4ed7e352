"""Matching a PyTorch state dict to a model, strictly.

An architecture's naming (torchvision_resnet, timm_vit) lists, per tensor name of the file,
an `Entry`: the shape the model needs, in PyTorch's layout, and how the tensor is written into
the model's variable. `load_entries` loads all or nothing: every missing, unexpected or
mis-shaped name goes into one error. The classifier head alone may be absent from the file
or sized for another class count; it then keeps its random initialisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lplgrad_jax.errors import ConfigError

# Bookkeeping of PyTorch modules, not weights.
_IGNORED_SUFFIXES = (".num_batches_tracked",)
_NAMES_SHOWN = 6


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor of the file: the shape the model needs (PyTorch layout) and its writer."""

  shape: tuple[int, ...]
  write: Callable[[np.ndarray], None]
  head: bool = False  # the classifier's: kept at its random init when absent or re-sized
  fits: Callable[[tuple[int, ...]], bool] | None = None  # other shapes `write` adapts


def _set(variable: nnx.Variable, value: np.ndarray) -> None:
  variable.set_value(jnp.asarray(value, variable.dtype))


def tensor(variable: nnx.Variable, *, head: bool = False) -> Entry:
  """A tensor stored as the model holds it (biases, BatchNorm and LayerNorm vectors)."""
  return Entry(tuple(variable.shape), lambda a: _set(variable, a), head=head)


def conv_kernel(variable: nnx.Variable) -> Entry:
  """PyTorch's (out, in, h, w) convolution weight as Flax's (h, w, in, out) kernel."""
  h, w, cin, cout = variable.shape
  return Entry((cout, cin, h, w), lambda a: _set(variable, a.transpose(2, 3, 1, 0)))


def linear_kernel(variable: nnx.Variable, *, head: bool = False) -> Entry:
  """PyTorch's (out, in) linear weight as Flax's (in, out) kernel."""
  return Entry(tuple(variable.shape[::-1]), lambda a: _set(variable, a.T), head=head)


@dataclasses.dataclass(frozen=True)
class Loaded:
  """What `load_entries` wrote: the tensor count, and why the head kept its init ("" if not)."""

  tensors: int
  head_kept: str


def load_entries(
  entries: dict[str, Entry], arrays: dict[str, np.ndarray], source: str, hint: str = ""
) -> Loaded:
  """Writes `arrays` into the model through `entries`, or raises one ConfigError naming every
  name that is missing, unexpected or mis-shaped (`source`: the file; `hint`: what to try)."""
  missing = [n for n, e in entries.items() if n not in arrays and not e.head]
  unexpected = [n for n in arrays if n not in entries and not n.endswith(_IGNORED_SUFFIXES)]
  misshaped = [
    f"{n} {tuple(arrays[n].shape)} (expected {e.shape})"
    for n, e in entries.items()
    if n in arrays and not e.head and not _fits(e, arrays[n])
  ]
  head = {n: e for n, e in entries.items() if e.head}
  head_kept = _head_kept(head, arrays, missing, misshaped)
  problems = [
    f"{label} {len(names)}: {_some(names)}"
    for label, names in (
      ("missing", missing),
      ("unexpected", unexpected),
      ("mis-shaped", misshaped),
    )
    if names
  ]
  if problems:
    raise ConfigError(
      f"model.pretrained={source!r} does not fit the model: {'; '.join(problems)}"
      + (f" ({hint})" if hint else "")
    )
  written = [n for n, e in entries.items() if n in arrays and not (e.head and head_kept)]
  for name in written:
    entries[name].write(np.asarray(arrays[name]))
  return Loaded(len(written), head_kept)


def _fits(entry: Entry, array: np.ndarray) -> bool:
  shape = tuple(array.shape)
  return shape == entry.shape or (entry.fits is not None and entry.fits(shape))


def _head_kept(head: dict[str, Entry], arrays, missing: list, misshaped: list) -> str:
  """Why the head keeps its random init ("" when the file's head is loaded); adds a partial or
  mis-shaped head to `missing` / `misshaped`."""
  present = [n for n in head if n in arrays]
  if not present:
    return "the file has no classifier head"
  if len(present) < len(head):
    missing.extend(n for n in head if n not in arrays)
    return ""
  # Other classes: the first (output) axis differs, the rest fit.
  if all(_fits(e, arrays[n]) for n, e in head.items()):
    return ""
  if all(arrays[n].shape[1:] == e.shape[1:] for n, e in head.items()):
    classes = {int(arrays[n].shape[0]) for n in head}
    return f"the file's head has {', '.join(map(str, sorted(classes)))} classes"
  misshaped.extend(
    f"{n} {tuple(arrays[n].shape)} (expected {e.shape})"
    for n, e in head.items()
    if not _fits(e, arrays[n])
  )
  return ""


def _some(names: list[str]) -> str:
  shown = ", ".join(names[:_NAMES_SHOWN])
  return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")
