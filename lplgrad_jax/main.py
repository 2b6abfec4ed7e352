"""Runs an LPLgrad active-learning campaign.

  python -m lplgrad_jax.main --config=configs/cifar10.py --workdir=/tmp/cifar10
  python -m lplgrad_jax.main --config=configs/cifar10.py:low --workdir=... --config.seed=1
"""

import shlex
import sys

from absl import flags
from ml_collections import config_flags

from lplgrad_jax import campaign
from lplgrad_jax import cli
from lplgrad_jax import distributed
from lplgrad_jax import errors
from lplgrad_jax.errors import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, plots, logs and "
                                "checkpoints. Rerunning a command resumes its campaign.")
_RESTART = flags.DEFINE_bool("restart", False, "Discard the campaign already in --workdir "
                             "(checkpoints and results) and start over.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Campaign configuration file.",
                                          lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def _fail(error: Exception) -> None:
  """Reports a user mistake as `error:` line(s) on stderr and exits with status 2."""
  if isinstance(error, (AttributeError, KeyError)):  # --config.<key> the config lacks
    key = str(error).strip("\"'")
    message = f"unknown configuration key {key!r}: see configs/default.py for the keys"
    errors.exit_with(ConfigError(message))
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if len(lines) > 1 and ("Traceback" in lines[1] or "Attempted" in lines[1]):
    # A config file that failed to load: keep the flag and the final cause.
    errors.exit_with(ConfigError(f"{lines[0].split(': Error whilst')[0]}: {lines[-1]}"))
  errors.exit_with(error)


def main(argv):
  cli.start(argv)
  try:
    config = _CONFIG.value
    config.to_dict()  # config_flags loads lazily: a broken config file raises here
  except OSError as e:
    _fail(e)
  try:
    results = campaign.run(config, _WORKDIR.value, restart=_RESTART.value)
  except ConfigError as e:
    _fail(e)
  if "awaiting_labels" in results:
    again = [a for a in sys.argv[1:] if not a.startswith(("--restart", "-restart"))]
    distributed.say(f"continue with: python -m lplgrad_jax.main {shlex.join(again)}")


if __name__ == "__main__":
  cli.run(main, report=_fail, parse_errors=(flags.Error, AttributeError, KeyError, OSError,
                                            TypeError, ValueError))
