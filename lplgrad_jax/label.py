"""Labels the pending query of a human-oracle campaign in the browser.

  python -m lplgrad_jax.label --workdir=runs/mine [--port=8765] [--host=127.0.0.1]
  python -m lplgrad_jax.label --predictions=runs/mine/predictions.csv --images=new_photos/

Serves one page on http://127.0.0.1:8765/: the queried photos, best first,
with class buttons and keys (1-9 a class, s skip, arrows move, u or Backspace
undo). Every answer is written at once into the same queries/round_<N>.csv
the spreadsheet route fills in, which stays the single source of truth: both
routes mix, and a restarted server shows what was saved. The page ends with
the command that continues the campaign. On a remote machine, forward the
port: `ssh -L 8765:127.0.0.1:8765 host`, then open http://127.0.0.1:8765/.

The second form shows a predictor's output (lplgrad_jax.predict) the same
way, read-only: each photo with its predicted class and confidence, least
confident first.

Only the page's own assets and the listed photos (files inside the
campaign's data.root, or inside --images) are served; a photo is asked for by
its number on the page, never by a path.
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import http.server
import importlib
import json
import mimetypes
import os
import shlex
import signal
import sys
import threading
import urllib.parse

from absl import app
from absl import flags

from lplgrad_jax import errors
from lplgrad_jax import query_files
from lplgrad_jax import reporting
from lplgrad_jax.data import IMAGE_SUFFIXES
from lplgrad_jax.errors import ConfigError

RESULTS_FILE = reporting.RESULTS_FILE
PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "label_page")
ASSETS = {
  "/": ("index.html", "text/html; charset=utf-8"),
  "/label.js": ("label.js", "text/javascript; charset=utf-8"),
  "/label.css": ("label.css", "text/css; charset=utf-8"),
}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")  # as urlsplit gives a Host header's name
MAX_BODY = 1 << 16
# The page runs only its own script and shows only its own images.
SECURITY_HEADERS = {
  "Content-Security-Policy": "default-src 'self'; img-src 'self'; frame-ancestors 'none'",
  "X-Content-Type-Options": "nosniff",
  "Referrer-Policy": "no-referrer",
  "Cache-Control": "no-store",
}


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


def _servable(file: str, root: str) -> str | None:
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
  photos = {i: _servable(files.get(i, ""), root) for i in ids}
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
  photos = {k: _servable(file, root) for k, (file, _, _) in enumerate(rows)}
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


class LabelServer(http.server.ThreadingHTTPServer):
  """Serves the page of one query (answers are written one at a time), or of predictions."""

  daemon_threads = True

  def __init__(self, address, view: Query | Predictions):
    self.view = view
    self.write_lock = threading.Lock()
    super().__init__(address, _Handler)

  @property
  def query(self) -> Query | None:
    """The query answers go to; None for predictions, which take none."""
    return self.view if isinstance(self.view, Query) else None

  def state(self) -> dict:
    return page_state(self.view) if self.query else predictions_state(self.view)

  def save_answer(self, image_id: int, label: str) -> None:
    """Writes one answer; the lock file also serializes servers started twice on one workdir."""
    directory, name = os.path.split(self.query.csv_path)
    with self.write_lock, open(os.path.join(directory, f".{name}.lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      query_files.set_label(
        self.query.csv_path, image_id, label, file=self.query.photos.get(image_id) or ""
      )


class _Handler(http.server.BaseHTTPRequestHandler):
  server: LabelServer
  server_version = "lplgrad-label"
  sys_version = ""

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    pass  # one line per photo would drown the terminal; errors reach the page

  def _send(self, status: int, body: bytes, content_type: str) -> None:
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    for name, value in SECURITY_HEADERS.items():
      self.send_header(name, value)
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _json(self, status: int, payload: dict) -> None:
    self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

  def _error(self, status: int, message: str) -> None:
    self._json(status, {"error": message})

  def _host_allowed(self) -> bool:
    """Whether the Host header names this machine, on a loopback server: a page of another
    site that reaches it by DNS rebinding names its own host."""
    if self.server.server_address[0] not in ("127.0.0.1", "::1"):
      return True
    host = urllib.parse.urlsplit("//" + self.headers.get("Host", "")).hostname or ""
    return host in LOOPBACK_NAMES

  def do_GET(self):  # pylint: disable=invalid-name
    path = urllib.parse.urlsplit(self.path).path
    if not self._host_allowed():
      return self._error(403, "unknown Host header: open the page as http://127.0.0.1:PORT/")
    if path in ASSETS:
      name, content_type = ASSETS[path]
      with open(os.path.join(PAGE_DIR, name), "rb") as f:
        return self._send(200, f.read(), content_type)
    if path == "/api/state":
      return self._json(200, self.server.state())
    if path.startswith("/photo/") and path[len("/photo/") :].isdigit():
      return self._photo(int(path[len("/photo/") :]))
    return self._error(404, "not found")

  do_HEAD = do_GET

  def _photo(self, image_id: int) -> None:
    real = self.server.view.photos.get(image_id)
    # Checked again: the folder may have changed since the server started.
    if real is None or _servable(real, self.server.view.root) != real:
      return self._error(404, f"no photo numbered {image_id} on this page")
    with open(real, "rb") as f:
      body = f.read()
    self._send(200, body, mimetypes.guess_type(real)[0] or "application/octet-stream")

  def do_POST(self):  # pylint: disable=invalid-name
    if not self._host_allowed():
      return self._error(403, "unknown Host header: open the page as http://127.0.0.1:PORT/")
    if urllib.parse.urlsplit(self.path).path != "/api/label" or self.server.query is None:
      return self._error(404, "not found")
    # A JSON body cannot be sent across sites without a CORS preflight, which is never granted.
    if self.headers.get_content_type() != "application/json":
      return self._error(415, "expected a JSON body (Content-Type: application/json)")
    length = self.headers.get("Content-Length", "")
    length = int(length) if length.isdigit() else 0
    if not 0 < length <= MAX_BODY:
      return self._error(413 if length else 400, "expected a JSON body of at most 64 KiB")
    try:
      body = json.loads(self.rfile.read(length))
      image_id, label = body["id"], body["label"]
    except (ValueError, KeyError, TypeError):
      return self._error(400, 'expected {"id": <query id>, "label": <class name, skip or "">}')
    problem = answer_problem(self.server.query, image_id, label)
    if problem:
      return self._error(400, problem)
    if label.strip():
      label = query_files.canonical_label(label.strip(), self.server.query.class_names)
    try:
      self.server.save_answer(image_id, label.strip())
    except (OSError, ConfigError) as e:
      return self._error(409, f"cannot write {self.server.query.csv_path}: {e}")
    self._json(200, self.server.state())


def answer_problem(query: Query, image_id, label) -> str | None:
  """Why an answer from the page is refused (the CSV route's messages), None if it is fine.

  A blank label clears an answer (undo).
  """
  if isinstance(image_id, bool) or not isinstance(image_id, int):
    return f"id {image_id!r} is not an integer: expected an id of this query"
  if not isinstance(label, str):
    valid = ", ".join([*query.class_names, query_files.SKIP])
    return f"label {label!r} is not text: expected one of {valid}"
  problem = query_files.foreign_id_problem(image_id, query.ids)
  if problem is None and label.strip():
    problem = query_files.unknown_label_problem(image_id, label.strip(), query.class_names)
  return problem


def serve(view: Query | Predictions, host: str = "127.0.0.1", port: int = 8765) -> LabelServer:
  """A server for `view` (load_query, load_predictions), bound and ready (`serve_forever`)."""
  try:
    return LabelServer((host, port), view)
  except OSError as e:
    raise ConfigError(
      f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port or --host"
    ) from None


def _define_flags() -> None:
  """Defined only when run as a program, as in predict.py: lplgrad_jax.main defines --workdir
  too, and importing this module (tests, other tools) must not clash with it."""
  flags.DEFINE_string(
    "workdir", None, "The --workdir of a campaign that stopped for labels (config.oracle='human')."
  )
  flags.DEFINE_integer(
    "port", 8765, "Port to listen on (0: any free port).", lower_bound=0, upper_bound=65535
  )
  flags.DEFINE_string(
    "host",
    "127.0.0.1",
    "Address to listen on. The default lets only this "
    "machine in; reach it from elsewhere through an SSH port forward.",
  )
  flags.DEFINE_string(
    "predictions",
    None,
    "Instead of --workdir: a predictions file of lplgrad_jax.predict to look through (read-only).",
  )
  flags.DEFINE_string(
    "images", None, "With --predictions: the folder it classified; only photos inside it are shown."
  )


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    errors.exit_with(e)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  options = flags.FLAGS
  try:
    if bool(options.workdir) == bool(options.predictions) or (
      options.predictions and not options.images
    ):
      raise ConfigError(
        "expected --workdir=<a campaign stopped for labels>, or "
        "--predictions=<file> with --images=<the folder it classified>"
      )
    view = (
      load_query(options.workdir)
      if options.workdir
      else load_predictions(options.predictions, options.images)
    )
    server = serve(view, options.host, options.port)
  except ConfigError as e:
    errors.exit_with(e)
  query = server.query
  host, port = server.server_address[:2]
  shown = f"[{host}]" if ":" in host else host
  print(
    f"round {query.round_number}: {len(query.ids)} photos to label in {query.csv_path}"
    if query
    else f"{len(view.rows)} predictions of {view.csv_path}",
    flush=True,
  )
  print(
    f"open http://{shown}:{port}/ (from another machine: ssh -L {port}:127.0.0.1:{port} "
    f"this-host, then open http://127.0.0.1:{port}/); Ctrl-C stops",
    flush=True,
  )
  _stop_on_signals(server)
  try:
    server.serve_forever()
  finally:
    server.server_close()
  if query:
    print(f"stopped; the answers are in {query.csv_path}. Continue with:\n  {query.command}")


def _stop_on_signals(server: http.server.HTTPServer) -> None:
  """Ctrl-C (or SIGTERM) ends `serve_forever` at its next poll, from a helper thread: a
  KeyboardInterrupt could land anywhere in the main thread, holding a lock at exit."""
  asked = threading.Event()

  def stop(signum, frame):
    if not asked.is_set():
      asked.set()
      threading.Thread(target=server.shutdown, daemon=True).start()

  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, stop)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
