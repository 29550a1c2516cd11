"""A headless Chromium driven over the Chrome DevTools Protocol, standard library only.

The browser runs with ``--remote-debugging-pipe``: it reads protocol commands from fd 3 and writes replies
and events to fd 4, each one JSON message terminated by a NUL byte (no network port, no websocket). One
page is attached in flat mode; ``evaluate`` runs JavaScript in it (promises awaited, values returned as
JSON) and ``click`` sends a real mouse click at page coordinates (hit testing and event handlers as for a
user).
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in NAMES) if p), None)


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, exe: str, profile_dir: Path, width: int = 1400, height: int = 1000, timeout: float = 60):
        self.timeout = timeout
        cmd_r, self._cmd_w = os.pipe()  # we write commands, the browser reads them on fd 3
        self._evt_r, evt_w = os.pipe()  # the browser writes on fd 4, we read
        high = (fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(evt_w, fcntl.F_DUPFD, 10))

        def child_fds():  # in the child, before exec: the pipe ends on fds 3 and 4
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--remote-debugging-pipe",
                f"--user-data-dir={profile_dir}", f"--window-size={width},{height}", "about:blank"]
        self.stderr_path = Path(profile_dir) / "stderr.txt"
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr,
                                     pass_fds=(3, 4), preexec_fn=child_fds)
        for fd in (cmd_r, evt_w, *high):
            os.close(fd)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.session = None
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
            self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                     session=False)["sessionId"]
            self.send("Page.enable")
            self.send("Runtime.enable")
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------------- protocol
    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._evt_r], [], [], left)[0]:
                raise BrowserError(f"no reply from the browser in {self.timeout} s; stderr:\n{self.stderr()}")
            chunk = os.read(self._evt_r, 1 << 16)
            if not chunk:
                raise BrowserError(f"the browser closed its pipe; stderr:\n{self.stderr()}")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, e in enumerate(self.events):
                if e.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read_message(deadline))

    # -------------------------------------------------------------------- page
    def open(self, url: str, init_script: str | None = None) -> None:
        """Navigate to ``url`` and wait for its load event; ``init_script`` runs before the page's scripts."""
        if init_script:
            self.send("Page.addScriptToEvaluateOnNewDocument", {"source": init_script})
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str):
        """The value of a JavaScript expression (a promise is awaited); an exception in it raises here."""
        res = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True,
                                             "timeout": int(self.timeout * 1000)})
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise BrowserError(f"JavaScript: {d.get('exception', {}).get('description') or d.get('text')}")
        return res["result"].get("value")

    def click(self, x: float, y: float) -> None:
        """A left click at viewport coordinates (CSS pixels): move, press, release."""
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def console_errors(self) -> list[str]:
        return [" ".join(str(a.get("value", a.get("description", ""))) for a in e["params"].get("args", []))
                for e in self.events if e.get("method") == "Runtime.consoleAPICalled"
                and e["params"].get("type") == "error"]

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._cmd_w, self._evt_r):
            try:
                os.close(fd)
            except OSError:
                pass
        self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
