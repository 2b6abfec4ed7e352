"""Runs an LPLgrad active-learning campaign (installed as the `lplgrad-jax` command).

  python -m lplgrad_jax.main --config=configs/cifar100.py
  lplgrad-jax --config=cifar10:low --config.seed=1           # a shipped config, by name
  python -m lplgrad_jax.main --config=my_config.py --workdir=/tmp/mine

Without --workdir a run goes to runs/<config name>[_<budget>]/<strategy>/seed<seed> under the
current directory (see launch.default_workdir): the same command resumes the same campaign.
"""

import os
import shlex
import sys
import traceback

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from lplgrad_jax import campaign
from lplgrad_jax import cli
from lplgrad_jax import distributed
from lplgrad_jax import errors
from lplgrad_jax import launch
from lplgrad_jax.errors import ConfigError

_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Directory for results, plots, logs and checkpoints (default: "
  "runs/<config name>[_<budget>]/<strategy>/seed<seed>). Rerunning a command resumes it.",
)
_RESTART = flags.DEFINE_bool(
  "restart",
  False,
  "Discard the campaign already in --workdir (checkpoints and results) and start over.",
)
_COMPILATION_CACHE = flags.DEFINE_bool(
  "compilation_cache",
  True,
  "Keep compiled XLA programs in .jax_cache beside the workdir, so that a rerun, a resume or "
  "another seed starts without compiling (JAX_COMPILATION_CACHE_DIR, if set, is used instead).",
)
_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Campaign configuration: a file (configs/cifar100.py) or the name of a shipped "
  "one (cifar100), optionally with :<budget> (cifar10:low).",
  lock_config=True,
)
flags.mark_flags_as_required(["config"])
_config_name = None  # of --config, set by _parse_flags: it names the default workdir


def _fail(error: Exception) -> None:
  """Reports a user mistake as `error:` line(s) on stderr and exits with status 2."""
  text = " ".join(str(error).split())
  if isinstance(error, SyntaxError):  # a config file that does not parse
    errors.exit_with(
      ConfigError(f"config file {error.filename}, line {error.lineno}: SyntaxError: {error.msg}")
    )
  frame = _config_file_frame(error)
  if frame is not None:  # raised by the config file's own code
    errors.exit_with(
      ConfigError(
        f"config file {frame.filename}, line {frame.lineno}: {type(error).__name__}: {text}"
      )
    )
  if "get_config() takes 0 positional arguments" in text:  # --config=file.py:budget
    errors.exit_with(
      ConfigError(
        f"{text.split(': Error whilst')[0]}: this config takes no "
        "':budget' suffix: expected --config=<file>.py alone"
      )
    )
  if isinstance(error, (AttributeError, KeyError)):  # --config.<key> the config lacks
    errors.exit_with(
      ConfigError(
        f"unknown configuration key {_unknown_key(error)}: see configs/default.py for the keys"
      )
    )
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if len(lines) > 1 and ("Traceback" in lines[1] or "Attempted" in lines[1]):
    # A config file that failed to load: keep the flag and the final cause.
    errors.exit_with(ConfigError(f"{lines[0].split(': Error whilst')[0]}: {lines[-1]}"))
  errors.exit_with(error)


def _parse_flags(argv):
  global _config_name
  try:
    resolved, _config_name = launch.rewrite_config_argv(argv)
  except ConfigError as e:
    _fail(e)
  try:
    return flags.FLAGS(resolved)
  except Exception as e:  # noqa: BLE001 - an error while the config file loads is the file's
    if not isinstance(e, (AttributeError, KeyError)):
      for typed, used in zip(argv, resolved):  # name the config as the user did
        if typed != used:
          e = ConfigError(
            str(e).replace(used.partition("=")[2] or used, typed.partition("=")[2] or typed)
          )
    _fail(e)


def _start(config, workdir: str) -> None:
  """Starts the devices and prints the run's first line (and a CPU-only warning, if due)."""
  distributed.initialize(config.distributed)  # before anything touches a device
  backend = jax.default_backend()
  if _COMPILATION_CACHE.value:  # before anything compiles
    launch.enable_compilation_cache(workdir, backend)
  distributed.say(launch.first_line(config, workdir, distributed.device_summary()))
  # On stdout beside the first line: stderr stays for errors (an offline run prints one alone).
  warning = launch.accelerator_warning(config, backend)
  if warning:
    distributed.say(warning)


def _unknown_key(error: Exception) -> str:
  """The key ml_collections could not find, quoted once, with its "did you mean" hint."""
  message = str(error.args[0]) if error.args else str(error)
  lines = [line.strip() for line in message.splitlines() if line.strip()] or ["?"]
  if "Attempting to lookup:" in lines[0]:
    return repr(lines[0].rsplit("Attempting to lookup:", 1)[1].strip())
  key = repr(lines[0].strip("\"' "))
  hint = " ".join(lines[1:])
  return f"{key} ({hint[0].lower()}{hint[1:]})" if hint else key


def _config_file_frame(error: Exception):
  """The innermost traceback frame in user code (the config files), not in a library."""
  library = (os.path.dirname(os.__file__), os.path.dirname(os.path.abspath(__file__)))
  frames = [
    f
    for f in traceback.extract_tb(error.__traceback__)
    if not f.filename.startswith(("<", *library)) and "-packages" + os.sep not in f.filename
  ]
  return frames[-1] if frames else None


def main(argv):
  cli.start(argv)
  try:
    config = _CONFIG.value
    config.to_dict()  # config_flags loads lazily: a broken config file raises here
  except Exception as e:  # noqa: BLE001 - whatever the config file raises is the file's
    _fail(e)
  workdir = _WORKDIR.value or launch.default_workdir(_config_name, config)
  try:
    _start(config, workdir)
    results = campaign.run(config, workdir, restart=_RESTART.value)
  except ConfigError as e:
    _fail(e)
  except errors.Diverged as e:
    errors.exit_with(e)  # status 3
  if "awaiting_labels" in results:
    again = [a for a in sys.argv[1:] if not a.startswith(("--restart", "-restart"))]
    distributed.say(f"continue with: python -m lplgrad_jax.main {shlex.join(again)}")


def run() -> None:
  """The `lplgrad-jax` console script: the same as `python -m lplgrad_jax.main`."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
