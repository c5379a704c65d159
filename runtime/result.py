"""What the Segmenter returns for one frame, and how its stage timings are taken."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ovseg.constants import STAGES

UNKNOWN = "unknown"  # the label of a segment whose score is under the threshold


@dataclass
class Segment:
    id: int  # index into Result.label_map values
    label: str  # "unknown" when the best score is under the threshold
    score: float  # cosine similarity of the segment embedding and the label's text embedding
    area: int  # pixels at the frame's size
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), frame pixels
    alternatives: list[tuple[str, float]] = field(default_factory=list)  # the next best labels with scores

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Result:
    label_map: np.ndarray  # (H, W) int32 at the frame's size; values are Segment ids
    segments: list[Segment]
    labels: dict[int, str]  # segment id -> label
    timings: dict[str, float]  # milliseconds per stage, plus "total"
    frame_index: int = 0
    keyframe: bool = True  # CLIP ran on this frame; False: its labels come from the last keyframe's CLIP features
    change: float | None = None  # fraction of the picture changed since the last keyframe (keyframe_change only)

    def mask(self, label: str) -> np.ndarray:
        """(H, W) bool: the pixels of the segments labelled ``label``."""
        ids = [sid for sid, name in self.labels.items() if name == label]
        return np.isin(self.label_map, ids)

    def class_map(self, names: Sequence[str]) -> np.ndarray:
        """(H, W) each pixel's label as its index in ``names`` (guided mode: ``seg.labels``), uint8 with 255 for a
        label not in ``names`` ("unknown") where there are under 255 names, else uint16 with 65535."""
        dtype = np.uint8 if len(names) < 255 else np.uint16
        none = np.iinfo(dtype).max
        index = {name: i for i, name in enumerate(names)}
        lut = np.full(int(self.label_map.max(initial=0)) + 1, none, dtype)
        for sid, label in self.labels.items():
            if sid < len(lut):
                lut[sid] = index.get(label, none)
        return lut[self.label_map]

    def to_json_dict(self, timestamp: float | None = None) -> dict:
        return {
            "frame": self.frame_index,
            "timestamp": timestamp,
            "keyframe": self.keyframe,
            "change": None if self.change is None else round(self.change, 4),
            "segments": [s.to_dict() for s in self.segments],
            "timings_ms": {k: round(v, 3) for k, v in self.timings.items()},
        }


def largest_first(segments: list[Segment]) -> list[Segment]:
    return sorted(segments, key=lambda s: (-s.area, s.id))


class StageTimer:
    """Milliseconds per stage of one frame (every name in STAGES, 0 for stages that did not run)."""

    def __init__(self):
        self.ms = dict.fromkeys(STAGES, 0.0)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.ms[stage] += (time.perf_counter() - start) * 1000
