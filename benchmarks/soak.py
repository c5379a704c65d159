"""ovseg-bench --soak N: a long run through one Segmenter, for leaks and slow-downs.

N frames of a moving video (the sample clip's pan, played back and forth) go through one Segmenter. The run is cut
into periods (1,000 frames, fewer when N is small) that all do the same things at the same frames: the frame size
changes three times, the vocabulary is swapped twice, and guided classes come and go once. The process's RSS is
sampled every few frames and each frame's latency is kept. The first period is warm-up; the verdicts compare the end
of the run with the end of warm-up (RSS growth) and the last period's p99 latency with the second's (drift), periods
that did exactly the same work.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ovseg.environment import machine_key
from ovseg.runtime.config import SegmenterConfig

from .report import Target, render, targets_table
from .targets import SOAK_MAX_P99_DRIFT, SOAK_MAX_RSS_GROWTH
from .timing import peak_rss_mb

PERIOD = 1000  # frames; a soak of N frames has min(PERIOD, N // 4) per period
SIZES = ((640, 480), (320, 240), (800, 600))  # frame sizes (W, H), one after the other within each period
VOCABULARIES = (
    ["person", "dog", "cat", "car", "tree", "sky", "road", "building", "grass", "water"],
    ["chair", "table", "cup", "bottle", "laptop", "floor", "wall", "window", "door", "lamp", "plant", "book"],
)
CLASSES = (["person", "background"], ["cat", "dog", "sofa"])
RSS_EVERY = 25  # frames between RSS samples
MIN_FRAMES = 8  # at least two frames per period


@dataclass
class SoakPlan:
    frames: int
    period: int

    @classmethod
    def of(cls, frames: int) -> SoakPlan:
        return cls(frames, max(2, min(PERIOD, frames // 4)))

    def size(self, i: int) -> tuple[int, int]:
        return SIZES[(i % self.period) * len(SIZES) // self.period]

    def action(self, i: int) -> str | None:
        """What changes before frame ``i``: "vocabulary", "classes", "free" (classes off) or nothing."""
        p, half, quarter = i % self.period, self.period // 2, self.period // 4
        if p in (0, half) and i > 0:
            return "vocabulary"
        if p == quarter:
            return "classes"
        if p == quarter + max(1, self.period // 8):
            return "free"
        return None


def rss_mib() -> float | None:
    """This process's resident set now (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def video(count: int = 60) -> list[np.ndarray]:
    """The sample clip's pan (640x480), read once."""
    from ovseg.runtime.io.sources import VideoFileSource, sample_clip

    with tempfile.TemporaryDirectory(prefix="ovseg-soak-") as tmp:
        with VideoFileSource(sample_clip(Path(tmp) / "pan.mp4", seconds=count / 15)) as source:
            return [f.image for f in source]


def frame_at(pan: list[np.ndarray], i: int, size: tuple[int, int]) -> np.ndarray:
    """Frame ``i`` of the pan played back and forth, at ``size``."""
    n = len(pan)
    k = i % (2 * n - 2) if n > 1 else 0
    image = pan[k if k < n else 2 * n - 2 - k]
    return image if image.shape[1::-1] == size else cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def tiny_bundle(cache: Path, say) -> Path:
    """The tests' tiny bundle (tiny CLIP, seeded random tiny DINOv2, 112 px, VOC-21), exported once into the cache by
    a process of its own, so that torch never loads into the process being soaked."""
    from ovseg.runtime.bundle.manifest import BundleError, read_manifest

    out = cache / "soak-tiny"
    try:
        read_manifest(out)
        return out
    except BundleError:
        pass
    say(f"exporting the tiny test bundle into {out} (once; cached afterwards)")
    child = multiprocessing.get_context("spawn").Process(target=_export_tiny, args=(out,))
    child.start()
    child.join()
    read_manifest(out)  # a failed export leaves no bundle: one line saying so
    return out


def _export_tiny(out: Path) -> None:
    from ovseg.export import dinov2 as dino
    from ovseg.export.bundle import ExportConfig, export_bundle
    from ovseg.export.clip import tiny_clip

    cfg = ExportConfig(out=out, force=True, image_size=112, vocab="voc21")
    export_bundle(cfg, clip_model=tiny_clip(), dinov2_model=dino.random_dinov2(dino.tiny_dinov2_config()))


