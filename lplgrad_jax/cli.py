"""What the command-line programs (main, predict) share: flag parsing and quiet logging."""

from __future__ import annotations

import logging
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging

from lplgrad_jax import config_args
from lplgrad_jax import errors
from lplgrad_jax import launch


def start(argv) -> None:
  """A program's first step: refuses stray arguments, quiets Orbax's and JAX's INFO logs."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:  # Orbax and JAX log at INFO through absl
    absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" notices
  # Errors the program reports itself (e.g. a corrupt checkpoint) are not logged twice.
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  sys.unraisablehook = _without_closed_loop_errors(sys.unraisablehook)


def parse_config_flags(argv) -> tuple[list[str], str]:
  """absl's parse of `argv` whose `--config` (a file or a shipped config's name) loads and
  whose every `--config.<key>` names a key, checked first (config_args); any error is one
  `error:` line. Returns (the remaining arguments, the config's name)."""
  try:
    resolved, config_name = launch.rewrite_config_argv(argv)
    config_args.check(resolved, argv)
  except errors.ConfigError as e:
    errors.exit_with(e)
  try:
    return flags.FLAGS(resolved), config_name
  except flags.Error as e:  # a bad value, an unknown flag, --config missing
    text = str(e)
    for typed, used in zip(argv, resolved):  # name the config as the user did
      if typed != used:
        text = text.replace(used.partition("=")[2] or used, typed.partition("=")[2] or typed)
    errors.exit_with(errors.ConfigError(text))


def _without_closed_loop_errors(unraisablehook):
  """`unraisablehook` less the "Event loop is closed" errors of TensorStore's late callbacks
  (hundreds of tracebacks) once a failed checkpoint restore has closed Orbax's event loop."""

  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    unraisablehook(unraisable)

  return hook


def run(main, *, parse_errors=(flags.Error,), report=errors.exit_with) -> None:
  """`app.run(main)`, a flag that cannot be parsed reported by `report` (no traceback)."""

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except parse_errors as e:
      report(e)

  def guarded(argv):
    try:
      return main(argv)
    except KeyboardInterrupt:  # Ctrl-C outside a campaign's own handling (start-up, exit)
      print("interrupted: rerun the same command to resume", file=sys.stderr, flush=True)
      sys.exit(130)

  app.run(guarded, flags_parser=parse)
