"""Video throughput: ``ovseg-run`` end to end on a generated clip (decode, segment, overlay, save), with and without keyframe reuse.

Each run is its own process, as a user would start it; the frame rate is ovseg-run's own count
(frames / time from the first frame to the last), the wall time includes opening the bundle.
Both runs write per-frame label maps, and their labels are compared pixel by pixel.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ovseg.errors import OvsegError

COUNTS = re.compile(r"(\d+) frames in ([\d.]+) s \(([\d.]+) FPS\)")
STAGE_ROW = re.compile(r"^(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")


@dataclass
class VideoRun:
    keyframe_interval: int
    frames: int
    fps: float  # ovseg-run's count: capture + segment + overlay + save, first frame to last
    wall_s: float  # process start to exit: imports, bundle check, sessions, the loop, closing the video
    mean_ms: dict[str, float]  # ovseg-run's per-stage means
    peak_rss_mb: float  # VmHWM polled every 0.2 s (0 where /proc is missing)
    command: list[str] = field(default_factory=list)


@dataclass
class VideoThroughput:
    clip: str
    frame: tuple[int, int]
    runs: list[VideoRun]
    agreement: float  # per-pixel label agreement, keyframe reuse vs every frame
    speedup: float  # fps with reuse / fps without


def run_ovseg(bundle: Path, clip: Path, out: Path, frames: int, threads: int, interval: int) -> VideoRun:
    out.mkdir(parents=True, exist_ok=True)
    options = f"--no-show --max-frames {frames} --threads {threads} --keyframe-interval {interval}".split()
    cmd = [sys.executable, "-m", "ovseg.runtime.tools.run", "--bundle", str(bundle), "--video", str(clip), *options]
    cmd += ["--save", str(out / "overlay.mp4"), "--save-dir", str(out / "frames")]
    log = out / "stderr.txt"
    start = time.perf_counter()
    peak_kib = 0
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        while proc.poll() is None:
            peak_kib = max(peak_kib, _vm_hwm_kib(proc.pid))
            time.sleep(0.2)
    wall = time.perf_counter() - start
    text = log.read_text()
    counts = COUNTS.search(text)
    if proc.returncode != 0 or counts is None:
        lines = [line for line in text.splitlines() if line.strip()]
        raise OvsegError(f"ovseg-run exited {proc.returncode}: {lines[-1] if lines else 'no output'}")
    means = {
        m.group(1): float(m.group(2)) for m in map(STAGE_ROW.match, text.splitlines()) if m and m.group(1) != "stage"
    }
    return VideoRun(
        interval, int(counts.group(1)), float(counts.group(3)), round(wall, 2), means, round(peak_kib / 1024, 1), cmd
    )


def _vm_hwm_kib(pid: int) -> int:
    """The process's own peak RSS (VmHWM, reset at exec, unlike ru_maxrss which a child inherits from its forking parent)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def frame_labels(frames_dir: Path) -> tuple[list[str], np.ndarray]:
    """ovseg-run --save-dir's frames: the label names, and each frame's per-pixel index into them (-1: no label)."""
    names: dict[str, int] = {}
    maps = []
    for record in sorted(frames_dir.glob("frame_*.json")):
        meta = json.loads(record.read_text())
        ids = cv2.imread(str(frames_dir / meta["label_map"]), cv2.IMREAD_UNCHANGED).astype(np.int64)
        lut = np.full(ids.max() + 1, -1, np.int64)
        for sid, name in meta["labels"].items():
            if int(sid) < len(lut):
                lut[int(sid)] = names.setdefault(name, len(names))
        maps.append(lut[ids])
    if not maps:
        raise OvsegError(f"no frames in {frames_dir}")
    return list(names), np.stack(maps)


def label_agreement(a: tuple[list[str], np.ndarray], b: tuple[list[str], np.ndarray]) -> float:
    """The fraction of pixels with the same label in the frames both runs have, each run given as its label names and
    its frames' per-pixel indices into them (-1: no label)."""
    shared = {n: i for i, n in enumerate(dict.fromkeys([*a[0], *b[0]]))}
    frames = min(len(a[1]), len(b[1]))
    la, lb = (np.array([*(shared[n] for n in names), -1], np.int32)[maps[:frames]] for names, maps in (a, b))
    return float(np.mean(la == lb))


def measure_video(bundle: Path, clip: Path, workdir: Path, frames: int, threads: int, interval: int) -> VideoThroughput:
    """Every-frame run, then the keyframe-reuse run (the order is fixed; timings are noisy: see the load average)."""
    every_dir, reuse_dir = workdir / "every-frame", workdir / f"keyframe-{interval}"
    every = run_ovseg(bundle, clip, every_dir, frames, threads, 1)
    reuse = run_ovseg(bundle, clip, reuse_dir, frames, threads, interval)
    agree = label_agreement(frame_labels(every_dir / "frames"), frame_labels(reuse_dir / "frames"))
    cap = cv2.VideoCapture(str(clip))
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    cap.release()
    return VideoThroughput(str(clip), size, [every, reuse], agree, reuse.fps / every.fps if every.fps else float("nan"))
