"""What a run accumulates, and how it survives an interruption: a .npz of plain arrays (no pickle) and a JSON report.

Both files are written atomically (a temporary file in the same directory, then one rename), so a
run killed at any moment leaves the previous complete pair. ``--resume`` reads the arrays back
and skips the images already counted.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ovseg.errors import OvsegError

from .metrics import BoundaryCounts, ConfusionMatrix
from .protocols import Outcome

STATE_VERSION = 1


@dataclass
class Tally:
    """Everything counted so far: the confusion matrix of the predictions and, for segment candidates, boundary counts."""

    num_classes: int
    tolerance: int
    with_segments: bool
    done: int = 0  # images counted, in dataset order
    segments: int = 0  # segments seen, summed over images
    matrix: ConfusionMatrix = None  # type: ignore[assignment]
    boundary: BoundaryCounts = None  # type: ignore[assignment]
    timing_ms: dict[str, float] = field(default_factory=dict)  # summed per stage
    word_pixels: dict[str, int] = field(default_factory=dict)  # free protocol: label -> pixels

    def __post_init__(self):
        self.matrix = self.matrix or ConfusionMatrix(self.num_classes)
        self.boundary = self.boundary or BoundaryCounts(self.tolerance)

    def update(self, gt: np.ndarray, outcome: Outcome, timings: dict[str, float]) -> None:
        self.matrix.update(gt, outcome.prediction)
        if outcome.segments is not None:
            self.segments += len(np.unique(outcome.segments))
            self.boundary.update(outcome.segments, gt)
        for stage, ms in timings.items():
            self.timing_ms[stage] = self.timing_ms.get(stage, 0.0) + float(ms)
        self.done += 1

    def save(self, path: Path) -> None:
        words = list(self.word_pixels)
        stages = list(self.timing_ms)
        arrays = {
            "version": np.array([STATE_VERSION, self.num_classes, self.tolerance, int(self.with_segments)], np.int64),
            "counters": np.array([self.done, self.segments], np.int64),
            "matrix": self.matrix.counts,
            "boundary": self.boundary.as_array(),
            "timing_stages": np.array(stages, dtype=str) if stages else np.zeros(0, "<U1"),
            "timing_ms": np.array([self.timing_ms[s] for s in stages], np.float64),
            "words": np.array(words, dtype=str) if words else np.zeros(0, "<U1"),
            "word_pixels": np.array([self.word_pixels[w] for w in words], np.int64),
        }
        with _atomic(path) as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path, num_classes: int, tolerance: int, with_segments: bool) -> Tally:
        try:
            with np.load(path, allow_pickle=False) as z:
                a = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise OvsegError(f"cannot read the state file {path} ({e}); start again without --resume") from None
        version, c, tol, segs = (int(v) for v in a["version"])
        if version != STATE_VERSION or c != num_classes or tol != tolerance or bool(segs) != with_segments:
            raise OvsegError(f"{path} was written by another configuration; start again without --resume")
        done, segments = (int(v) for v in a["counters"])
        return cls(
            num_classes,
            tolerance,
            with_segments,
            done,
            segments,
            ConfusionMatrix(num_classes, a["matrix"]),
            BoundaryCounts.from_array(tolerance, a["boundary"]),
            dict(zip(a["timing_stages"].tolist(), a["timing_ms"].tolist())),
            dict(zip(a["words"].tolist(), (int(v) for v in a["word_pixels"]))),
        )


class _atomic:
    """Open a temporary file next to ``path`` for binary writing; on a clean exit it replaces ``path``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self.file = os.fdopen(fd, "wb")
        return self.file

    def __exit__(self, exc_type, *_):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)


def write_json(path: Path, report: dict) -> None:
    with _atomic(path) as f:
        f.write((json.dumps(_finite(report), indent=2) + "\n").encode())


def _finite(x):
    """NaN/inf (an undefined IoU) as null: strict JSON has no NaN."""
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def state_path(out: Path) -> Path:
    """results.json -> results.state.npz"""
    return out.with_name(out.stem + ".state.npz")


def read_report(out: Path) -> dict:
    try:
        return json.loads(out.read_text())
    except FileNotFoundError:
        raise OvsegError(f"--resume: no {out} to resume from; run without --resume first") from None
    except (OSError, ValueError) as e:
        raise OvsegError(f"--resume: cannot read {out} ({e}); start again without --resume") from None
