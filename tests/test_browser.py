"""The HTML head view in a real headless Chromium, driven over the DevTools protocol.

Loads the page, checks it renders (non-blank pixels, no script error, no request beyond the file
itself), then drives it as a reader would: real mouse events over a token and on a head's
checkbox, and compares the lines the page's own script draws with the probabilities.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request

import numpy as np
import pytest
import torch

from selfattn.viz import head_view, maps_from_qk

websocket = pytest.importorskip("websocket", reason="websocket-client (dev extra) is not installed")

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--disable-extensions",
    "--remote-debugging-port=0",
    "--window-size=1000,800",
]


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    """Path of a Chromium binary; installed with apt-get (Debian's `chromium`) when absent."""
    path = _find_chromium()
    if path:
        return path
    why = "no chromium on PATH"
    if shutil.which("apt-get") and os.geteuid() == 0:
        install = ["bash", "-c", "apt-get update -qq && apt-get install -y -qq chromium"]
        res = subprocess.run(install, capture_output=True, text=True, timeout=900, check=False)
        path = _find_chromium()
        if path:
            return path
        why += f"; `apt-get install chromium` failed: {res.stderr.strip()[-300:]}"
    else:
        why += "; cannot install it here (needs root and apt-get)"
    pytest.skip(f"headless Chromium unavailable: {why}")


class DevTools:
    """A minimal DevTools-protocol client over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        # suppress_origin: Chromium refuses websocket clients that send an Origin it does not know
        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        for ev in self.events:
            if ev["method"] == method:
                return ev
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == method:
                    return msg
        raise TimeoutError(f"no {method} within {timeout}s")

    def js(self, expr: str):
        res = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def mouse(self, kind: str, x: float, y: float) -> None:
        extra = {"button": "left", "clickCount": 1} if kind != "mouseMoved" else {}
        self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, **extra)

    def click(self, x: float, y: float) -> None:
        self.mouse("mouseMoved", x, y)
        self.mouse("mousePressed", x, y)
        self.mouse("mouseReleased", x, y)

    def screenshot(self) -> np.ndarray:
        from PIL import Image

        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def browser(chromium, tmp_path):
    """A fresh headless Chromium (own profile) and a DevTools client on its first page."""
    argv = [chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "about:blank"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                port = int(m.group(1))
        if port is None:
            pytest.fail(f"Chromium did not start its DevTools endpoint (exit {proc.poll()})")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            targets = json.load(r)
        page = next(t for t in targets if t["type"] == "page")
        dt = DevTools(page["webSocketDebuggerUrl"])
        yield dt
        dt.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


TOKENS = ["[CLS]", "the", "cat", "sat", "on", "the", "mat", "<b>&", "[SEP]"]


@pytest.fixture
def page_maps(tmp_path):
    """A head view of 3 layers x 4 heads, drawn for layers (0, 2), heads (1, 3), rows 2..6."""
    g = torch.Generator().manual_seed(3)
    n = len(TOKENS)
    qk = {}
    for layer in range(3):
        q = torch.randn(1, 4, n, 8, generator=g) * 2
        k = torch.randn(1, 4, n, 8, generator=g) * 2
        qk[layer] = (q, k, {"causal": layer == 2})
    maps = maps_from_qk(qk, TOKENS, layers=[0, 2], heads=[1, 3], rows=range(2, 7))
    path = head_view(maps, tmp_path / "view.html", title="browser test")
    return maps, path


def _lines(dt: DevTools) -> list[dict]:
    return dt.js(
        "[...document.querySelectorAll('#lines line')].map(l => ({head: +l.dataset.head, "
        "row: +l.dataset.row, key: +l.dataset.key, p: +l.dataset.p, "
        "opacity: +l.getAttribute('stroke-opacity')}))"
    )


def _center(dt: DevTools, selector: str) -> tuple[float, float]:
    box = dt.js(
        f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
        ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
    )
    return box[0], box[1]


def test_head_view_renders_offline_and_answers_hover_and_click(browser, page_maps):
    maps, path = page_maps
    dt = browser
    for domain in ("Page", "Network", "Runtime", "Log"):
        dt.call(f"{domain}.enable")
    dt.call("Page.navigate", url=path.as_uri())
    dt.wait_event("Page.loadEventFired")

    # Offline: the only request is the file itself; no script error, no CSP violation.
    urls = [
        e["params"]["request"]["url"]
        for e in dt.events
        if e["method"] == "Network.requestWillBeSent"
    ]
    assert urls == [path.as_uri()], urls
    errors = [e for e in dt.events if e["method"] == "Runtime.exceptionThrown"]
    errors += [
        e
        for e in dt.events
        if e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
    ]
    assert not errors, errors

    # Renders non-blank: tokens, lines in head colours.
    before = dt.screenshot()
    assert before.shape[0] > 100 and before.shape[1] > 100
    non_white = (before < 245).any(axis=-1).mean()
    assert non_white > 0.01, f"page looks blank ({non_white:.4f} of pixels drawn)"
    assert dt.js("document.querySelectorAll('.tok.query').length") == len(TOKENS)
    # Only the requested rows are interactive; the token "<b>&" is text, not markup.
    assert dt.js("document.querySelectorAll('.tok.query.active').length") == 5
    assert dt.js("document.querySelectorAll('.tok.key text')[7].textContent") == "<b>&"
    assert dt.js("document.querySelectorAll('b').length") == 0
    idle = _lines(dt)
    assert idle and {x["head"] for x in idle} == {1, 3}
    assert {x["row"] for x in idle} <= set(range(2, 7))

    # Hover query row 4 (a real mouse move over the token): only its lines, weighted by p.
    x, y = _center(dt, '.tok.query[data-pos="4"] text')
    dt.mouse("mouseMoved", x, y)
    hovered = _lines(dt)
    assert hovered and {x["row"] for x in hovered} == {4}
    w = maps.weights[0]  # layer 0, heads (1, 3), rows 2..6
    for ln in hovered:
        h = maps.heads.index(ln["head"])
        expect = w[h, 4 - 2, ln["key"]]
        assert abs(ln["p"] - expect) < 1e-3 and abs(ln["opacity"] - expect) < 1e-3
    drawn = {(ln["head"], ln["key"]) for ln in hovered}
    for h in range(2):
        for j in range(len(TOKENS)):
            if w[h, 2, j] >= 0.01:
                assert (maps.heads[h], j) in drawn, f"missing line head {maps.heads[h]} key {j}"
    detail = dt.js("document.getElementById('detail').textContent")
    top = TOKENS[int(np.argmax(w[0, 2]))]
    assert "query 4" in detail and f"head 1: {top}" in detail, detail
    after = dt.screenshot()
    assert (after != before).any(), "hovering changed nothing on screen"

    # Click head 3's checkbox off: the lines of head 3 disappear.
    cx, cy = _center(dt, 'input[data-head="1"]')
    dt.click(cx, cy)
    assert dt.js("document.querySelector('input[data-head=\"1\"]').checked") is False
    dt.mouse("mouseMoved", x, y)
    assert {ln["head"] for ln in _lines(dt)} == {1}

    # Pick layer 2 (causal): row 4 reads no key after position 4.
    pick = "const s = document.getElementById('layer'); s.value = '1';"
    dt.js(f"(() => {{ {pick} s.dispatchEvent(new Event('change')); }})()")
    dt.mouse("mouseMoved", x, y)
    causal_lines = _lines(dt)
    assert causal_lines and max(ln["key"] for ln in causal_lines) <= 4
    assert "layer 2" in dt.js("document.getElementById('detail').textContent")

    # Click to pin row 4, then move away: the pinned row stays.
    dt.click(x, y)
    dt.mouse("mouseMoved", 5, 5)
    assert {ln["row"] for ln in _lines(dt)} == {4}


def test_head_view_file_is_self_contained(page_maps):
    """No address the browser could fetch: no src/href attributes, no url(), a strict CSP."""
    _, path = page_maps
    text = path.read_text()
    assert "default-src 'none'" in text
    assert not re.search(r"\b(src|href)\s*=", text)
    assert "url(" not in text and "@import" not in text
    assert "fetch(" not in text and "XMLHttpRequest" not in text
    assert text.count("<script") == 2  # the data and the code, both inline
