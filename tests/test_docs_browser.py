"""The built documentation in a real browser: headless Chromium at 1280 and 400 px.

Every page of the HTML build is loaded at both widths (400 px as a phone:
mobile viewport, touch-sized) and fails the test when

- the page is wider than the window (``scrollWidth`` beyond the viewport),
  or any element reaches past either edge of the window without a
  scrolling box (``overflow-x`` other than ``visible``) between it and the
  page;
- a code block needs a horizontal scrollbar (the pages wrap code, so that
  the end of a long line is never hidden);
- an image, stylesheet, script or other resource fails to load, or an
  ``<img>`` (an SVG file included) has no picture;
- the page logs a console error or throws.

A PNG of each page at each width (its first :data:`SHOT_HEIGHT` pixels) is
kept in ``docs/_build/screenshots/`` for CI to keep as an artifact.

The browser is Debian's ``chromium`` (``.ci/run`` installs it), driven over
the Chrome DevTools protocol on a pipe (``--remote-debugging-pipe``), with
the standard library only. Where it is absent, or the docs toolchain is
not installed, the tests are skipped, saying which.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import test_docs

SHOTS = test_docs.DOCS / "_build" / "screenshots"
WIDTHS = (1280, 400)
HEIGHT = {1280: 900, 400: 800}
#: How much of each page the kept screenshot shows, in CSS pixels from the top: about
#: three screens, and all the shots together stay well below the 64 MiB disk onto
#: which the Intel guest copies the checkout, docs/_build included.
SHOT_HEIGHT = 3000
#: Seconds for one page to load, and for the browser to start or answer.
TIMEOUT = 60.0

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",  # the same layout width with and without overlay scrollbars
    "--remote-debugging-pipe",
)


def find_chromium() -> str | None:
    """Debian's ``chromium`` (or another Chromium-based browser on PATH)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _high_pipe() -> tuple[int, int]:
    """A pipe whose two ends are descriptors 10 or above (close-on-exec)."""
    low = os.pipe()
    try:
        return tuple(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in low)  # type: ignore[return-value]
    finally:
        for fd in low:
            os.close(fd)


class BrowserError(RuntimeError):
    """The browser died, did not answer in time, or answered a command with an error."""


