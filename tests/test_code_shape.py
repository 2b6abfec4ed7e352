"""The code base's shape rules (CONTRIBUTING in README): short functions, short parameter lists."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lplgrad_jax"
MAX_LINES = 80
MAX_REQUIRED_OR_POSITIONAL = 8
LIMITS = {("campaign.py", "run"): 60}  # the campaign loop reads top to bottom


def _functions():
  for path in sorted(PACKAGE.glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield path.name, node


def _crowded(node) -> int:
  """Positional parameters plus required keyword-only ones (self/cls not counted)."""
  args = node.args
  positional = [a.arg for a in args.posonlyargs + args.args if a.arg not in ("self", "cls")]
  required_keywords = [a for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None]
  return len(positional) + len(required_keywords)


def test_the_checks_see_the_package():
  names = {(file, node.name) for file, node in _functions()}
  assert ("campaign.py", "run") in names and len(names) > 100


@pytest.mark.parametrize("file,node", list(_functions()), ids=lambda v: getattr(v, "name", v))
def test_function_is_short_with_few_parameters(file, node):
  length = node.end_lineno - node.lineno + 1
  limit = LIMITS.get((file, node.name), MAX_LINES)
  assert length <= limit, f"{file}:{node.lineno} {node.name} has {length} lines (max {limit})"
  crowded = _crowded(node)
  assert crowded <= MAX_REQUIRED_OR_POSITIONAL, (
    f"{file}:{node.lineno} {node.name} takes {crowded} positional or required parameters "
    f"(max {MAX_REQUIRED_OR_POSITIONAL})"
  )
