"""What the labeling page shows: the pending query of a human-oracle campaign (its photos,
the answers written so far, the command that continues the campaign), or a predictor's output."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import os
import shlex
import sys

from lplgrad_jax import query_files
from lplgrad_jax import reporting
from lplgrad_jax.data import IMAGE_SUFFIXES
from lplgrad_jax.errors import ConfigError

RESULTS_FILE = reporting.RESULTS_FILE


@dataclasses.dataclass(frozen=True)
class Query:
  """The pending query of a campaign: what the page shows and which answers it accepts."""

  workdir: str
  csv_path: str
  round_number: int  # 1-based, as in round_<N>.csv
  ids: tuple[int, ...]  # best score first
  class_names: tuple[str, ...]
  root: str  # the photo folder (real path)
  photos: dict  # id -> real path of a servable photo, or None
  names: dict  # id -> file as shown on the page (relative to the folder)
  command: str  # the command that continues the campaign


def _read_results(workdir: str) -> dict:
  return reporting.read_results(
    workdir,
    lambda r: (r["config"]["data"]["root"], r["data"]["class_names"], r["rounds"]),
    of="a campaign run with --config.oracle=human",
  )


def _pending_round(workdir: str, results: dict) -> int:
  """The 1-based round whose query waits for labels; ConfigError if none does."""
  awaiting = results.get("awaiting_labels")
  if results["config"].get("oracle") != "human" or not awaiting:
    raise ConfigError(
      f"no query of {workdir} waits for labels: expected a campaign run with "
      "--config.oracle=human that stopped for labels (its results.json names "
      "queries/round_<N>.csv in awaiting_labels)"
    )
  for number in range(1, len(results["rounds"]) + 1):
    if os.path.basename(query_files.query_csv_path(workdir, number)) == os.path.basename(awaiting):
      return number
  raise ConfigError(
    f"{os.path.join(workdir, RESULTS_FILE)} awaits labels in {awaiting}, "
    "which is not a query of its rounds"
  )


def servable(file: str, root: str) -> str | None:
  """The real path of `file` if it is an image file inside `root` (links resolved), else None."""
  if not file:
    return None
  real = os.path.realpath(file)
  if (
    os.path.commonpath([real, root]) != root
    or not os.path.isfile(real)
    or not real.lower().endswith(IMAGE_SUFFIXES)
  ):
    return None
  return real


def load_query(workdir: str) -> Query:
  """The pending query of the campaign in `workdir`; ConfigError if there is none."""
  results = _read_results(workdir)
  number = _pending_round(workdir, results)
  root = os.path.realpath(os.path.expanduser(results["config"]["data"]["root"]))
  if not os.path.isdir(root):
    raise ConfigError(
      f"data.root={results['config']['data']['root']!r} of this campaign is not "
      "a directory here: run from the directory the campaign ran in"
    )
  csv_path = query_files.query_csv_path(workdir, number)
  ids = tuple(int(i) for i in results["rounds"][number - 1]["queried_ids"])
  files = {row.id: row.file for row in query_files.query_rows(csv_path)}
  photos = {i: servable(files.get(i, ""), root) for i in ids}
  names = {i: os.path.relpath(photos[i], root) if photos[i] else files.get(i, "") for i in ids}
  return Query(
    workdir,
    csv_path,
    number,
    ids,
    tuple(results["data"]["class_names"]),
    root,
    photos,
    names,
    continue_command(workdir, results["config"]),
  )


@dataclasses.dataclass(frozen=True)
class Predictions:
  """A predictor's output file, shown read-only, least confident first."""

  csv_path: str
  root: str  # the --images folder (real path)
  rows: tuple  # (file as shown, class, confidence), least confident first
  photos: dict  # row number -> real path of a servable photo, or None


