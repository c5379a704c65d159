"""Several cameras on one machine: a process per camera (a node each) against one process batching them.

    python -m ovseg.benchmarks.cameras [--bundle B] [--cameras 2,4] [--frames 40] [--rounds 5]

Each camera plays 640x480 frames (scikit-image's astronaut, shifted per camera and frame, sensor noise sigma 3) as
fast as they go, after 3 warm-up frames. Modes, interleaved in every round: a process per camera with a Segmenter of
its own (all of them started together once every one has warmed up); one process with one Segmenter taking a
round of N frames in one ``Segmenter.batch``; the same process taking them one at a time through each camera's
stream; each with one session thread and with all cores. Prints frames per second over all cameras and the p50 / p99
ms of a frame (a process per camera) or of a round (one process), medians of the rounds. Without --bundle: the
tests' tiny bundle, exported once into $OVSEG_HOME/bench (docs/DESIGN.md, "Several cameras on ROS 2").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ovseg.cli import positive_int, run_cli, say
from ovseg.constants import ovseg_home
from ovseg.errors import OvsegError

PROG = "ovseg-bench-cameras"
WARMUP = 3


def counts(text: str) -> list[int]:
    """argparse type: "2,4" -> [2, 4]."""
    return [positive_int(n) for n in text.split(",")]


def frames_of(camera: int, n: int) -> list[np.ndarray]:
    import cv2
    from skimage import data

    base = cv2.resize(data.astronaut()[:, :, ::-1], (640, 480))
    rng = np.random.default_rng(camera)
    shifted = (np.roll(base, 4 * i + 50 * camera, axis=1) + rng.normal(0, 3, base.shape) for i in range(n))
    return [np.clip(f, 0, 255).astype(np.uint8) for f in shifted]


def open_segmenter(bundle: Path, threads: int):
    from ovseg import _native
    from ovseg.runtime import Segmenter

    if threads:
        _native.set_num_threads(threads)
    return Segmenter.from_bundle(bundle, backend="cpu", threads=threads or None)


def timed(step, rounds: range) -> tuple[float, list[float]]:
    """Seconds for all ``rounds`` of ``step`` and each one's seconds."""
    lat = []
    start = time.perf_counter()
    for i in rounds:
        t = time.perf_counter()
        step(i)
        lat.append(time.perf_counter() - t)
    return time.perf_counter() - start, lat


def camera_process(bundle: Path, camera: int, threads: int, frames: int) -> None:
    """One camera in a process of its own: says "ready" once warm, waits for a line on stdin, then prints its
    elapsed seconds and per-frame latencies as JSON."""
    seg, video = open_segmenter(bundle, threads), frames_of(camera, frames + WARMUP)
    stream = seg.stream()
    for frame in video[:WARMUP]:
        stream(frame)
    print("ready", flush=True)
    sys.stdin.readline()
    elapsed, lat = timed(lambda i: stream(video[i]), range(WARMUP, frames + WARMUP))
    print(json.dumps({"elapsed": elapsed, "lat": lat}))


def processes(bundle: Path, n: int, threads: int, frames: int) -> tuple[float, list[float]]:
    argv = [sys.executable, "-m", "ovseg.benchmarks.cameras", "--worker", str(bundle), str(threads), str(frames)]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    children = [subprocess.Popen([*argv, str(c)], **pipes) for c in range(n)]
    for child in children:
        if child.stdout.readline().strip() != "ready":
            raise OvsegError(f"a camera's process exited before it was ready (status {child.wait()})")
    for child in children:  # every one starts before any is waited for
        child.stdin.write("go\n")
        child.stdin.flush()
    done = [json.loads(child.communicate()[0]) for child in children]
    return n * frames / max(d["elapsed"] for d in done), [x for d in done for x in d["lat"]]


def one_process(bundle: Path, n: int, threads: int, frames: int, batched: bool) -> tuple[float, list[float]]:
    seg = open_segmenter(bundle, threads)
    videos = [frames_of(c, frames + WARMUP) for c in range(n)]
    streams = [seg.stream() for _ in range(n)]

    def step(i: int) -> None:
        if batched:
            seg.batch([v[i] for v in videos], [s.state for s in streams])
        else:
            for video, stream in zip(videos, streams):
                stream(video[i])

    timed(step, range(WARMUP))
    elapsed, lat = timed(step, range(WARMUP, frames + WARMUP))
    seg.close()
    return n * frames / elapsed, lat


def run(args: argparse.Namespace) -> int:
    from .soak import tiny_bundle

    bundle = args.bundle or tiny_bundle(ovseg_home() / "bench", lambda m: say(PROG, m))
    modes = [  # (name, a process per camera?, batched?, session threads: 0 all cores)
        (f"{where}, {label}", where == "process per camera", where.endswith("batch"), threads)
        for threads, label in ((1, "1 thread"), (0, "all threads"))
        for where in ("process per camera", "one process, batch", "one process, one frame at a time")
    ]
    for n in args.cameras:
        rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name, *_ in modes}
        for r in range(args.rounds):
            for name, apart, batched, threads in modes:
                if apart:
                    fps, lat = processes(bundle, n, threads, args.frames)
                else:
                    fps, lat = one_process(bundle, n, threads, args.frames, batched)
                rows[name].append((fps, 1000 * float(np.median(lat)), 1000 * float(np.percentile(lat, 99))))
                say(PROG, f"{n} cameras, round {r + 1}: {name}: {fps:.1f} fps")
        print(f"\n{n} cameras, {args.frames} frames each, medians of {args.rounds} rounds: fps, p50 ms / p99 ms")
        for name, values in rows.items():
            fps, p50, p99 = (statistics.median(v[i] for v in values) for i in range(3))
            print(f"| {name} | {fps:.1f} | {p50:.1f} / {p99:.1f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        bundle, threads, frames, camera = argv[1:]
        camera_process(Path(bundle), int(camera), int(threads), int(frames))
        return 0
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="bundle to run (default: the tests' tiny bundle)")
    p.add_argument("--cameras", type=counts, default=[2, 4], metavar="N,M", help="camera counts (2,4)")
    p.add_argument("--frames", type=positive_int, default=40, help="frames per camera and round (40)")
    p.add_argument("--rounds", type=positive_int, default=5, help="rounds (5)")
    args = p.parse_args(argv)
    return run_cli(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
