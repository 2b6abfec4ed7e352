"""The one error type for user mistakes, and how a command line reports them."""

import sys
from typing import NoReturn


class ConfigError(ValueError):
  """Bad input from the user (configuration, data location, budgets, label files).

  Its message is one line, unless `multi_line` (a summary line, then one line
  per problem, each readable alone).
  """
  multi_line = False


def exit_with(error: Exception) -> NoReturn:
  """Prints a user mistake on stderr as `error: ...` lines, no traceback, and exits with 2."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not getattr(error, "multi_line", False):
    lines = [": ".join(lines)]
  for line in lines:
    print(f"error: {line}", file=sys.stderr)
  sys.exit(2)
