"""The one error type for user mistakes, and how a command line reports them."""

import sys
from collections.abc import Iterable
from typing import NoReturn


class ConfigError(ValueError):
  """Bad input from the user (configuration, data location, budgets, label files).

  Its message is one line, unless `multi_line` (a summary line, then one line
  per problem, each readable alone).
  """

  multi_line = False
  exit_code = 2


class Diverged(RuntimeError):
  """Training turned non-finite (NaN or inf loss, parameters or query scores).

  Nothing non-finite is saved: the workdir's newest checkpoint is the last
  good one. The campaign exits with status 3 (docs/reliability.md).
  """

  multi_line = False
  exit_code = 3


def check_choice(value, choices: Iterable, what: str):
  """`value` if it is one of `choices`; else ConfigError "unknown <what> ...: expected one of"."""
  choices = list(choices)
  if value not in choices:
    raise ConfigError(
      f"unknown {what} {value!r}: expected one of {', '.join(str(c) for c in choices)}"
    )
  return value


def exit_with(error: Exception) -> NoReturn:
  """Prints a user mistake on stderr as `error: ...` lines, no traceback, and exits with 2
  (or the error's `exit_code`: 3 for `Diverged`)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not getattr(error, "multi_line", False):
    lines = [": ".join(lines)]
  for line in lines:
    print(f"error: {line}", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  sys.exit(getattr(error, "exit_code", 2))
