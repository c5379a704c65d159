"""Per-stage latency of the Segmenter: the main measurement, the K sweep and the backend/precision sweep.

The main Segmenter is opened as ``Segmenter.from_bundle`` opens it (``Engines.open``), with its image encoders
wrapped in a ``Recorder``, so one measurement loop also yields the encoder outputs that the K sweep replays
(``Replay``): that sweep then times only what depends on K (k-means, pooling, lookup, render).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ovseg import _native
from ovseg.constants import STAGES
from ovseg.errors import SegmenterError
from ovseg.runtime.bundle.manifest import Manifest
from ovseg.runtime.segmenter import Segmenter, SegmenterConfig

from .timing import Budget, Stats, peak_rss_mb, repeat

SWEEP = (("cpu", "fp32"), ("cpu", "fp16"), ("cpu", "int8"), ("cuda", "fp32"), ("cuda", "fp16"), ("tensorrt", "fp16"))


class Recorder:
    """An engine that passes runs through and keeps the outputs of the first ``keep`` runs (and the last one)."""

    def __init__(self, engine, keep: int):
        self.engine, self.keep = engine, keep
        self.outputs: list[dict[str, np.ndarray]] = []
        self.last: dict[str, np.ndarray] | None = None

    @property
    def input(self) -> np.ndarray:
        return self.engine.input

    def run(self) -> dict[str, np.ndarray]:
        self.last = self.engine.run()
        if len(self.outputs) < self.keep:
            self.outputs.append(self.last)
        return self.last

    def close(self) -> None:
        self.engine.close()


class Replay:
    """An engine that returns recorded outputs in order, cyclically, at no cost."""

    def __init__(self, recorder: Recorder):
        if not recorder.outputs:
            raise ValueError("nothing was recorded to replay")
        self.input = np.zeros_like(recorder.input)
        self.outputs = recorder.outputs
        self.calls = 0

    def run(self) -> dict[str, np.ndarray]:
        out = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        return out

    def close(self) -> None:
        pass


@dataclass
class Opened:
    """A Segmenter and the recording engines inside it."""

    segmenter: Segmenter
    manifest: Manifest
    clip: Recorder
    dinov2: Recorder


def open_recorded(bundle: Path, threads: int, config: SegmenterConfig, keep: int, backend: str = "cpu") -> Opened:
    """The Segmenter of a bundle's own vocabulary, as ``Segmenter.from_bundle`` opens it, with its image encoders
    wrapped in Recorders. The benchmark owns its process, so it also sets the native kernels' threads."""
    _native.set_num_threads(threads)
    seg = Segmenter.from_bundle(bundle, config=config, backend=backend, threads=threads)
    e = seg.engines
    recorded = dataclasses.replace(e, clip=Recorder(e.clip, keep), dinov2=Recorder(e.dinov2, keep))
    seg = Segmenter(seg.manifest, seg.bundle_dir, recorded, seg.config, seg.index)
    return Opened(seg, seg.manifest, recorded.clip, recorded.dinov2)


@dataclass
class StageLatency:
    """Per-stage statistics of one configuration, with what it ran on."""

    bundle: str
    image_sizes: dict[str, int]  # encoder -> its square input side
    backend: str
    precision: str
    frame: tuple[int, int]  # width, height of the input frames
    stages: dict[str, Stats]
    overhead_ratio: Stats | None = None  # per frame: total / (dinov2 + clip)
    peak_rss_mb: float | None = None


def _samples(seg: Segmenter, frames: list[np.ndarray], budget: Budget, keys: tuple[str, ...]) -> dict[str, list[float]]:
    """Each timed frame's milliseconds per key (a stage, or "post_encoders": the total less both encoders)."""
    samples: dict[str, list[float]] = {k: [] for k in keys}

    def call(i: int) -> None:
        t = seg(frames[i % len(frames)]).timings
        t["post_encoders"] = t["total"] - t.get("dinov2", 0.0) - t.get("clip", 0.0)
        if i >= budget.warmup:
            for k in keys:
                samples[k].append(t.get(k, 0.0))

    repeat(call, budget)
    return samples


