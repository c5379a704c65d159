"""ovseg-run --sample --web as a user runs it: the command in its own process, HTTP from this test, and a real
headless Chromium driven by Selenium (Debian's chromium and chromium-driver, which .ci/run installs; without them the
browser test skips saying so). OVSEG_WEB_SCREENSHOT=PATH also writes the browser's screenshot there."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np
import pytest

from ovseg.runtime.pipeline.vocabulary import load_vocabulary

from assertions import eventually

ANNOUNCED = re.compile(r"watch at (http://\S+/); changing the classes there needs the token (\S+) ")
CHROMIUM_FLAGS = (  # headless, and quiet: no first-run, sync, update or QUIC traffic on a closed network
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,700",
)
START_TIMEOUT_S = 300.0  # a loaded machine imports onnxruntime and opens the sessions in far less


@dataclass
class Served:
    """A running ``ovseg-run --web``: its page, its token, its process."""

    url: str
    token: str
    port: int
    process: subprocess.Popen

    def request(self, method: str, path: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            answer = conn.getresponse()
            return answer.status, json.loads(answer.read())
        finally:
            conn.close()


def _announced(process: subprocess.Popen) -> tuple[str, str]:
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        found = ANNOUNCED.search(line)
        if found:
            return found.group(1), found.group(2)
    raise AssertionError("ovseg-run ended without serving: " + " | ".join(line.strip() for line in lines[-3:]))


def _serving(served: Served) -> bool:
    with contextlib.suppress(OSError):
        return served.request("GET", "/health")[0] == 200
    return False


@contextlib.contextmanager
def ovseg_run_web(bundle: Path, *extra: str) -> Iterator[Served]:
    """``ovseg-run --bundle B --sample --loop --web 127.0.0.1:0 --no-show`` with ``extra`` flags, once its first frame
    is served; killed on the way out unless it already ended."""
    command = [str(Path(sys.executable).with_name("ovseg-run")), "--bundle", str(bundle), "--sample", "--loop"]
    command += ["--web", "127.0.0.1:0", "--no-show", *extra]
    env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        with ThreadPoolExecutor(1) as pool:
            url, token = pool.submit(_announced, process).result(timeout=START_TIMEOUT_S)
        served = Served(url, token, int(urlsplit(url).port or 0), process)
        eventually(lambda: _serving(served), "ovseg-run's first frame", START_TIMEOUT_S)
        yield served
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=60)


def open_chromium(profile: Path):
    """Headless Chromium under Selenium, with a fresh profile in ``profile``; skips saying what is missing."""
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed: pip install -e '.[dev]'")
    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("no headless browser here: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))


NEW_CLASSES = ["person", "forklift", "pallet"]


def test_ovseg_run_web_serves_steers_and_stops_cleanly(tiny_bundle):
    with ovseg_run_web(tiny_bundle, "--threads", "1") as served:
        status, record = served.request("GET", "/segments")
        assert status == 200
        assert set(record) == {"seq", "frame", "timestamp", "keyframe", "change", "segments", "timings_ms", "source"}
        assert record["segments"] and {s["label"] for s in record["segments"]} <= set(load_vocabulary("voc21"))

        change = {"mode": "guided", "classes": ", ".join(NEW_CLASSES)}
        assert served.request("POST", "/vocabulary", change)[0] == 401
        status, answer = served.request("POST", "/vocabulary", change, served.token)
        assert status == 200 and answer["mode"] == "guided", answer
        eventually(lambda: served.request("GET", "/segments")[1]["seq"] >= answer["from_seq"], "a frame after it")
        labels = {s["label"] for s in served.request("GET", "/segments")[1]["segments"]}
        assert labels and labels <= set(NEW_CLASSES)

        served.process.send_signal(signal.SIGTERM)
        _, err = served.process.communicate(timeout=120)
        assert served.process.returncode == 143, err
        assert "ovseg-run: terminated" in err and "frames in" in err and "Traceback" not in err
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", served.port), timeout=30)


@pytest.fixture
def chromium(tmp_path):
    driver = open_chromium(tmp_path / "profile")
    try:
        yield driver
    finally:
        driver.quit()


THUMBNAIL = (  # the stream's current frame, as the page shows it, at 32x24
    "const c = document.createElement('canvas'); c.width = 32; c.height = 24;"
    "const g = c.getContext('2d'); g.drawImage(document.getElementById('stream'), 0, 0, 32, 24);"
    "return Array.from(g.getImageData(0, 0, 32, 24).data);"
)


LEGEND = (  # per legend row, read at once: its label and score, its swatch's centre and colour
    "return Array.from(document.querySelectorAll('#legend li')).map((li) => {"
    "const swatch = li.querySelector('.swatch'); const box = swatch.getBoundingClientRect();"
    "return [li.querySelector('.label').textContent, box.x + box.width / 2, box.y + box.height / 2,"
    "getComputedStyle(swatch).backgroundColor]; });"
)


def test_a_browser_watches_and_changes_the_classes(tiny_bundle, chromium, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def text(element_id: str) -> str:
        return chromium.find_element(By.ID, element_id).text

    def legend() -> list[str]:
        return [label.rsplit(" ", 1)[0] for label, *_ in chromium.execute_script(LEGEND)]

    def submit(classes: str) -> None:
        box = chromium.find_element(By.ID, "classes")
        box.clear()
        box.send_keys(classes)
        chromium.find_element(By.ID, "apply").click()

    def says(css: str, part: str) -> bool:
        message = chromium.find_element(By.ID, "message")
        return message.get_attribute("class") == css and part in message.text

    wait = WebDriverWait(chromium, 120, poll_frequency=0.2)
    with ovseg_run_web(tiny_bundle, "--threads", "1") as served:
        chromium.get(served.url)
        wait.until(lambda d: d.execute_script("return document.getElementById('stream').naturalWidth") == 640)
        first = chromium.execute_script(THUMBNAIL)
        wait.until(lambda d: d.execute_script(THUMBNAIL) != first)  # the sample clip pans: the picture changes
        seq = int(text("seq"))
        wait.until(lambda d: int(text("seq")) > seq)
        assert served.request("GET", "/health")[1]["viewers"] == 1
        wait.until(lambda d: legend())
        assert set(legend()) <= set(load_vocabulary("voc21")) and text("mode") == "guidance-free"

        submit(", ".join(NEW_CLASSES))  # no token yet: refused, and the page says why
        wait.until(lambda d: says("error", "needs the token"))
        chromium.find_element(By.ID, "token").send_keys(served.token)
        submit("")
        wait.until(lambda d: says("error", "guided mode needs classes"))
        submit(", ".join(NEW_CLASSES))
        wait.until(lambda d: says("ok", "now guided: person, forklift, pallet"))
        wait.until(lambda d: legend() and set(legend()) <= set(NEW_CLASSES))
        assert text("mode") == "guided: person, forklift, pallet"

        screenshot, shown = b"", None
        while shown is None:  # the page refreshes its legend twice a second: a screenshot between two equal readings
            before = chromium.execute_script(LEGEND)
            screenshot = chromium.get_screenshot_as_png()
            shown = before if chromium.execute_script(LEGEND) == before else None

        chromium.get("about:blank")
        eventually(lambda: served.request("GET", "/health")[1]["viewers"] == 0, "the browser's stream released")

    image = cv2.imdecode(np.frombuffer(screenshot, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[1] >= 1000
    assert shown and {label.rsplit(" ", 1)[0] for label, *_ in shown} <= set(NEW_CLASSES)
    for _, x, y, css in shown:  # the screenshot shows that legend: each swatch's colour where the page drew it
        r, g, b = (int(v) for v in re.findall(r"\d+", css)[:3])
        assert np.abs(image[int(y), int(x)].astype(int) - (b, g, r)).max() <= 2
    (tmp_path / "web.png").write_bytes(screenshot)
    if os.environ.get("OVSEG_WEB_SCREENSHOT"):
        Path(os.environ["OVSEG_WEB_SCREENSHOT"]).write_bytes(screenshot)


def test_without_chromium_the_skip_says_what_to_install(monkeypatch, tmp_path):
    pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[dev]'")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match=r"apt-get install chromium chromium-driver \(.ci/run does\)"):
        open_chromium(tmp_path)
