"""Segment candidates (TAG): DINOv2 patch tokens -> spherical k-means into K segments -> K score maps on the token grid.

In video the k-means starts from the previous frame's centres, so a segment keeps its id while it moves.
refine="edges" makes the maps follow the frame's edges (pipeline/refine.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ovseg import _native

from ..bundle.manifest import EncoderInfo
from ..engines.engine import Engine
from ..result import StageTimer
from .encoders import run_encoder
from .preprocess import Preprocessor
from .refine import EdgeRefiner


@dataclass
class SegmentMaps:
    scores: np.ndarray  # (K, h, w) float32: every cell's score for every segment; a cell belongs to its argmax
    centres: np.ndarray  # (K, Dd) the k-means centres: the next frame's warm start
    unit: np.ndarray | None = None  # (h * w, Dd) the frame's DINOv2 tokens of length 1: what change is measured on


class SegmentCandidates:
    def __init__(
        self,
        dinov2: Engine,
        info: EncoderInfo,
        pre: Preprocessor,
        num_segments: int,
        iterations: int,
        seed: int,
        edges: EdgeRefiner | None = None,
    ):
        self.dinov2, self.info, self.pre = dinov2, info, pre
        self.num_segments, self.iterations, self.seed = num_segments, iterations, seed
        self.edges = edges

    def __call__(self, rgb: np.ndarray, warm_start: np.ndarray | None, timer: StageTimer) -> SegmentMaps:
        """Segments of the frame ``pre`` holds (``rgb``: it at DINOv2's input size); ``warm_start``: the previous
        frame's centres, or None."""
        with timer("dinov2"):
            tokens = run_encoder(self.dinov2, self.pre, self.info, "tokens", "DINOv2")
        return self.from_tokens(tokens, rgb, warm_start, timer)

    def from_tokens(
        self, tokens: np.ndarray, rgb: np.ndarray, warm_start: np.ndarray | None, timer: StageTimer
    ) -> SegmentMaps:
        """Segments of a frame whose DINOv2 ``tokens`` (h, w, Dd) were computed already (``rgb``: the frame at DINOv2's
        input size)."""
        K = self.num_segments
        with timer("kmeans"):
            x = tokens.reshape(-1, tokens.shape[-1])
            centres, _, scores = _native.spherical_kmeans(x, K, self.iterations, self.seed, warm_start)
            maps = np.ascontiguousarray(scores.T).reshape(K, *self.info.grid)
        if self.edges is not None:
            with timer("refine"):
                maps = self.edges(maps, rgb)
        return SegmentMaps(maps, centres)
