"""The HTML report in a real browser: headless Chromium opens every page from file://, every
image loads, nothing is logged to the console, the 3D camera view draws and follows the mouse,
and a screenshot of a page renders.

Chromium is driven through chromedriver's W3C WebDriver HTTP interface with the standard library
(urllib), so the test needs no Python package beyond the project's: only the Debian packages
``chromium`` and ``chromium-driver`` (/usr/bin/chromium, /usr/bin/chromedriver; other locations
via MONO4D_CHROMIUM / MONO4D_CHROMEDRIVER). It skips when they are absent. Nothing is
downloaded and the browser is started without network features.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from mono4d.data.images import read_rgb
from mono4d.pipeline.report import write_report
from tests.test_report import build_workspace

CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1600")


def find_executable(variable: str, *names: str) -> str | None:
    """The program named by the environment ``variable``, else the first of ``names`` on PATH or in /usr/bin."""
    candidates = [os.environ.get(variable, "")] + [shutil.which(name) or f"/usr/bin/{name}" for name in names]
    return next((path for path in candidates if path and os.access(path, os.X_OK)), None)


class WebDriver:
    """The few W3C WebDriver commands the test needs, over chromedriver's HTTP interface."""

    def __init__(self, port: int, session_id: str) -> None:
        self.base = f"http://127.0.0.1:{port}/session/{session_id}"

    @staticmethod
    def call(url: str, method: str = "GET", body: Any = None, timeout: float = 60.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as error:
            raise AssertionError(f"WebDriver {method} {url}: {error.read().decode(errors='replace')[:500]}") from None

    def open(self, path: Path) -> None:
        self.call(f"{self.base}/url", "POST", {"url": path.resolve().as_uri()})

    def script(self, source: str, *args: Any) -> Any:
        return self.call(f"{self.base}/execute/sync", "POST", {"script": source, "args": list(args)})

    def console(self) -> list[dict[str, Any]]:
        """Browser log entries (console messages, failed loads, uncaught errors) since the last call."""
        return self.call(f"{self.base}/se/log", "POST", {"type": "browser"})

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call(f"{self.base}/screenshot")))


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[WebDriver]:
    chromium = find_executable("MONO4D_CHROMIUM", "chromium", "chromium-browser")
    chromedriver = find_executable("MONO4D_CHROMEDRIVER", "chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    driver = subprocess.Popen([chromedriver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                WebDriver.call(f"http://127.0.0.1:{port}/status", timeout=2)
                break
            except (OSError, AssertionError):
                if time.monotonic() > deadline or driver.poll() is not None:
                    pytest.fail("chromedriver did not start")
                time.sleep(0.1)
        profile = tmp_path_factory.mktemp("chromium-profile")
        capabilities = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {"binary": chromium, "args": [*CHROMIUM_ARGS, f"--user-data-dir={profile}"]}}}}
        session = WebDriver.call(f"http://127.0.0.1:{port}/session", "POST", capabilities)
        web = WebDriver(port, session["sessionId"])
        try:
            yield web
        finally:
            WebDriver.call(web.base, "DELETE")
    finally:
        driver.terminate()
        driver.wait(timeout=20)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    from mono4d.data import synthetic

    scene = synthetic.generate(tmp_path_factory.mktemp("browser_scene") / "scene", preset="tiny", seed=0)
    return write_report(build_workspace(tmp_path_factory.mktemp("browser_run") / "run", scene))


def wait_for_images(browser: WebDriver, timeout: float = 20.0) -> list[list[Any]]:
    """Wait until every image finished loading; returns ``[src, naturalWidth]`` of all of them."""
    deadline = time.monotonic() + timeout
    while True:
        images = browser.script("return Array.from(document.images).map(i => [i.src, i.complete, i.naturalWidth]);")
        if all(complete for _, complete, _ in images) or time.monotonic() > deadline:
            return [[src, width] for src, _, width in images]
        time.sleep(0.05)


