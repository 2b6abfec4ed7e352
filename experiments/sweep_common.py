"""What the sweeps share: config files with a budget, KEY=VALUE overrides, finished runs."""

import ast
import importlib.util
import inspect
import json
import os


def load_config(path: str, budget: str):
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  takes_budget = bool(inspect.signature(module.get_config).parameters)
  return module.get_config(budget) if takes_budget else module.get_config()


def apply_override(config, assignment: str) -> None:
  key, _, text = assignment.partition("=")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  *path, leaf = key.split(".")
  node = config
  for part in path:
    node = node[part]
  node[leaf] = value


def is_finished(workdir: str, num_rounds: int) -> bool:
  try:
    with open(os.path.join(workdir, "results.json")) as f:
      return len(json.load(f)["rounds"]) >= num_rounds
  except (OSError, ValueError, KeyError):
    return False
