"""Runs an LPLgrad active-learning campaign (installed as the `lplgrad-jax` command).

  python -m lplgrad_jax.main --config=configs/cifar100.py
  lplgrad-jax --config=cifar10:low --config.seed=1           # a shipped config, by name
  python -m lplgrad_jax.main --config=my_config.py --workdir=/tmp/mine

Without --workdir a run goes to runs/<config name>[_<budget>]/<strategy>/seed<seed> under the
current directory (see launch.default_workdir): the same command resumes the same campaign.
"""

import shlex
import sys

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


def _parse_flags(argv):
  global _config_name
  remaining, _config_name = cli.parse_config_flags(argv)
  return remaining


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


def main(argv):
  cli.start(argv)
  config = _CONFIG.value  # loaded before, by config_args.check
  workdir = _WORKDIR.value or launch.default_workdir(_config_name, config)
  try:
    _start(config, workdir)
    results = campaign.run(config, workdir, restart=_RESTART.value)
  except ConfigError as e:
    errors.exit_with(e)
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
