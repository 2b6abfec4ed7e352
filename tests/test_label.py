"""The labeling page: its server over plain HTTP (the API, the CSV it writes, validation,
security), then a whole round in headless Chromium."""

import csv
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request

import chromium
import pytest
from absl import flags
from conftest import REPO_ROOT
from label_helpers import copy_workdir
from label_helpers import csv_labels
from label_helpers import post_label
from label_helpers import request
from label_helpers import running
from label_helpers import state
from label_helpers import stopped_campaign
from ml_collections import config_flags
from test_human import photo_folder  # noqa: F401  (a fixture)

from lplgrad_jax import campaign
from lplgrad_jax import config_checks
from lplgrad_jax import label
from lplgrad_jax import label_views
from lplgrad_jax import predict
from lplgrad_jax import query_files
from lplgrad_jax.errors import ConfigError


@pytest.fixture(scope="module")
def stopped(photo_folder, tmp_path_factory):  # noqa: F811
  """(config, workdir, results, digits) of a campaign waiting for round 1's labels; copy it
  before writing to it."""
  root, digits = photo_folder
  workdir = str(tmp_path_factory.mktemp("label") / "w")
  config, results = stopped_campaign(root, workdir)
  return config, workdir, results, digits


@pytest.fixture
def workdir(stopped, tmp_path):
  return copy_workdir(stopped[1], str(tmp_path / "w"))


def _queried(stopped):
  return stopped[2]["rounds"][0]["queried_ids"]


def test_page_state_and_original_photos(stopped, workdir):
  config, _, _, digits = stopped
  queried = _queried(stopped)
  with running(workdir) as server:
    status, headers, page = request(server, "GET", "/")
    assert status == 200 and b'src="/label.js"' in page
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for asset in ("/label.js", "/label.css"):
      assert request(server, "GET", asset)[0] == 200
    shown = state(server)
    assert [item["id"] for item in shown["items"]] == queried  # best score first
    assert shown["classes"] == list(digits.class_names)
    assert (shown["answered"], shown["total"], shown["pending"]) == (0, len(queried), True)
    rows = {
      row.id: row.file for row in query_files.query_rows(query_files.query_csv_path(workdir, 1))
    }
    first = shown["items"][0]
    assert first["file"] == os.path.relpath(rows[first["id"]], config.data.root)
    assert first["label"] == "" and first["image"]
    status, headers, body = request(server, "GET", f"/photo/{first['id']}")
    assert status == 200 and headers["Content-Type"] == "image/png"
    with open(rows[first["id"]], "rb") as f:
      assert body == f.read()  # the original file, not the model-size copy


def test_answers_are_written_into_the_query_file(stopped, workdir):
  queried = _queried(stopped)
  csv_path = query_files.query_csv_path(workdir, 1)
  # As a spreadsheet saves it: byte-order mark, ";" and CRLF; all of it is kept.
  with open(csv_path, newline="") as f:
    rows = list(csv.reader(f))
  with open(csv_path, "w", encoding="utf-8-sig", newline="") as f:
    csv.writer(f, delimiter=";", lineterminator="\r\n").writerows(rows)
  with running(workdir) as server:
    status, shown = post_label(server, queried[0], "7")
    assert status == 200 and shown["answered"] == 1 and shown["items"][0]["label"] == "7"
    assert post_label(server, queried[1], " SKIP ")[1]["items"][1]["label"] == query_files.SKIP
    assert csv_labels(workdir) == {
      i: {queried[0]: "7", queried[1]: "skip"}.get(i, "") for i in queried
    }
    status, shown = post_label(server, queried[0], "")  # undo: the label is cleared
    assert status == 200 and shown["answered"] == 1 and shown["items"][0]["label"] == ""
  with open(csv_path, "rb") as f:
    raw = f.read()
  assert raw.startswith(b"\xef\xbb\xbfid;file;score;label\r\n") and raw.count(b"\r\n") == 11
  expected = [row[:3] + [{queried[1]: "skip"}.get(int(row[0]), "")] for row in rows[1:]]
  assert list(csv.reader(io.StringIO(raw.decode("utf-8-sig")), delimiter=";"))[1:] == expected