def run(bundle: Path, frames: int, threads: int | None, say) -> dict:
    """Soak ``bundle`` for ``frames`` frames; the JSON-ready record of the run."""
    from ovseg.runtime.segmenter import Segmenter

    plan = SoakPlan.of(frames)
    pan = video()
    latency = np.zeros(frames)
    rss: list[tuple[int, float]] = []
    actions = {"vocabulary": 0, "classes": 0, "free": 0}
    swap_ms: list[float] = []
    say(f"soak: {frames} frames through one Segmenter, periods of {plan.period} frames; RSS every {RSS_EVERY}")
    started = time.perf_counter()
    cpu0 = time.process_time()
    with Segmenter.from_bundle(bundle, threads=threads, config=SegmenterConfig(precision="fp32")) as seg:
        for i in range(frames):
            action = plan.action(i)
            if action is not None:
                actions[action] += 1
                t0 = time.perf_counter()
                if action == "vocabulary":
                    seg.set_vocabulary(VOCABULARIES[actions["vocabulary"] % 2])
                else:  # a class list, or none ("free")
                    seg.set_classes(CLASSES[(i // plan.period) % 2] if action == "classes" else None)
                swap_ms.append((time.perf_counter() - t0) * 1000)
            image = frame_at(pan, i, plan.size(i))
            t0 = time.perf_counter()
            seg(image)
            latency[i] = (time.perf_counter() - t0) * 1000
            if i % RSS_EVERY == 0 or i == frames - 1 or (i + 1) % plan.period == 0:
                m = rss_mib()
                if m is not None:
                    rss.append((i, m))
            if (i + 1) % plan.period == 0:
                say(f"soak: {i + 1}/{frames} frames, RSS {rss[-1][1]:.1f} MiB" if rss else f"soak: {i + 1}/{frames}")
    elapsed = time.perf_counter() - started
    return summarise(plan, latency, rss, actions, swap_ms, elapsed, time.process_time() - cpu0, str(bundle))


def summarise(
    plan: SoakPlan,
    latency: np.ndarray,
    rss: list[tuple[int, float]],
    actions: dict[str, int],
    swap_ms: list[float],
    elapsed: float,
    cpu_s: float,
    bundle: str,
) -> dict:
    periods = plan.frames // plan.period
    after_warmup = next((m for i, m in rss if i >= plan.period - 1), None)  # warm-up: the first period
    end = rss[-1][1] if rss else None

    def p99(k: int) -> float:
        return float(np.percentile(latency[k * plan.period : (k + 1) * plan.period], 99))

    early, late = (p99(1), p99(periods - 1)) if periods >= 3 else (None, None)
    growth = (end - after_warmup) / after_warmup if after_warmup and end is not None else None
    return {
        "bundle": bundle,
        "frames": plan.frames,
        "period": plan.period,
        "periods": periods,
        "seconds": round(elapsed, 1),
        "fps": round(plan.frames / elapsed, 1) if elapsed > 0 else None,
        "cpu_s_per_frame_ms": round(cpu_s / plan.frames * 1000, 2),
        "latency_ms": {
            k: round(float(v), 2) for k, v in zip(("p50", "p99", "max"), np.percentile(latency, [50, 99, 100]))
        },
        "p99_second_period_ms": _round(early, 2),
        "p99_last_period_ms": _round(late, 2),
        "p99_drift": _round((late - early) / early if early and late is not None else None, 4),
        "rss_start_mib": _round(rss[0][1] if rss else None, 1),
        "rss_after_warmup_mib": _round(after_warmup, 1),
        "rss_end_mib": _round(end, 1),
        "rss_peak_mib": round(peak_rss_mb(), 1),
        "rss_growth": _round(growth, 4),
        "rss_samples": [[i, round(m, 2)] for i, m in rss],
        "changes": actions,
        "change_ms_p50": round(float(np.median(swap_ms)), 2) if swap_ms else None,
        "frame_sizes": [f"{w}x{h}" for w, h in SIZES],
        "machine": f"{machine_key()}, load average {os.getloadavg()[0]:.2f} at the end",
    }


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def targets(doc: dict) -> list[Target]:
    growth, drift = doc.get("rss_growth"), doc.get("p99_drift")
    short = "fewer than 3 periods: run at least 3 periods (N >= 12; 3,000 frames for full periods)"
    return [
        Target(
            "RSS growth after warm-up",
            f"< {SOAK_MAX_RSS_GROWTH:.0%}",
            "-" if growth is None else f"{growth:+.2%} ({doc['rss_after_warmup_mib']} -> {doc['rss_end_mib']} MiB)",
            growth,
            None if growth is None else growth < SOAK_MAX_RSS_GROWTH,
            "" if growth is not None else "RSS is read from /proc (Linux only) after one period of warm-up",
        ),
        Target(
            "p99 latency drift (last period vs second)",
            f"<= {SOAK_MAX_P99_DRIFT:.0%}",
            "-" if drift is None else f"{drift:+.2%} ({doc['p99_second_period_ms']} -> {doc['p99_last_period_ms']} ms)",
            drift,
            None if drift is None else drift <= SOAK_MAX_P99_DRIFT,
            "" if drift is not None else short,
        ),
    ]


def table(doc: dict) -> str:
    lat = doc["latency_ms"]
    lines = [
        f"soak: {doc['frames']} frames in {doc['seconds']} s ({doc['fps']} FPS), periods of {doc['period']} frames, "
        f"{doc['machine']}",
        f"latency ms: p50 {lat['p50']}, p99 {lat['p99']}, max {lat['max']}; CPU {doc['cpu_s_per_frame_ms']} ms/frame",
        f"RSS MiB: start {doc['rss_start_mib']}, after warm-up {doc['rss_after_warmup_mib']}, end {doc['rss_end_mib']}, "
        f"peak {doc['rss_peak_mib']}",
        f"changes: {doc['changes']['vocabulary']} vocabulary swaps, {doc['changes']['classes']} class lists (each "
        f"switched off again), frame sizes {', '.join(doc['frame_sizes'])} in turn; a change takes "
        f"{doc['change_ms_p50']} ms (p50)",
    ]
    return "\n".join(lines) + "\n" + render([targets_table(doc)], markdown=False)


def with_targets(doc: dict) -> dict:
    doc["targets"] = [t.record() for t in targets(doc)]
    return doc
