"""Serving many cameras, measured: frames/s and latency (p50, p99) of 1, 2, 4, 8 concurrent streams through
ovseg-serve (a real tritonserver), next to the in-process Segmenter in the same run, with the batch sizes Triton formed
(from its metrics endpoint).

    python -m ovseg.benchmarks.serving --bundle B [--streams 1,2,4,8] [--frames 30] [--out DIR]

ovseg-serve runs from the serving environment (``make serve-setup``: numpy < 2, which the bundled Triton's Python
backend needs); this script, the client and the in-process Segmenter run here. The in-process Segmenter is measured
before and after the server phases, so load that changed during the run shows as a difference between the two.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from ovseg.cli import add_bundle_argument, positive_int, run_cli, say
from ovseg.runtime import Segmenter
from ovseg.runtime.triton.client import RemoteSegmenter
from ovseg.runtime.triton.protocol import MODEL, ServingError
from ovseg.runtime.triton.server import Ports, wait_ready

from .timing import Stats, environment

PROG = "python -m ovseg.benchmarks.serving"
SERVE_PYTHON = Path(__file__).resolve().parents[1] / ".venv-serve" / "bin" / "python"
READY_TIMEOUT = 600.0  # seconds for ovseg-serve to load its model
WARMUP = 2  # frames per stream before timing (sessions, the first k-means, gRPC channels)
# Targets on a CPU (issue 17): serving adds at most 10% to one stream's latency, and 4 streams together get at least
# the in-process single stream's frames/s.
MAX_LATENCY_OVERHEAD = 1.10
MIN_FOUR_STREAM_THROUGHPUT = 1.0


@dataclass
class Row:
    run: str  # "in-process" or "server"
    streams: int
    frames: int
    fps: float  # all streams together
    p50_ms: float
    p99_ms: float
    mean_batch: float | None = None  # frames per model execution, from Triton's metrics


def pan(frames: int, size: tuple[int, int]) -> list[np.ndarray]:
    """A camera panning across a photo (scikit-image's astronaut, or a texture without it), BGR at ``size`` (w, h)."""
    w, h = size
    try:
        from skimage import data

        photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    except ImportError:
        photo = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8).repeat(8, 0).repeat(8, 1)
    photo = cv2.resize(photo, (w + frames * 4, h + frames * 2))
    return [np.ascontiguousarray(photo[2 * i : 2 * i + h, 4 * i : 4 * i + w]) for i in range(frames)]


def timed(run: Callable[[np.ndarray], object], video: list[np.ndarray]) -> list[float]:
    """Milliseconds ``run`` took on each frame of ``video``."""
    latencies = []
    for frame in video:
        t0 = time.perf_counter()
        run(frame)
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


def in_process(bundle: Path, video: list[np.ndarray], threads: int | None) -> Row:
    with Segmenter.from_bundle(bundle, threads=threads) as seg:
        timed(seg, video[:WARMUP])
        seg.reset()
        start = time.perf_counter()
        stats = Stats.of(timed(seg, video))
        wall = time.perf_counter() - start
    return Row("in-process", 1, len(video), len(video) / wall, stats.p50, stats.p99)


class Server:
    """ovseg-serve run by another environment's ``python`` (the serving one), on free ports (or ``ports``), once its
    model is ready; ``flags``: more ovseg-serve flags. In its own process group, with Ctrl-C's default action (a
    shell's background job would hand it SIGINT ignored)."""

    def __init__(self, bundle: Path, python: Path, log: Path, *flags: str, ports: Ports | None = None):
        self.ports = ports or Ports.free()
        command = [str(python), "-m", "ovseg.runtime.triton.cli", "--bundle", str(bundle), "--log", str(log)]
        command += [a for kind, port in vars(self.ports).items() for a in (f"--{kind}-port", str(port))] + list(flags)
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.url = f"127.0.0.1:{self.ports.grpc}"
        try:
            wait_ready(self.process, "127.0.0.1", self.ports.http, READY_TIMEOUT)
        except ServingError as e:
            out = self.stop(signal.SIGKILL)[1].strip().splitlines()[-1:]
            raise ServingError(f"ovseg-serve {e}: {out}") from None

    def counts(self) -> tuple[float, float]:
        """Triton's (inferences, executions) of the ovseg model so far."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.metrics}/metrics", timeout=5) as r:
            text = r.read().decode()

        def metric(name: str) -> float:
            found = re.search(rf'^{name}{{[^}}]*model="{MODEL}"[^}}]*}} ([0-9.e+]+)$', text, re.M)
            return float(found.group(1)) if found else float("nan")

        return metric("nv_inference_count"), metric("nv_inference_exec_count")

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        """Stop it with ``sig`` (SIGKILL: its whole group); killed if it has not ended in 120 s. (exit code, output)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig) if sig == signal.SIGKILL else self.process.send_signal(sig)
        try:
            out, _ = self.process.communicate(timeout=120)  # tritonserver's exit timeout, then ovseg-serve's kill
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.communicate()
            raise ServingError(f"ovseg-serve did not stop on signal {sig} within 120 s") from None
        return self.process.returncode, out


