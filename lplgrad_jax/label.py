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

import fcntl
import http.server
import json
import mimetypes
import os
import signal
import threading
import urllib.parse

from absl import app
from absl import flags

from lplgrad_jax import errors
from lplgrad_jax import query_files
from lplgrad_jax.errors import ConfigError
from lplgrad_jax.label_views import Predictions
from lplgrad_jax.label_views import Query
from lplgrad_jax.label_views import load_predictions
from lplgrad_jax.label_views import load_query
from lplgrad_jax.label_views import page_state
from lplgrad_jax.label_views import predictions_state
from lplgrad_jax.label_views import servable

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
    if real is None or servable(real, self.server.view.root) != real:
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
