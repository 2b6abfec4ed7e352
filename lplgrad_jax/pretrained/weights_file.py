"""Reading a PyTorch state dict from a local file: `.safetensors` or `.npz` with NumPy alone,
`.pth` / `.pt` / `.bin` through PyTorch where it is installed (imported only then)."""

from __future__ import annotations

import functools
import importlib
import os
import zipfile
import zlib

import ml_dtypes
import numpy as np

from lplgrad_jax.errors import ConfigError

NUMPY_SUFFIXES = (".safetensors", ".npz")
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The file's tensors by name; float16 and bfloat16 upcast to float32.

  Cached for the latest file read (by path, size and modification time): a campaign that
  restarts from the weights each round reads them once.
  """
  stat = check_path(path)
  return _read_cached(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


def check_path(path: str) -> os.stat_result:
  """ConfigError unless `path` is an existing file of a known type; its stat otherwise."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in NUMPY_SUFFIXES + TORCH_SUFFIXES:
    raise ConfigError(
      f"model.pretrained={path!r}: unknown file type {suffix!r}: expected one of "
      f"{', '.join(NUMPY_SUFFIXES + TORCH_SUFFIXES)}"
    )
  try:
    stat = os.stat(path)
  except OSError:
    raise ConfigError(f"model.pretrained={path!r}: no such file") from None
  if not os.path.isfile(path):
    raise ConfigError(f"model.pretrained={path!r}: not a file")
  return stat


@functools.lru_cache(maxsize=1)
def _read_cached(path: str, size: int, mtime_ns: int) -> dict[str, np.ndarray]:
  del size, mtime_ns  # the cache key: a file rewritten in place is read again
  suffix = os.path.splitext(path)[1].lower()
  read = {".safetensors": _read_safetensors, ".npz": _read_npz}.get(suffix, _read_torch)
  return {name: _numeric(path, name, a) for name, a in read(path).items()}


def _numeric(path: str, name: str, array) -> np.ndarray:
  """`array` as a number array, float16 and bfloat16 upcast to float32; ConfigError otherwise
  (a zip member that is not an array, NumPy's raw 'V2' bytes of a bfloat16 saved by np.savez)."""
  if isinstance(array, np.ndarray) and array.dtype in _HALF_PRECISION:
    return array.astype(np.float32)
  if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiub":
    kind = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
    raise ConfigError(
      f"model.pretrained={path!r}: tensor {name!r} holds {kind}: expected numbers (float16, "
      "bfloat16 from .safetensors or .pth, float32, float64)"
    )
  return array


_HALF_PRECISION = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  try:
    return load_file(path)
  except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"model.pretrained={path!r}: not a readable safetensors file ({e})") from None


def _read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as archive:
      return {name: archive[name] for name in archive.files}
  except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError) as e:
    raise ConfigError(f"model.pretrained={path!r}: not a readable .npz file ({e})") from None


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    torch = importlib.import_module("torch")
  except (ImportError, OSError):  # not installed, or an installation that cannot load
    raise ConfigError(
      f"model.pretrained={path!r}: reading a PyTorch file needs PyTorch (pip install torch); "
      "or save its state dict as .safetensors (safetensors.torch.save_file)"
    ) from None
  try:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises pickle, zip and runtime errors alike on a bad file
    raise ConfigError(
      f"model.pretrained={path!r}: not a readable PyTorch file ({type(e).__name__}: {e})"
    ) from None
  # Training checkpoints wrap the state dict: {"state_dict": ...} or {"model": ...}.
  for wrapper in ("state_dict", "model"):
    if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
      loaded = loaded[wrapper]
  if not isinstance(loaded, dict) or not all(torch.is_tensor(t) for t in loaded.values()):
    raise ConfigError(
      f"model.pretrained={path!r}: expected a state dict (names -> tensors), "
      f"found {type(loaded).__name__}"
    )
  return {
    name: (t.float() if t.dtype == torch.bfloat16 else t).detach().cpu().numpy()
    for name, t in loaded.items()
  }
