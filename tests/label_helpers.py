"""A human campaign stopped for labels, and a label server over it, shared by the label tests."""

import contextlib
import http.client
import json
import shutil
import threading

from conftest import tiny_config

from lplgrad_jax import campaign
from lplgrad_jax import label
from lplgrad_jax import query_files


def stopped_campaign(photo_root: str, workdir: str):
  """(config, results) of a 2-round human campaign, run until it stops for round 1's labels."""
  config = tiny_config(
    **{
      "oracle": "human",
      "data.source": "image_folder",
      "data.root": photo_root,
      "al.num_rounds": 2,
    }
  )
  return config, campaign.run(config, workdir)


def copy_workdir(source: str, target: str) -> str:
  shutil.copytree(source, target)
  return target


@contextlib.contextmanager
def running(view):
  """A label server on a free port, in a thread, for a workdir's query or `view`; yields it."""
  server = label.serve(label.load_query(view) if isinstance(view, str) else view, "127.0.0.1", 0)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield server
  finally:
    server.shutdown()
    server.server_close()
    thread.join()


def request(server, method: str, path: str, body=None, headers=None):
  """(status, headers, body bytes) of one request sent as written (no path normalizing)."""
  connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
  try:
    payload = body
    if body is not None and not isinstance(body, bytes):
      payload = json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json"} if payload is not None else {}
    all_headers.update(headers or {})
    connection.request(method, path, body=payload, headers=all_headers)
    response = connection.getresponse()
    return response.status, dict(response.getheaders()), response.read()
  finally:
    connection.close()


def post_label(server, image_id, value):
  status, _, body = request(server, "POST", "/api/label", {"id": image_id, "label": value})
  return status, json.loads(body)


def state(server) -> dict:
  status, _, body = request(server, "GET", "/api/state")
  assert status == 200
  return json.loads(body)


def csv_labels(workdir: str) -> dict:
  return {
    row.id: row.label for row in query_files.query_rows(query_files.query_csv_path(workdir, 1))
  }
