"""Drives headless Chromium through the DevTools protocol (a websocket), for the browser tests.

Only what the tests need: open a page, evaluate JavaScript, press keys and
click like a person (real input events), reload, take a screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# key -> (code, Windows virtual key code) of the keys the tests press
_KEYS = {
  "ArrowLeft": ("ArrowLeft", 37),
  "ArrowRight": ("ArrowRight", 39),
  "Backspace": ("Backspace", 8),
}


def find_browser() -> str | None:
  for name in BROWSERS:
    path = shutil.which(name)
    if path:
      return path
  return None


class Browser:
  """One headless Chromium with one page."""

  def __init__(self, executable: str, width: int = 1280, height: int = 900):
    import websocket  # websocket-client

    self._profile = tempfile.mkdtemp(prefix="chromium-")
    self._process = subprocess.Popen(
      [
        executable,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--remote-debugging-port=0",
        f"--user-data-dir={self._profile}",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
        "about:blank",
      ],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )
    self._ids = itertools.count(1)
    try:
      port = self._devtools_port()
      with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
        page = next(t for t in json.load(r) if t["type"] == "page")
      self._socket = websocket.create_connection(
        page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True
      )
      self.send("Page.enable")
      self.send("Runtime.enable")
    except BaseException:
      self.close()
      raise

  def _devtools_port(self, timeout: float = 30) -> int:
    """Chromium writes its port to DevToolsActivePort once it listens."""
    path = os.path.join(self._profile, "DevToolsActivePort")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self._process.poll() is not None:
        raise RuntimeError(f"chromium exited with status {self._process.returncode}")
      with contextlib.suppress(OSError, ValueError, IndexError), open(path) as f:
        return int(f.read().split()[0])
      time.sleep(0.05)
    raise TimeoutError("chromium did not open its DevTools port")

  def send(self, method: str, **params) -> dict:
    message_id = next(self._ids)
    self._socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
    while True:  # events arrive between the answers; the tests poll instead
      message = json.loads(self._socket.recv())
      if message.get("id") == message_id:
        if "error" in message:
          raise RuntimeError(f"{method}: {message['error']}")
        return message.get("result", {})

  def evaluate(self, expression: str):
    result = self.send(
      "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
    )
    if "exceptionDetails" in result:
      raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
    return result["result"].get("value")

  def wait_for(self, expression: str, timeout: float = 10):
    """The value of `expression` once it is truthy (an exception counts as false: the page
    may still be loading)."""
    deadline = time.monotonic() + timeout
    while True:
      value = self.evaluate(
        f"(() => {{ try {{ return {expression}; }} catch (e) {{ return null; }} }})()"
      )
      if value:
        return value
      if time.monotonic() > deadline:
        raise TimeoutError(f"still false after {timeout}s: {expression}")
      time.sleep(0.03)

  def open(self, url: str) -> None:
    self.send("Page.navigate", url=url)

  def reload(self) -> None:
    self.send("Page.reload", ignoreCache=True)

  def press(self, key: str) -> None:
    """A key press as a person makes it: keyDown (with its text) and keyUp."""
    if key in _KEYS:
      (code, virtual), text = _KEYS[key], {}
    else:  # a letter or a digit
      code = f"Key{key.upper()}" if key.isalpha() else f"Digit{key}"
      virtual, text = ord(key.upper()), {"text": key}
    self.send(
      "Input.dispatchKeyEvent",
      type="keyDown",
      key=key,
      code=code,
      windowsVirtualKeyCode=virtual,
      **text,
    )
    self.send(
      "Input.dispatchKeyEvent", type="keyUp", key=key, code=code, windowsVirtualKeyCode=virtual
    )

  def click(self, selector: str) -> None:
    """A mouse click in the middle of the first element `selector` matches."""
    box = self.evaluate(f"""(() => {{
        const e = document.querySelector({json.dumps(selector)});
        e.scrollIntoView({{block: "center"}});
        const r = e.getBoundingClientRect();
        return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
    for kind in ("mousePressed", "mouseReleased"):
      self.send(
        "Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1
      )

  def screenshot(self, path: str) -> None:
    """A PNG of the whole page, also what lies below the window."""
    width, height = self.evaluate(
      "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
    )
    data = self.send(
      "Page.captureScreenshot",
      format="png",
      captureBeyondViewport=True,
      clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
    )["data"]
    with open(path, "wb") as f:
      f.write(base64.b64decode(data))

  def close(self) -> None:
    with contextlib.suppress(Exception):
      self._socket.close()
    if self._process.poll() is None:
      self._process.terminate()
      try:
        self._process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
    shutil.rmtree(self._profile, ignore_errors=True)