def served(server: Server, video: list[np.ndarray], streams: int) -> Row:
    with contextlib.closing(RemoteSegmenter([server.url])) as client:
        handles = [client.stream() for _ in range(streams)]
        for h in handles:
            timed(h, video[:WARMUP])
        before = server.counts()
        start = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            latencies = list(pool.map(lambda h: timed(h, video), handles))
        wall = time.perf_counter() - start
        after = server.counts()
    stats = Stats.of([x for per in latencies for x in per])
    executions = after[1] - before[1]
    batch = (after[0] - before[0]) / executions if executions > 0 else None
    return Row("server", streams, streams * len(video), streams * len(video) / wall, stats.p50, stats.p99, batch)


def table(rows: list[Row]) -> str:
    lines = [
        "| run | streams | frames/s (all streams) | p50 ms | p99 ms | frames per encoder run |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        batch = f"{r.mean_batch:.2f}" if r.mean_batch is not None else "1"
        lines.append(f"| {r.run} | {r.streams} | {r.fps:.2f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {batch} |")
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> dict[str, dict]:
    local = [r for r in rows if r.run == "in-process"]
    served = {r.streams: r for r in rows if r.run == "server"}
    out = {}
    if 1 in served:
        ratio = served[1].p50_ms / float(np.mean([r.p50_ms for r in local]))
        out["latency_overhead_1_stream"] = {"ratio": ratio, "target": MAX_LATENCY_OVERHEAD}
        out["latency_overhead_1_stream"]["met"] = ratio <= MAX_LATENCY_OVERHEAD
    if 4 in served:
        ratio = served[4].fps / float(np.mean([r.fps for r in local]))
        out["throughput_4_streams"] = {"ratio": ratio, "target": MIN_FOUR_STREAM_THROUGHPUT}
        out["throughput_4_streams"]["met"] = ratio >= MIN_FOUR_STREAM_THROUGHPUT
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_bundle_argument(p, "bundle to serve and to run in-process")
    p.add_argument("--streams", default="1,2,4,8", help="concurrent stream counts to measure (default 1,2,4,8)")
    p.add_argument("--frames", type=positive_int, default=30, metavar="N", help="timed frames per stream (default 30)")
    p.add_argument("--size", default="640x480", metavar="WxH", help="frame size (default 640x480)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="inference threads, here and in the server")
    p.add_argument("--max-batch", type=positive_int, default=8, metavar="N", help="ovseg-serve --max-batch (default 8)")
    p.add_argument(
        "--serve-python",
        type=Path,
        default=SERVE_PYTHON,
        metavar="PATH",
        help=f"the serving environment's python (default {SERVE_PYTHON})",
    )
    p.add_argument("--out", type=Path, metavar="DIR", help="write serving.json and the server's log here")
    args = p.parse_args(argv)
    try:
        counts = [int(s) for s in args.streams.split(",")]
        size = tuple(int(v) for v in args.size.lower().split("x"))
        assert len(size) == 2 and min(size) > 0 and min(counts) > 0
    except (ValueError, AssertionError):
        p.error("--streams takes counts such as 1,2,4,8 and --size WxH such as 640x480")

    def body() -> int:
        if not args.serve_python.exists():
            raise ServingError(
                f"no serving environment at {args.serve_python}: run `make serve-setup` or pass --serve-python"
            )
        out = args.out or Path(".")
        out.mkdir(parents=True, exist_ok=True)
        video = pan(args.frames + WARMUP, size)
        rows = [in_process(args.bundle, video, args.threads)]
        say(PROG, f"in-process: {rows[0].fps:.2f} frames/s")
        threads = ["--threads", str(args.threads)] if args.threads else []
        server = Server(
            args.bundle, args.serve_python, out / "tritonserver.log", "--max-batch", str(args.max_batch), *threads
        )
        try:
            for n in counts:
                rows.append(served(server, video, n))
                say(PROG, f"server, {n} streams: {rows[-1].fps:.2f} frames/s")
        finally:
            server.stop()
        rows.append(in_process(args.bundle, video, args.threads))
        targets = verdicts(rows)
        command = " ".join([PROG, *(argv if argv is not None else sys.argv[1:])])
        doc = {"rows": [asdict(r) for r in rows], "targets": targets, "environment": environment(args.threads or 0)}
        (out / "serving.json").write_text(json.dumps(doc | {"command": command}, indent=2) + "\n")
        print(table(rows))
        for name, v in targets.items():
            what = f"target {'<=' if 'latency' in name else '>='} {v['target']}"
            print(f"{name}: {v['ratio']:.3f}x ({what}) {'met' if v['met'] else 'MISSED'}")
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
