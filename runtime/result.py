"""What the Segmenter returns for one frame."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


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

    def to_json_dict(self, timestamp: float | None = None) -> dict:
        return {
            "frame": self.frame_index,
            "timestamp": timestamp,
            "segments": [s.to_dict() for s in self.segments],
            "timings_ms": {k: round(v, 3) for k, v in self.timings.items()},
        }
