"""What watching costs: ovseg-run --web's frame rate with nobody watching, with headless Chromium showing the page,
and with a client that only reads the MJPEG stream, in one run of ovseg-run; the phases take turns, so a change in
the machine's load falls on all of them alike.

    .venv/bin/python benchmarks/studies/web_cost.py --bundle DIR [--seconds 20] [--rounds 3] [--json OUT]

A phase's frame rate is the frames ovseg-run published (/health's seq) over the phase's wall time. Chromium runs on
the same machine as ovseg-run, as a browser on the robot itself would; a browser elsewhere costs the robot what the
stream reader costs (one JPEG per frame and the socket writes).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ovseg.cli import positive_int, run_cli, say
from ovseg.environment import cpu_model
from ovseg.errors import OvsegError

PROG = "web_cost"
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
PHASES = ("nobody", "chromium", "stream reader")


class WebCostError(OvsegError, RuntimeError):
    """ovseg-run --web did not start or stopped serving; the message says what it printed."""


class BrowserMissing(OvsegError, RuntimeError):
    """No headless Chromium to drive; the message says what to install."""


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

    def health(self) -> dict:
        return self.request("GET", "/health")[1]


def wait_for(condition: Callable[[], object], what: str, within: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise WebCostError(f"{what} did not happen within {within:.0f} s")
        time.sleep(0.1)


def _announced(process: subprocess.Popen) -> tuple[str, str]:
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        found = ANNOUNCED.search(line)
        if found:
            return found.group(1), found.group(2)
    raise WebCostError("ovseg-run ended without serving: " + " | ".join(line.strip() for line in lines[-3:]))


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
        wait_for(lambda: _serving(served), "ovseg-run's first frame")
        yield served
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=60)


def open_chromium(profile: Path):
    """Headless Chromium under Selenium, with a fresh profile in ``profile``; BrowserMissing says what is missing."""
    try:
        from selenium import webdriver
    except ImportError:
        raise BrowserMissing("selenium is not installed: pip install -e '.[dev]'") from None
    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver_path is None:
        raise BrowserMissing("no headless browser here: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))


class StreamReader:
    """A viewer that reads the MJPEG stream as fast as it comes and throws it away."""

    def __init__(self, port: int):
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self._sock.sendall(b"GET /stream.mjpg HTTP/1.0\r\n\r\n")
        self.bytes = 0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := self._sock.recv(1 << 16):
                self.bytes += len(chunk)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=30)


@dataclass
class Phase:
    watching: str  # one of PHASES
    frames: int
    seconds: float
    cpu_seconds: float  # ovseg-run's user + system time in the phase, all its threads

    @property
    def fps(self) -> float:
        return self.frames / self.seconds

    @property
    def cpu_ms_per_frame(self) -> float:
        return 1000 * self.cpu_seconds / max(1, self.frames)


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _phase(served: Served, watching: str, seconds: float) -> Phase:
    pid = served.process.pid
    start, t0, cpu0 = served.health()["seq"], time.monotonic(), cpu_seconds(pid)
    time.sleep(seconds)
    end, t1, cpu1 = served.health()["seq"], time.monotonic(), cpu_seconds(pid)
    return Phase(watching, end - start, t1 - t0, cpu1 - cpu0)


@contextlib.contextmanager
def _watched(served: Served, watching: str, chromium) -> Iterator[None]:
    """While it lasts, ``watching`` watches: nobody, Chromium on the page, or the stream reader."""
    wait_for(lambda: served.health()["viewers"] == 0, "the last viewer leaving", 60)
    reader = None
    if watching == "chromium":
        chromium.get(served.url)
    elif watching == "stream reader":
        reader = StreamReader(served.port)
    wait_for(lambda: served.health()["viewers"] == (watching != "nobody"), f"{watching} connecting", 60)
    time.sleep(1.0)
    try:
        yield
    finally:
        if watching == "chromium":
            chromium.get("about:blank")
        if reader is not None:
            reader.close()


def measure(bundle: Path, seconds: float, rounds: int, warmup: float, threads: int | None) -> dict:
    """Rounds of the three phases, ``seconds`` each; each round starts one phase later than the one before, so that
    no phase always follows the same one."""
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="ovseg-web-cost-") as tmp:
        extra = ("--threads", str(threads)) if threads else ()
        with ovseg_run_web(bundle, *extra) as served, contextlib.ExitStack() as stack:
            chromium = open_chromium(Path(tmp))
            stack.callback(chromium.quit)
            say(PROG, f"ovseg-run serves {served.url}; warming up for {warmup:.0f} s")
            time.sleep(warmup)
            for round_ in range(rounds):
                for i in range(len(PHASES)):
                    watching = PHASES[(round_ + i) % len(PHASES)]
                    with _watched(served, watching, chromium):
                        phases.append(_phase(served, watching, seconds))
                say(
                    PROG,
                    f"round {round_ + 1}: "
                    + ", ".join(
                        f"{p.watching} {p.fps:.2f} FPS, {p.cpu_ms_per_frame:.1f} CPU ms/frame" for p in phases[-3:]
                    ),
                )
    fps = {
        w: sum(p.frames for p in phases if p.watching == w) / sum(p.seconds for p in phases if p.watching == w)
        for w in PHASES
    }
    return {
        "bundle": str(bundle),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "seconds_per_phase": seconds,
        "rounds": rounds,
        "fps": fps,
        "ratio_to_nobody": {w: fps[w] / fps[PHASES[0]] for w in PHASES[1:]},
        "cpu_ms_per_frame": {
            w: 1000
            * sum(p.cpu_seconds for p in phases if p.watching == w)
            / max(1, sum(p.frames for p in phases if p.watching == w))
            for w in PHASES
        },
        "phases": [asdict(p) | {"fps": p.fps, "cpu_ms_per_frame": p.cpu_ms_per_frame} for p in phases],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"benchmarks/studies/{PROG}.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True, metavar="DIR", help="the bundle ovseg-run segments with")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each phase (default 20)")
    p.add_argument("--rounds", type=positive_int, default=3, help="rounds of the three phases (default 3)")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds before the first phase (default 10)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="ovseg-run --threads")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the phases and frame rates here")
    args = p.parse_args(argv)

    def body() -> int:
        report = measure(args.bundle, args.seconds, args.rounds, args.warmup, args.threads)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(
            f"{report['cpu_model']} ({report['logical_cpus']} logical CPUs), {args.rounds} rounds of {args.seconds:.0f} s"
        )
        for watching in PHASES:
            ratio = report["ratio_to_nobody"].get(watching)
            cpu = report["cpu_ms_per_frame"][watching]
            print(
                f"{watching:<14} {report['fps'][watching]:7.2f} FPS"
                + (f" {ratio:6.3f}x" if ratio else " " * 7)
                + f"  {cpu:7.1f} CPU ms/frame"
            )
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
