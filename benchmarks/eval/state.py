"""What a run accumulates, and how it survives an interruption: a .npz of plain arrays (no pickle) and a JSON report.

Both files are written atomically (a temporary file in the same directory, then one rename), so a
run killed at any moment leaves the previous complete pair. ``--resume`` reads the arrays back
and skips the images already counted.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

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
    matrix: ConfusionMatrix = field(init=False)
    boundary: BoundaryCounts = field(init=False)
    timing_ms: dict[str, float] = field(default_factory=dict)  # summed per stage
    word_pixels: dict[str, int] = field(default_factory=dict)  # free protocol: label -> pixels

    def __post_init__(self):
        self.matrix, self.boundary = ConfusionMatrix(self.num_classes), BoundaryCounts(self.tolerance)

    def update(self, gt: np.ndarray, outcome: Outcome) -> None:
        self.matrix.update(gt, outcome.prediction)
        if outcome.segments is not None:
            self.segments += len(np.unique(outcome.segments))
            self.boundary.update(outcome.segments, gt)
        for stage, ms in outcome.timings.items():
            self.timing_ms[stage] = self.timing_ms.get(stage, 0.0) + float(ms)
        self.done += 1

    def _header(self) -> list[int]:
        return [STATE_VERSION, self.num_classes, self.tolerance, int(self.with_segments)]

    def save(self, path: Path) -> None:
        b = self.boundary
        with _atomic(path) as f:
            np.savez(
                f,
                version=np.array(self._header(), np.int64),
                counters=np.array([self.done, self.segments], np.int64),
                matrix=self.matrix.counts,
                boundary=np.array([b.gt_total, b.gt_matched, b.pred_total, b.pred_matched], np.int64),
                timing_stages=np.array(list(self.timing_ms), dtype=str),
                timing_ms=np.array(list(self.timing_ms.values()), np.float64),
                words=np.array(list(self.word_pixels), dtype=str),
                word_pixels=np.array(list(self.word_pixels.values()), np.int64),
            )

    def load(self, path: Path) -> None:
        """Continue from the counts ``save`` wrote to ``path`` with the same classes, tolerance and protocol."""
        try:
            with np.load(path, allow_pickle=False) as z:
                a = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise OvsegError(f"cannot read the state file {path} ({e}); start again without --resume") from None
        if a["version"].tolist() != self._header():
            raise OvsegError(f"{path} was written by another configuration; start again without --resume")
        self.done, self.segments = (int(v) for v in a["counters"])
        self.matrix = ConfusionMatrix(self.num_classes, a["matrix"])
        self.boundary = BoundaryCounts(self.tolerance, *(int(v) for v in a["boundary"]))
        self.timing_ms = dict(zip(a["timing_stages"].tolist(), a["timing_ms"].tolist()))
        self.word_pixels = dict(zip(a["words"].tolist(), (int(v) for v in a["word_pixels"])))


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[BinaryIO]:
    """A temporary file next to ``path`` for binary writing; on a clean exit it replaces ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: Path, report: dict) -> None:
    finite = json.loads(
        json.dumps(report), parse_constant=lambda _: None
    )  # NaN (an undefined IoU) as null: strict JSON
    with _atomic(path) as f:
        f.write((json.dumps(finite, indent=2) + "\n").encode())


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
