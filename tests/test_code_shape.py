"""The code base's shape rules (docs/development.md, Code shape): short functions and short
parameter lists, no import cycles."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lplgrad_jax"
MAX_LINES = 80
MAX_REQUIRED_OR_POSITIONAL = 8
LIMITS = {("campaign.py", "run"): 60}  # the campaign loop reads top to bottom
MAX_MODULE_LINES = 400
MODULE_LIMITS = {"campaign.py": 470}  # the campaign loop: one class a reader follows through


def _functions():
  for path in _modules():
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield path.relative_to(PACKAGE).as_posix(), node


def _modules():
  return sorted(PACKAGE.rglob("*.py"))


def _crowded(node) -> int:
  """Positional parameters plus required keyword-only ones (self/cls not counted)."""
  args = node.args
  positional = [a.arg for a in args.posonlyargs + args.args if a.arg not in ("self", "cls")]
  required_keywords = [a for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None]
  return len(positional) + len(required_keywords)


def test_the_checks_see_the_package():
  names = {(file, node.name) for file, node in _functions()}
  assert ("campaign.py", "run") in names and len(names) > 100
  assert ("pergrad/taps.py", "find_taps") in names


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


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_module_is_short(path):
  name = path.relative_to(PACKAGE).as_posix()
  limit = MODULE_LIMITS.get(name, MAX_MODULE_LINES)
  lines = len(path.read_text().splitlines())
  assert lines <= limit, f"{name} has {lines} lines (max {limit}): split it by concept"


def _module_name(path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
  """Module -> the package modules it imports anywhere (top level, functions, TYPE_CHECKING)."""
  paths = {_module_name(p): p for p in _modules()}
  graph = {}
  for name, path in paths.items():
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          found.add(full if full in paths else node.module)
      elif isinstance(node, ast.Import):
        found.update(alias.name for alias in node.names)
    graph[name] = {m for m in found if m in paths and m != name}
  return graph


def test_modules_import_each_other_without_cycles():
  graph = _imports()
  assert "lplgrad_jax.query_files" in graph["lplgrad_jax.data.folders"]  # the checks see imports
  done, path = set(), []

  def visit(name):
    if name in path:
      cycle = path[path.index(name) :] + [name]
      raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
    if name in done:
      return
    path.append(name)
    for dep in sorted(graph[name]):
      visit(dep)
    path.pop()
    done.add(name)

  for name in sorted(graph):
    visit(name)


def test_configs_load_as_one_package():
  # configs/ is reachable as `configs` (the repo root) and as `lplgrad_jax.configs` (the link
  # the wheel ships): importing both would load each file twice, as two modules.
  root = PACKAGE.parent
  paths = [*_modules()] + [p for d in ("tests", "experiments") for p in (root / d).rglob("*.py")]
  offenders = []
  for path in paths:
    for node in ast.walk(ast.parse(path.read_text())):
      names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      if any(n == "configs" or n.startswith("configs.") for n in names):
        offenders.append(f"{path.relative_to(root)}:{node.lineno}")
  assert len(paths) > 50 and not offenders, offenders