class Browser:
    """A headless Chromium driven over the DevTools protocol on a pipe.

    Chromium reads commands from its descriptor 3 and writes answers and
    events to descriptor 4, one JSON message each, ended by a NUL byte.
    """

    def __init__(self, executable: str, profile: Path) -> None:
        to_browser_r, self._to_browser = _high_pipe()
        self._from_browser, from_browser_w = _high_pipe()
        # The child gets the pipes as its 3 and 4; numbers from 10 up here, so that
        # moving one to 3 cannot overwrite the other.
        script = (
            f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w} '
            f"{to_browser_r}<&- {from_browser_w}>&-"
        )
        # bash, not sh: dash takes only one-digit descriptors in a redirection.
        argv = ["/bin/bash", "-c", script, executable, *CHROMIUM_FLAGS]
        argv.append(f"--user-data-dir={profile}")
        argv.append("about:blank")
        self._process = subprocess.Popen(
            argv,
            pass_fds=(to_browser_r, from_browser_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []

    # --- the protocol --------------------------------------------------------------

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("no answer from the browser in time")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise BrowserError(f"the browser exited: {self._stderr_tail()}")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        parsed: dict[str, Any] = json.loads(message)
        return parsed

    def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        """Send one command and wait for its answer; events on the way are kept."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        try:
            os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise BrowserError(f"the browser exited: {self._stderr_tail()}") from None
        deadline = time.monotonic() + TIMEOUT
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer.get("result", {})
                return result
            if "method" in answer:
                self._events.append(answer)

    def wait_for(self, event: str, session: str) -> dict[str, Any]:
        """Wait for ``event`` from ``session``; the events before it stay in :meth:`events`."""
        deadline = time.monotonic() + TIMEOUT
        seen = 0
        while True:
            for message in self._events[seen:]:
                if message["method"] == event and message.get("sessionId") == session:
                    return message
            seen = len(self._events)
            self._events.append(self._read_message(deadline))

    def events(self) -> list[dict[str, Any]]:
        """The events received so far, which are then forgotten."""
        out, self._events = self._events, []
        return out

    def _stderr_tail(self) -> str:
        if self._process.poll() is None or self._process.stderr is None:
            return "still running"
        return self._process.stderr.read().decode(errors="replace")[-2000:]

    def close(self) -> None:
        # A browser that already died has nothing to close.
        with contextlib.suppress(BrowserError, OSError):
            self.send("Browser.close")
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        if self._process.stderr is not None:
            self._process.stderr.close()


# --- one page ---------------------------------------------------------------------------

#: Run in the page once it has loaded; returns what the checks need, as JSON.
CHECK_SCRIPT = r"""
(() => {
  const root = document.documentElement;
  const width = root.clientWidth;
  const scrolls = (el) => {
    for (let up = el.parentElement; up && up !== document.body; up = up.parentElement) {
      if (getComputedStyle(up).overflowX !== "visible") return true;
    }
    return false;
  };
  const name = (el) => {
    let text = el.tagName.toLowerCase();
    if (el.id) text += "#" + el.id;
    for (const c of el.classList) text += "." + c;
    const words = (el.textContent || "").trim().replace(/\s+/g, " ").slice(0, 60);
    return words ? `${text} "${words}"` : text;
  };
  // Elements past an edge: their box, or content spilling from a box that
  // does not scroll (nowrap text), outside any scrolling box of the page.
  const found = [];
  for (const el of document.body.querySelectorAll("*")) {
    const box = el.getBoundingClientRect();
    if (box.width === 0 && box.height === 0) continue;
    const spill = getComputedStyle(el).overflowX === "visible" ? el.scrollWidth : 0;
    const right = Math.max(box.right, box.left + spill);
    if (right <= width + 0.5 && box.left >= -0.5) continue;
    if (scrolls(el)) continue;
    found.push({el: el, box: box, right: right,
                own: box.right > width + 0.5 || box.left < -0.5});
  }
  // Name each culprit once: the outermost box that is too wide, or else the
  // innermost element whose own content spills.
  const wide = new Set(found.filter((f) => f.own).map((f) => f.el));
  const over = [];
  for (const f of found) {
    if (f.own) {
      let up = f.el.parentElement;
      while (up && !wide.has(up)) up = up.parentElement;
      if (up) continue;
    } else if (found.some((g) => g.el !== f.el && f.el.contains(g.el))) {
      continue;
    }
    over.push(`${name(f.el)}: ${Math.round(f.box.left)}..${Math.round(f.right)} px`);
  }
  // Code with its end behind a scrollbar: the layout wraps code instead.
  const cut = [];
  for (const pre of document.querySelectorAll("pre")) {
    if (pre.scrollWidth > pre.clientWidth + 1) cut.push(name(pre));
  }
  const images = [];
  for (const img of document.images) {
    if (!img.complete || img.naturalWidth === 0) images.push(img.currentSrc || img.src);
  }
  return JSON.stringify({
    width: width,
    scrollWidth: root.scrollWidth,
    height: root.scrollHeight,
    overflowing: over,
    cutCode: cut,
    brokenImages: images,
  });
})()
"""


@dataclass
class PageReport:
    """What one page did at one width; ``problems`` is empty when it passes."""

    page: str
    width: int
    problems: list[str] = field(default_factory=list)


def _console_problems(events: list[dict[str, Any]], session: str) -> list[str]:
    """Console errors, uncaught exceptions and failed loads among a page's events."""
    out = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        params = event.get("params", {})
        method = event["method"]
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            out.append(f"console.{params['type']}: {args}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            out.append(f"uncaught exception: {text}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            out.append(
                f"console error ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}"
            )
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            out.append(f"failed to load ({params.get('type')}): {params.get('errorText')}")
    return out


def check_page(
    browser: Browser, session: str, url: str, width: int, shot: Path | None
) -> list[str]:
    """Load ``url`` at ``width`` and return its problems (see the module docstring)."""
    mobile = width < 600
    browser.send(
        "Emulation.setDeviceMetricsOverride",
        {
            "width": width,
            "height": HEIGHT.get(width, 900),
            "deviceScaleFactor": 1,
            "mobile": mobile,
        },
        session,
    )
    browser.events()
    browser.send("Page.navigate", {"url": url}, session)
    browser.wait_for("Page.loadEventFired", session)
    # Web fonts and late layout: wait for fonts, then two animation frames.
    browser.send(
        "Runtime.evaluate",
        {
            "expression": "document.fonts.ready.then(() => new Promise(r => "
            "requestAnimationFrame(() => requestAnimationFrame(r))))",
            "awaitPromise": True,
        },
        session,
    )
    answer = browser.send(
        "Runtime.evaluate", {"expression": CHECK_SCRIPT, "returnByValue": True}, session
    )
    if "exceptionDetails" in answer:
        raise BrowserError(f"the check script failed: {answer['exceptionDetails']}")
    facts = json.loads(answer["result"]["value"])
    problems = _console_problems(browser.events(), session)
    if facts["scrollWidth"] > facts["width"]:
        problems.append(
            f"the page is {facts['scrollWidth']} px wide in a {facts['width']} px window"
        )
    problems += [f"overflows the window: {o}" for o in facts["overflowing"]]
    problems += [f"code hidden behind a scrollbar: {c}" for c in facts["cutCode"]]
    problems += [f"image did not load: {src}" for src in facts["brokenImages"]]
    if shot is not None:
        height = max(1, min(int(facts["height"]), SHOT_HEIGHT))
        clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
        png = browser.send(
            "Page.captureScreenshot",
            {"format": "png", "clip": clip, "captureBeyondViewport": True},
            session,
        )
        shot.parent.mkdir(parents=True, exist_ok=True)
        shot.write_bytes(base64.b64decode(png["data"]))
    return problems


@pytest.fixture(scope="module")
def browser() -> Iterator[tuple[Browser, str]]:
    executable = find_chromium()
    if executable is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    with tempfile.TemporaryDirectory(prefix="kvmstate-chromium-") as profile:
        b = Browser(executable, Path(profile))
        try:
            target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
                "sessionId"
            ]
            for domain in ("Page", "Runtime", "Log", "Network"):
                b.send(f"{domain}.enable", {}, session)
            yield b, session
        finally:
            b.close()


def _pages(html: Path) -> list[Path]:
    return sorted(html.rglob("*.html"))


@pytest.fixture(scope="module")
def shots() -> Path:
    """The screenshot folder, emptied once per run so that no old picture is kept."""
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    return SHOTS


@pytest.mark.parametrize("width", WIDTHS)
def test_every_page_fits_and_loads(browser: tuple[Browser, str], shots: Path, width: int) -> None:
    """Every page of the build: nothing past the window, everything loaded, no error."""
    html = test_docs.built_html()
    b, session = browser
    pages = _pages(html)
    # Each Markdown page, the index pages, and the highlighted sources.
    assert {p.relative_to(html).with_suffix(".md").as_posix() for p in pages} >= {
        p.name for p in test_docs.PAGES
    }
    failures = []
    for page in pages:
        name = page.relative_to(html).with_suffix("").as_posix()
        shot = shots / f"{name.replace('/', '.')}-{width}.png"
        problems = check_page(b, session, page.as_uri(), width, shot)
        failures += [f"{name}.html at {width} px: {p}" for p in problems]
        assert shot.stat().st_size > 1000, shot
    assert not failures, "\n".join(failures)


#: Pages that the checks must pass or fail, and the problems each must report.
SYNTHETIC = {
    "fits.html": ("<p>Short text.</p><pre>short code</pre>", []),
    "wide.html": (
        '<div id="wide" style="width: 2000px">x</div>',
        ["the page is 2000 px wide", 'overflows the window: div#wide "x": 0..2000 px'],
    ),
    "spills.html": (
        '<p id="long" style="white-space: nowrap">' + "word " * 400 + "</p>",
        ["the page is", 'overflows the window: p#long "word word'],
    ),
    "scrolls.html": (
        '<div style="overflow-x: auto"><table><tr><td style="width: 3000px">x</td></tr></table>'
        "</div>",
        [],
    ),
    "cut.html": (
        '<pre style="white-space: pre; overflow-x: auto">' + "x" * 1000 + "</pre>",
        ["code hidden behind a scrollbar: pre"],
    ),
    "image.html": (
        '<img src="missing.svg" alt="a map">',
        ["image did not load:", "failed to load"],
    ),
    "error.html": ("<script>console.error('broken', 42)</script>", ["console.error: broken 42"]),
    "throws.html": ("<script>null.x</script>", ["uncaught exception: TypeError"]),
}


@pytest.mark.parametrize("page", sorted(SYNTHETIC))
@pytest.mark.parametrize("width", WIDTHS)
def test_the_checks_catch_each_problem(
    browser: tuple[Browser, str], tmp_path: Path, page: str, width: int
) -> None:
    """The checks above on small pages made to break them, so that they cannot pass idly."""
    body, expected = SYNTHETIC[page]
    path = tmp_path / page
    head = '<meta name="viewport" content="width=device-width, initial-scale=1">'
    path.write_text(
        f"<!DOCTYPE html><html><head>{head}</head><body style='margin: 0'>{body}</body></html>"
    )
    b, session = browser
    problems = check_page(b, session, path.as_uri(), width, None)
    if not expected:
        assert problems == []
    for text in expected:
        assert any(text in p for p in problems), (text, problems)
