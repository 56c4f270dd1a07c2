"""A headless Debian chromium driven over the Chrome DevTools Protocol (for the report's browser test).

Raw CDP over one websocket (``websocket-client``): no browser download, no driver binary.
The browser is started with a fresh profile and everything that phones home switched
off, announces its DevTools address on stderr (the readiness signal waited for), and
is killed by process id on close.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import websocket

CHROMIUM = os.environ.get("CKPTVCS_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
]
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


class BrowserError(RuntimeError):
    pass


def chromium_path() -> str | None:
    """The chromium binary, or None when it is not installed."""
    found = CHROMIUM if os.path.isfile(CHROMIUM) else shutil.which("chromium")
    return found if found and os.access(found, os.X_OK) else None


class Browser:
    """One headless chromium; :meth:`load` opens a page and reports what happened."""

    def __init__(self, binary: str, timeout: float = 120.0) -> None:
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="ckptvcs-chromium-")
        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.stderr: list[str] = []
        url = self._wait_for_devtools()
        self.ws = websocket.create_connection(url, timeout=timeout, suppress_origin=True)
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _wait_for_devtools(self) -> str:
        found: list[str] = []
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.stderr.append(line.rstrip())
                match = _LISTENING.search(line)
                if match and not found:
                    found.append(match.group(1))
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(self.timeout) or not found:
            self.close()
            raise BrowserError("chromium did not announce its DevTools address: " + " | ".join(self.stderr[-5:]))
        return found[0]

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send a command and return its result; events that arrive meanwhile are kept in ``events``."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)
        raise BrowserError(f"{method}: no reply within {self.timeout} s")

    def wait_event(self, method: str, session: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        for event in self.events:
            if event.get("method") == method and event.get("sessionId") == session:
                return event
        while time.monotonic() < deadline:
            event = json.loads(self.ws.recv())
            self.events.append(event)
            if event.get("method") == method and event.get("sessionId") == session:
                return event
        raise BrowserError(f"no {method} within {self.timeout} s")

    def load(self, url: str, script: str, screenshot: Path | None = None, width: int = 1400) -> dict[str, Any]:
        """Open ``url``, evaluate ``script`` (an expression returning JSON) once loaded, optionally
        save a full-page PNG; returns ``{"value", "console_errors", "requests"}``."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session)
        self.events.clear()
        self.send("Page.navigate", {"url": url}, session)
        self.wait_event("Page.loadEventFired", session)
        value = self.send("Runtime.evaluate", {"expression": script, "returnByValue": True}, session)
        if "exceptionDetails" in value:
            raise BrowserError(f"the test script failed: {value['exceptionDetails']}")
        if screenshot is not None:
            size = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
            height = int(min(size["height"], 16000))
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)
            shot = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        mine = [e for e in self.events if e.get("sessionId") == session]
        errors = [_describe(e) for e in mine if _is_error(e)]
        requests = [e["params"]["request"]["url"] for e in mine if e.get("method") == "Network.requestWillBeSent"]
        self.send("Target.closeTarget", {"targetId": target})
        return {"value": value["result"].get("value"), "console_errors": errors, "requests": requests}

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                try:
                    self.ws.send(json.dumps({"id": 0, "method": "Browser.close"}))
                except (OSError, websocket.WebSocketException):
                    pass
                self.ws.close()
        finally:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
            shutil.rmtree(self.profile, ignore_errors=True)


def _is_error(event: dict[str, Any]) -> bool:
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.consoleAPICalled":
        return params.get("type") in ("error", "assert")
    if method == "Runtime.exceptionThrown":
        return True
    if method == "Log.entryAdded":
        return params.get("entry", {}).get("level") == "error"
    return False


def _describe(event: dict[str, Any]) -> str:
    params = event.get("params", {})
    if event.get("method") == "Log.entryAdded":
        return f"{params['entry'].get('source')}: {params['entry'].get('text')}"
    if event.get("method") == "Runtime.exceptionThrown":
        return json.dumps(params.get("exceptionDetails", {}))[:300]
    return json.dumps(params.get("args", []))[:300]