def test_every_page_loads_every_image_without_console_errors(browser, report):
    pages = sorted(report.parent.glob("*.html"))
    assert len(pages) >= 9
    for page in pages:
        browser.open(page)
        images = wait_for_images(browser)
        broken = [src for src, width in images if width == 0]
        assert not broken, f"{page.name}: images that did not load: {broken}"
        problems = [entry for entry in browser.console() if entry["level"] in ("SEVERE", "WARNING")]
        assert not problems, f"{page.name}: console: {problems}"
        assert browser.script("return document.querySelector('nav a') !== null;")


def wait_for_videos(browser: WebDriver, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Wait until every ``<video>`` has its first frame (readyState >= 2) or failed; returns each
    one's src, readyState, size and MediaError code (null when none)."""
    deadline = time.monotonic() + timeout
    while True:
        videos = browser.script("""return Array.from(document.querySelectorAll('video')).map(v => ({
            src: v.currentSrc || v.src, ready: v.readyState, width: v.videoWidth, height: v.videoHeight,
            error: v.error ? v.error.code : null}));""")
        if all(video["ready"] >= 2 or video["error"] for video in videos) or time.monotonic() > deadline:
            return videos


def test_videos_play_in_the_browser(browser, report):
    """The H.264 MP4s written by data/video.py load in Chromium's <video> (Debian's Chromium
    decodes H.264 through its bundled FFmpeg) and their first frame has the video's size."""
    from tests.test_report import decode

    seen = 0
    for page in sorted(report.parent.glob("*.html")):
        browser.open(page)
        for video in wait_for_videos(browser):
            assert video["error"] is None and video["ready"] >= 2, f"{page.name}: {video}"
            _, _, width, height = decode(Path(urllib.request.url2pathname(video["src"].removeprefix("file://"))))
            assert (video["width"], video["height"]) == (width, height), f"{page.name}: {video}"
            seen += 1
    assert seen >= 2  # tracks.mp4 and train/novel_view.mp4
    assert browser.script("""const v = document.createElement('video');
        return v.canPlayType('video/mp4; codecs="avc1.640028"');""") in ("probably", "maybe")


def test_camera_view_draws_and_orbits_with_the_mouse(browser, report, tmp_path):
    browser.open(report.parent / "cameras.html")
    wait_for_images(browser)
    read_canvas = """
        const canvas = document.querySelector('canvas.orbit');
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let drawn = 0, sum = 0;
        for (let k = 0; k < data.length; k += 4) {
            if (data[k] < 250 || data[k + 1] < 250 || data[k + 2] < 250) drawn++;
            sum += (k / 4 % 997) * data[k];
        }
        return [drawn, sum];"""
    drawn, before = browser.script(read_canvas)
    assert drawn > 2000  # sparse points and frusta, not a blank canvas
    browser.script("""
        const canvas = document.querySelector('canvas.orbit');
        const box = canvas.getBoundingClientRect();
        const at = (type, dx) => new MouseEvent(type, {clientX: box.left + 100 + dx, clientY: box.top + 100,
                                                       bubbles: true});
        canvas.dispatchEvent(at('mousedown', 0));
        window.dispatchEvent(at('mousemove', 80));
        window.dispatchEvent(at('mouseup', 80));""")
    _, after = browser.script(read_canvas)
    assert after != before  # the view turned
    assert not [entry for entry in browser.console() if entry["level"] == "SEVERE"]


def test_screenshot_of_a_stage_page(browser, report, tmp_path):
    browser.open(report.parent / "depth.html")
    wait_for_images(browser)
    shot = Path(os.environ.get("MONO4D_REPORT_SCREENSHOT", tmp_path / "depth.png"))
    browser.screenshot(shot)
    image = read_rgb(shot)
    assert image.shape[0] > 500 and image.shape[1] > 800
    assert image.std() > 20  # pictures, not an empty page
    # the turbo colours of the depth pictures are on screen
    assert (np.abs(image.astype(int) - image.mean(axis=2, keepdims=True)) > 60).any(axis=2).mean() > 0.02
