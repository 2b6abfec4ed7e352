"""The one error type for user mistakes: the CLI prints its message and exits 2."""


class ConfigError(ValueError):
  """Bad input from the user (configuration, data location, budgets)."""