def measure(seg: Segmenter, frames: list[np.ndarray], budget: Budget, *, bundle: Path) -> StageLatency:
    """Time ``seg`` on ``frames`` cyclically."""
    samples = _samples(seg, frames, budget, STAGES)
    ratios = [t / (d + c) for t, d, c in zip(samples["total"], samples["dinov2"], samples["clip"]) if d + c > 0]
    h, w = frames[0].shape[:2]
    return StageLatency(
        str(bundle),
        seg.manifest.image_sizes,
        seg.backend,
        seg.precision,
        (w, h),
        {s: Stats.of(v) for s, v in samples.items() if any(v)},
        Stats.of(ratios) if ratios else None,
        round(peak_rss_mb(), 1),
    )


@dataclass
class KPoint:
    k: int
    stages: dict[str, Stats]  # kmeans, pooling, lookup, render, and "post_encoders" = total with replayed encoders


def sweep_k(opened: Opened, frames: list[np.ndarray], ks: list[int], budget: Budget) -> list[KPoint]:
    """Stages that depend on K, with the recorded encoder outputs replayed in the order they were recorded."""
    seg, keys, points = opened.segmenter, ("kmeans", "pooling", "lookup", "render", "post_encoders"), []
    for k in ks:  # fresh replays: frame i meets the encoder outputs recorded for it
        engines = dataclasses.replace(seg.engines, clip=Replay(opened.clip), dinov2=Replay(opened.dinov2))
        replayed = Segmenter(seg.manifest, seg.bundle_dir, engines, replace(seg.config, num_segments=k), seg.index)
        samples = _samples(replayed, frames[: len(opened.dinov2.outputs)], budget, keys)
        points.append(KPoint(k, {s: Stats.of(v) for s, v in samples.items()}))
    return points


@dataclass
class BackendPoint:
    backend: str
    precision: str
    latency: StageLatency | None = None
    skipped: str = ""  # why it was not measured


def sweep_backends(
    bundle: Path,
    manifest: Manifest,
    frames: list[np.ndarray],
    budget: Budget,
    threads: int,
    measured: StageLatency,
    available: list[str],
) -> list[BackendPoint]:
    """SWEEP: ORT fp32, fp16 and int8 when the bundle has them, CUDA / TensorRT when ONNX Runtime has them; the main
    run is one."""
    points = [BackendPoint(measured.backend, measured.precision, measured)]
    gpu = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
    for backend, precision in SWEEP:
        if (backend, precision) == (measured.backend, measured.precision):
            continue
        if backend in gpu and gpu[backend] not in available:
            points.append(BackendPoint(backend, precision, skipped=f"no GPU: ONNX Runtime has {', '.join(available)}"))
            continue
        missing = [  # the image encoders without a file for ``precision`` (TensorRT builds its engine from fp32)
            role
            for role, info in (("CLIP", manifest.clip), ("DINOv2", manifest.dinov2))
            if precision not in info.files and f"trt_{precision}" not in info.files and backend != "tensorrt"
        ]
        if missing:
            why = f"the bundle has no {precision} {' or '.join(missing)} encoder"
            points.append(BackendPoint(backend, precision, skipped=why))
            continue
        try:
            seg = Segmenter.from_bundle(
                bundle, backend=backend, threads=threads, config=SegmenterConfig(precision=precision)
            )
        except SegmenterError as e:
            points.append(BackendPoint(backend, precision, skipped=str(e).splitlines()[0]))
            continue
        try:
            points.append(BackendPoint(backend, precision, measure(seg, frames, budget, bundle=bundle)))
        finally:
            seg.close()
    return points


def pixel_labels(result, names: list[str]) -> np.ndarray:
    """The vocabulary index of every pixel's label (-1 for "unknown")."""
    position = {n: i for i, n in enumerate(names)}
    lut = np.full(int(result.label_map.max()) + 1, -1, np.int64)
    for sid, label in result.labels.items():
        lut[sid] = position.get(label, -1)
    return lut[result.label_map]