def test_bad_answers_are_refused_with_the_csv_routes_messages(stopped, workdir):
  queried = _queried(stopped)
  csv_path = query_files.query_csv_path(workdir, 1)
  with open(csv_path, "rb") as f:
    before = f.read()
  # What the CSV route says about the same mistakes, without its "file line N: " prefix.
  query_files.set_label(csv_path, queried[0], "seven")
  with open(csv_path, "a") as f:
    f.write("99999,x,1,3\n")
  with pytest.raises(query_files.LabelFileError) as error:
    query_files.read_labels(csv_path, queried, stopped[3].class_names)
  csv_messages = [p.split(": ", 1)[1] for p in error.value.problems if " line " in p]
  with open(csv_path, "wb") as f:
    f.write(before)
  with running(workdir) as server:
    status, body = post_label(server, queried[0], "seven")
    assert status == 400 and body["error"] == next(m for m in csv_messages if "seven" in m)
    assert body["error"].startswith(
      f"unknown label 'seven' for id {queried[0]}: expected one of 0, 1, 2"
    )
    status, body = post_label(server, 99999, "3")
    assert status == 400 and body["error"] == "id 99999 is not one of this query's images"
    assert body["error"] in csv_messages
    for bad_id in ("1", True, None, 1.5):
      assert post_label(server, bad_id, "3")[0] == 400
    assert post_label(server, queried[0], 3)[0] == 400
    assert request(server, "POST", "/api/label", b"not json")[0] == 400
    assert request(server, "POST", "/api/label", b'{"id": 1}')[0] == 400
    status, _, _ = request(
      server, "POST", "/api/label", b'{"id": 1, "label": "3"}', {"Content-Type": "text/plain"}
    )
    assert status == 415  # a cross-site form cannot post JSON
  with open(csv_path, "rb") as f:
    assert f.read() == before


def test_only_the_queried_photos_are_served(stopped, workdir, tmp_path):
  config = stopped[0]
  queried = _queried(stopped)
  secret = tmp_path / "secret.png"
  secret.write_bytes(b"\x89PNG secret")
  root = config.data.root
  link = os.path.join(root, "unlabeled", "zz_link_out.png")
  os.symlink(secret, link)
  try:
    # The person's file column names a link out of the folder and a file outside it.
    csv_path = query_files.query_csv_path(workdir, 1)
    query_files.set_label(csv_path, queried[0], "")
    text = open(csv_path).read()
    files = {row.id: row.file for row in query_files.query_rows(csv_path)}
    text = text.replace(files[queried[0]], link).replace(files[queried[1]], str(secret))
    with open(csv_path, "w") as f:
      f.write(text)
    with running(workdir) as server:
      for path in (
        "/../results.json",
        "/photo/../results.json",
        "/%2e%2e/results.json",
        "/photo/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "//etc/passwd",
        f"/{secret}",
        "/photo/" + str(secret),
        "/label_page/label.js",
        "/label.py",
        "/photo/-1",
        f"/photo/{queried[0]}",
        f"/photo/{queried[1]}",
        f"/photo/{next(i for i in range(100) if i not in queried)}",
        f"/photo/{queried[2]}/../{queried[3]}",
        "/results.json",
      ):
        status, _, body = request(server, "GET", path)
        assert status == 404 and b"secret" not in body and b"root:" not in body, path
      assert request(server, "GET", f"/photo/{queried[2]}")[0] == 200
      assert [item["image"] for item in state(server)["items"][:3]] == [False, False, True]
      # A page of another site reaching the server by DNS rebinding names its own host.
      assert request(server, "GET", "/api/state", headers={"Host": "evil.example:80"})[0] == 403
      assert post_label(server, queried[2], "1")[0] == 200
  finally:
    os.remove(link)


def test_concurrent_answers_are_all_kept(stopped, workdir):
  queried = _queried(stopped)
  with running(workdir) as first, running(workdir) as second:  # two tabs, even two servers
    answers = {i: str(k % 10) for k, i in enumerate(queried)}
    threads = [
      threading.Thread(target=post_label, args=((first, second)[k % 2], i, answers[i]))
      for k, i in enumerate(queried)
    ]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
    assert csv_labels(workdir) == answers
    assert state(first)["answered"] == state(second)["answered"] == len(queried)


def test_a_restarted_server_shows_the_saved_and_spreadsheet_answers(stopped, workdir):
  queried = _queried(stopped)
  with running(workdir) as server:
    post_label(server, queried[0], "4")
  csv_path = query_files.query_csv_path(workdir, 1)
  query_files.set_label(csv_path, queried[1], "Five?")  # typed in a spreadsheet: not a class
  query_files.set_label(csv_path, queried[2], "SKIP")
  with running(workdir) as server:
    items = state(server)["items"]
    assert [(it["label"], it["valid"]) for it in items[:4]] == [
      ("4", True),
      ("Five?", False),
      ("skip", True),
      ("", False),
    ]
    assert state(server)["answered"] == 2