def load_predictions(csv_path: str, images: str) -> Predictions:
  """The rows of `csv_path` (file,class,confidence as lplgrad_jax.predict writes them)."""
  root = os.path.realpath(os.path.expanduser(images))
  if not os.path.isdir(root):
    raise ConfigError(
      f"--images={images} is not a directory: expected the folder the predictions were made for"
    )
  try:
    with open(csv_path, encoding="utf-8-sig", newline="") as f:
      rows = [(r["file"], r["class"], float(r["confidence"])) for r in csv.DictReader(f)]
  except (OSError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
    raise ConfigError(
      f"--predictions={csv_path} is not a predictions file ({type(e).__name__}: "
      f"{e}): expected file,class,confidence as lplgrad_jax.predict writes "
      "them"
    ) from None
  rows.sort(key=lambda row: row[2])
  photos = {k: servable(file, root) for k, (file, _, _) in enumerate(rows)}
  shown = tuple(
    (os.path.relpath(photos[k], root) if photos[k] else file, name, confidence)
    for k, (file, name, confidence) in enumerate(rows)
  )
  return Predictions(csv_path, root, shown, photos)


def predictions_state(view: Predictions) -> dict:
  items = [
    {
      "id": k,
      "file": file,
      "label": name,
      "confidence": confidence,
      "valid": True,
      "image": view.photos[k] is not None,
    }
    for k, (file, name, confidence) in enumerate(view.rows)
  ]
  return {"mode": "predictions", "csv": view.csv_path, "items": items, "total": len(items)}


def _flag_value(value) -> str:
  if isinstance(value, (list, tuple)):
    inner = ", ".join(repr(v) for v in value)
    return f"({inner},)" if len(value) == 1 else f"({inner})"
  return str(value)


def _leaves(tree: dict, prefix: str = ""):
  """(dotted key, value) of each leaf of a nested dict, as the --config.<key> flags name them."""
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield prefix + key, value


def continue_command(workdir: str, config: dict) -> str:
  """A `python -m lplgrad_jax.main` command that continues the campaign with `config`.

  results.json keeps the configuration but not the command line, so this picks
  the config file of configs/ closest to it and overrides the keys that differ:
  the campaign accepts the command because its configuration is the same.
  """
  configs_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  repo = os.path.dirname(configs_dir)
  if repo not in sys.path:  # configs/*.py import `lplgrad_jax.configs.default`
    sys.path.append(repo)
  wanted = dict(_leaves(json.loads(json.dumps(config))))  # tuples as JSON lists, as saved
  best = None
  names = sorted(os.listdir(configs_dir)) if os.path.isdir(configs_dir) else []
  for name in names:
    if not name.endswith(".py") or name.startswith("_"):
      continue
    try:
      base = dict(
        _leaves(
          json.loads(
            json.dumps(importlib.import_module(f"configs.{name[:-3]}").get_config().to_dict())
          )
        )
      )
    except Exception:  # pylint: disable=broad-except; a config that cannot load is no candidate
      continue
    differing = [k for k in wanted if k in base and base[k] != wanted[k]]
    if best is None or len(differing) < len(best[1]):
      best = (os.path.join(configs_dir, name), differing)
  if best is None:
    args = ["--config=<your config file>"]
  else:
    path = os.path.relpath(best[0]) if not os.path.relpath(best[0]).startswith("..") else best[0]
    args = [f"--config={path}", *(f"--config.{k}={_flag_value(wanted[k])}" for k in best[1])]
  return "python -m lplgrad_jax.main " + shlex.join([*args, f"--workdir={workdir}"])


def page_state(query: Query) -> dict:
  """What the page shows: every queried photo with its answer so far, read from the CSV."""
  written = {}
  for row in query_files.query_rows(query.csv_path):
    written.setdefault(row.id, row.label)
  items, answered = [], 0
  for i in query.ids:
    label = written.get(i, "")
    try:
      label, valid = query_files.canonical_label(label, query.class_names), True
    except KeyError:
      valid = False  # blank, or a typo from the spreadsheet route: shown as it is
    answered += valid
    items.append(
      {
        "id": i,
        "file": query.names[i],
        "label": label,
        "valid": valid,
        "image": query.photos[i] is not None,
      }
    )
  try:
    still_pending = _pending_round(query.workdir, _read_results(query.workdir)) == (
      query.round_number
    )
  except ConfigError:
    still_pending = False
  return {
    "mode": "label",
    "round": query.round_number,
    "csv": query.csv_path,
    "classes": list(query.class_names),
    "skip": query_files.SKIP,
    "items": items,
    "answered": answered,
    "total": len(items),
    "command": query.command,
    "pending": still_pending,
  }
