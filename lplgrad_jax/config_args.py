"""The --config argument checked before absl reads it: the file loads, every override names a key.

absl's `config_flags` reports a config file that fails to load, or an override of a key
the config lacks, in messages written for developers (a nested traceback, a lookup
error). `check` loads the same file the same way first and raises one `ConfigError`
naming the file and line, or the key and the closest existing one, from typed
information only: the exception, its traceback's frames, the config's keys.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
import traceback

import ml_collections

from lplgrad_jax.errors import ConfigError

_FLAGS = ("--config", "-config")
_OVERRIDES = ("config.", "noconfig.")  # --config.train.epochs=3, --noconfig.data.download
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def check(argv: list[str], typed: list[str]) -> None:
  """Loads the config of `argv` (--config resolved) and checks its overrides' keys.

  `typed`: the arguments as the user typed them, to name the config in messages.
  """
  for i, arg in enumerate(argv):
    flag, eq, value = arg.partition("=")
    if flag in _FLAGS:
      if not eq:
        if i + 1 >= len(argv):
          return  # absl reports the missing value
        value, shown = argv[i + 1], typed[i + 1]
      else:
        shown = typed[i].partition("=")[2]
      config = load(value, shown)
      for key in _override_keys(argv):
        check_key(config, key)
      return


def load(value: str, shown: str) -> ml_collections.ConfigDict:
  """`get_config([argument])` of the file `value` = `path[:argument]`, as config_flags calls it."""
  path, _, argument = value.partition(":")
  spec = importlib.util.spec_from_file_location("lplgrad_jax_checked_config", path)
  if spec is None:
    raise ConfigError(f"--config={shown}: {path!r} is not a Python file: expected a config .py")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"config file {e.filename}, line {e.lineno}: SyntaxError: {e.msg}") from None
  except Exception as e:  # noqa: BLE001 - whatever the config file raises is the file's
    raise _file_error(e, shown) from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigError(f"--config={shown}: {path} defines no get_config(): expected one")
  if argument and not inspect.signature(get_config).parameters:
    raise ConfigError(
      f"--config={shown}: this config takes no ':budget' suffix: expected --config=<file>.py alone"
    )
  try:
    return get_config(argument) if argument else get_config()
  except Exception as e:  # noqa: BLE001
    raise _file_error(e, shown) from None


def _file_error(error: Exception, shown: str) -> ConfigError:
  """Where a user's config file raised: its file and line; a shipped config's own refusal
  (an unknown budget) needs no location."""
  text = " ".join(str(error).split())
  frame = _config_file_frame(error)
  if frame is None:
    return ConfigError(f"--config={shown}: {type(error).__name__}: {text}")
  return ConfigError(
    f"config file {frame.filename}, line {frame.lineno}: {type(error).__name__}: {text}"
  )


def _config_file_frame(error: Exception):
  """The innermost traceback frame in user code (a config file), not in a library or here."""
  library = (os.path.dirname(os.__file__), _PACKAGE)
  frames = [
    f
    for f in traceback.extract_tb(error.__traceback__)
    if not f.filename.startswith(("<", *library)) and "-packages" + os.sep not in f.filename
  ]
  return frames[-1] if frames else None


def _override_keys(argv: list[str]):
  for arg in argv:
    if arg == "--":
      return
    if not arg.startswith("-"):
      continue
    name = arg.lstrip("-").partition("=")[0]
    for prefix in _OVERRIDES:
      if name.startswith(prefix):
        yield name[len(prefix) :]


def check_key(config: ml_collections.ConfigDict, key: str) -> None:
  """Raises a ConfigError naming the first part of the dotted `key` that `config` lacks."""
  node, walked = config, []
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      same = [k for k in keys if k.casefold() == part.casefold()]
      close = same or difflib.get_close_matches(part, keys, n=1)
      hint = f" (did you mean {'.'.join([*walked, close[0]])!r}?)" if close else ""
      raise ConfigError(
        f"unknown configuration key {'.'.join([*walked, part])!r}{hint}: "
        "see configs/default.py for the keys"
      )
    walked.append(part)
    node = node[part]