def test_labels_from_the_page_continue_the_campaign(stopped, workdir, capsys):
  config, _, results, digits = stopped
  queried = _queried(stopped)
  skipped = queried[3]
  with running(workdir) as server:
    for i in queried:
      post_label(server, i, query_files.SKIP if i == skipped else str(digits.y_train[i]))
    assert state(server)["answered"] == len(queried)
    capsys.readouterr()
    continued = campaign.run(config, workdir)  # while the page is still open
    assert "read 9 labels and 1 skips" in capsys.readouterr().out
    assert not state(server)["pending"]  # the page says its answers are no longer read
  first, second = continued["rounds"]
  assert first["skipped_ids"] == [skipped]
  assert set(second["labeled_ids"]) == set(first["labeled_ids"]) | (set(queried) - {skipped})
  with pytest.raises(ConfigError, match="no query of .* waits for labels"):
    label.load_query(workdir)
  result = _cli(f"--workdir={workdir}")
  assert result.returncode == 2 and result.stderr.startswith("error: no query of ")
  assert len(result.stderr.splitlines()) == 1


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run(
    [sys.executable, "-m", "lplgrad_jax.label", *args],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_cli_serves_until_ctrl_c_then_prints_the_command(stopped, workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  process = subprocess.Popen(
    [sys.executable, "-m", "lplgrad_jax.label", f"--workdir={workdir}", "--port=0"],
    cwd=REPO_ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    first = process.stdout.readline()
    assert first == (f"round 1: 10 photos to label in {query_files.query_csv_path(workdir, 1)}\n")
    url = process.stdout.readline().split()[1]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/")
    with urllib.request.urlopen(url + "api/state", timeout=10) as response:
      assert json.load(response)["total"] == 10
  finally:
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
  assert process.returncode == 0 and err == ""
  command = label_views.continue_command(workdir, stopped[2]["config"])
  assert out.endswith(f"Continue with:\n  {command}\n")


def test_cli_refuses_a_folder_without_a_campaign(tmp_path):
  result = _cli(f"--workdir={tmp_path}")
  assert result.returncode == 2
  assert result.stderr == (
    f"error: {tmp_path}/results.json is missing: expected the --workdir "
    "of a campaign run with --config.oracle=human (python -m "
    "lplgrad_jax.main)\n"
  )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # config_flags loads with load_module
def test_the_continue_command_gives_the_campaigns_configuration(stopped, monkeypatch):
  config, workdir, results, _ = stopped
  command = label_views.continue_command(workdir, results["config"])
  assert command.startswith("python -m lplgrad_jax.main --config=configs/digits.py ")
  assert "--config.oracle=human" in command and command.endswith(f"--workdir={workdir}")
  argv = ["main", *shlex.split(command)[3:]]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
  monkeypatch.chdir(REPO_ROOT)
  flag_values = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
  parsed = config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values)
  flag_values(argv)
  saved = json.loads(json.dumps(results["config"]))  # as results.json holds it
  assert json.loads(json.dumps(parsed.value.to_dict())) == saved
  config_checks.check_same_campaign(workdir, saved, parsed.value.to_dict())


def _browser_or_skip():
  executable = chromium.find_browser()
  if executable is None:
    pytest.skip(
      "no Chromium found (chromium, chromium-browser or google-chrome on PATH): "
      "`make browser` installs it (apt-get install chromium); the HTTP tests above "
      "cover every server rule"
    )
  pytest.importorskip(
    "websocket",
    reason="websocket-client is not installed: make test installs it (pip install -e '.[test]')",
  )
  return executable


def test_a_whole_round_in_headless_chromium(stopped, workdir, capsys):
  """Labels with keys and clicks, skips one, undoes, reloads, finishes, then continues."""
  executable = _browser_or_skip()
  config, _, _, digits = stopped
  queried = _queried(stopped)
  truth = {i: str(digits.y_train[i]) for i in queried}
  skipped = queried[3]
  progress = "document.getElementById('progress').textContent"
  selected = "document.querySelector('.card.selected').dataset.id"

  def labeled(count):
    return browser.wait_for(f"{progress} === '{count} / {len(queried)} labeled'")

  def give(i, by_click=False):  # the true class of photo i, by its key or its button
    assert browser.evaluate(selected) == str(i)
    if by_click:
      browser.click(f".buttons button[data-label='{truth[i]}']")
    else:
      browser.press(truth[i])  # digit classes: each class's key is its own digit

  with running(workdir) as server:
    browser = chromium.Browser(executable)
    try:
      browser.open(f"http://127.0.0.1:{server.server_address[1]}/")
      labeled(0)
      keys = browser.evaluate(
        "[...document.querySelectorAll('.buttons button')]"
        ".map(b => [b.dataset.label, b.dataset.key])"
      )
      assert keys == [[c, c] for c in digits.class_names] + [["skip", "s"], [None, "u"]]
      give(queried[0])
      labeled(1)
      give(queried[1], by_click=True)
      labeled(2)
      give(queried[2])
      labeled(3)
      browser.press("s")  # queried[3] fits no class
      labeled(4)
      give(queried[4])
      labeled(5)
      browser.press("u")  # undo: queried[4] is unlabeled again, and selected
      labeled(4)
      assert browser.evaluate(selected) == str(queried[4])
      browser.press("ArrowRight")
      browser.press("ArrowRight")
      browser.press("ArrowLeft")
      assert browser.evaluate(selected) == str(queried[5])
      browser.click(f".card[data-id='{queried[4]}']")
      give(queried[4])
      labeled(5)
      browser.reload()  # the saved answers come back; the first open photo is selected
      labeled(5)
      assert browser.wait_for(f"{selected} === '{queried[5]}' && {selected}")
      badges = browser.evaluate("[...document.querySelectorAll('.card')].map(c => c.dataset.label)")
      assert badges == [
        truth[i] if k < 5 and i != skipped else query_files.SKIP if i == skipped else ""
        for k, i in enumerate(queried)
      ]
      for count, i in enumerate(queried[5:], start=6):
        give(i)
        labeled(count)
      browser.press("Backspace")  # undo the last one, then answer it again
      labeled(len(queried) - 1)
      give(queried[-1])
      labeled(len(queried))
      assert browser.wait_for("document.getElementById('done').classList.contains('complete')")
      command = browser.evaluate("document.getElementById('command').textContent")
      assert command == label_views.continue_command(
        workdir, json.load(open(os.path.join(workdir, "results.json")))["config"]
      )
      assert browser.evaluate("document.getElementById('error').hidden")
    finally:
      browser.close()
  expected = {i: query_files.SKIP if i == skipped else truth[i] for i in queried}
  assert csv_labels(workdir) == expected
  capsys.readouterr()
  first, second = campaign.run(config, workdir)["rounds"]
  assert "read 9 labels and 1 skips" in capsys.readouterr().out
  assert first["skipped_ids"] == [skipped]
  assert set(second["labeled_ids"]) == set(first["labeled_ids"]) | (set(queried) - {skipped})


def _predictions(stopped, tmp_path):
  """A predictions file (as lplgrad_jax.predict writes it) of three photos of the folder's
  unlabeled/ and one outside it; (view, folder's files)."""
  folder = os.path.join(stopped[0].data.root, "unlabeled")
  files = [os.path.join(folder, f) for f in sorted(os.listdir(folder))[:3]]
  outside = tmp_path / "outside.png"
  shutil.copy(files[0], outside)
  path = str(tmp_path / "predictions.csv")
  predict.write_predictions(
    path,
    [(files[0], "3", 0.9), (files[1], "7", 0.25), (str(outside), "1", 0.5), (files[2], "0", 0.625)],
  )
  return label.load_predictions(path, folder), files


def test_predictions_are_shown_read_only_least_confident_first(stopped, tmp_path):
  view, files = _predictions(stopped, tmp_path)
  with running(view) as server:
    shown = state(server)
    assert shown["mode"] == "predictions"
    rows = [(it["file"], it["label"], it["confidence"], it["image"]) for it in shown["items"]]
    assert rows == [
      (os.path.basename(files[1]), "7", 0.25, True),
      (str(tmp_path / "outside.png"), "1", 0.5, False),
      (os.path.basename(files[2]), "0", 0.625, True),
      (os.path.basename(files[0]), "3", 0.9, True),
    ]
    status, _, body = request(server, "GET", "/photo/0")
    with open(files[1], "rb") as f:
      assert status == 200 and body == f.read()
    assert request(server, "GET", "/photo/1")[0] == 404  # outside --images
    assert post_label(server, 0, "3")[0] == 404  # nothing to answer


def test_predictions_page_in_headless_chromium(stopped, tmp_path):
  executable = _browser_or_skip()
  view, _ = _predictions(stopped, tmp_path)
  with running(view) as server:
    browser = chromium.Browser(executable)
    try:
      browser.open(f"http://127.0.0.1:{server.server_address[1]}/")
      browser.wait_for(
        "document.getElementById('title').textContent === '4 predictions, least confident first'"
      )
      badges = browser.evaluate("[...document.querySelectorAll('.badge')].map(b => b.textContent)")
      assert badges == ["7 25%", "1 50%", "0 63%", "3 90%"]
      assert browser.evaluate("document.getElementById('buttons').offsetHeight") == 0
      browser.press("ArrowRight")
      browser.press("3")  # no answers here: a class key does nothing
      assert browser.evaluate("document.querySelector('.card.selected').dataset.label") == "1"
    finally:
      browser.close()
