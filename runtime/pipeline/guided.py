"""Guided mode (PixelCLIP inference): the cosine of every CLIP patch embedding with the prompt-ensembled class
embeddings -> bilinear upsampling + argmax at the frame's size.

refine="segments" votes instead: each DINOv2 segment takes the class of its mean logits. refine="edges" makes the
class maps follow the frame's edges before the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ovseg import _native

from ..result import UNKNOWN, Segment, StageTimer, largest_first
from .features import DenseFeatures
from .labels import pool_segments
from .lookup import l2_normalise
from .refine import EdgeRefiner
from .render import label_stats
from .segments import SegmentMaps


@dataclass
class Voters:
    """What decides a class's score: patches or segments, with their class logits, their class and their weight."""

    logits: np.ndarray  # (U, C)
    weight: np.ndarray  # (U,)
    cls: np.ndarray = field(init=False)

    def __post_init__(self):
        self.cls = self.logits.argmax(axis=1)


class GuidedHead:
    def __init__(self, size: int, top_k: int, score_threshold: float | None, edges: EdgeRefiner | None = None):
        self.size, self.top_k, self.score_threshold = size, top_k, score_threshold
        self.edges = edges

    def __call__(
        self,
        rgb: np.ndarray,
        features: DenseFeatures,
        maps: SegmentMaps | None,
        classes: list[str],
        text: np.ndarray,
        shape: tuple[int, int],
        timer: StageTimer,
    ) -> tuple[np.ndarray, list[Segment]]:
        """The label map at ``shape`` (class indices) and one segment per class present; ``maps``: vote in these
        segments (refine="segments"), else per patch. ``text``: (C, D) L2-normalised class embeddings."""
        gh, gw, dim = features.grid.shape
        with timer("lookup"):
            patches = l2_normalise(features.grid.reshape(-1, dim))
        if maps is not None:
            with timer("pooling"):
                pooled = pool_segments(maps.scores, patches.reshape(gh, gw, dim), self.size)
                voters = Voters(
                    pooled.vectors @ text.T, pooled.areas
                )  # mean logits per segment (up to a positive scale)
            with timer("render"):
                label_map = voters.cls.astype(np.int32)[_native.upsample_argmax(maps.scores, *shape)]
        else:
            with timer("lookup"):
                logits = patches @ text.T  # (N, C) cosines
            class_maps = np.ascontiguousarray(logits.T).reshape(-1, gh, gw)
            if self.edges is not None:
                with timer("refine"):
                    class_maps = self.edges(class_maps, rgb)
            voters = Voters(logits, np.ones(len(logits), np.float32))
            with timer("render"):
                label_map = _native.upsample_argmax(class_maps, *shape)
        with timer("render"):
            pixel_areas, boxes = label_stats(label_map, len(classes))
        return label_map, self.segments(voters, pixel_areas, boxes, classes)

    def segments(
        self, voters: Voters, pixel_areas: np.ndarray, boxes: dict[int, tuple[int, int, int, int]], classes: list[str]
    ) -> list[Segment]:
        segments = []
        for c in np.flatnonzero(pixel_areas):
            mine = voters.cls == c
            # a class can win pixels between patches without winning a patch: score it by its best voter then
            row = (
                np.average(voters.logits[mine], axis=0, weights=voters.weight[mine] + 1e-12)
                if mine.any()
                else voters.logits[np.argmax(voters.logits[:, c])]
            )
            score = float(row[c])
            known = self.score_threshold is None or score >= self.score_threshold
            label = classes[c] if known else UNKNOWN
            order = [int(j) for j in np.argsort(-row, kind="stable") if classes[j] != label][: self.top_k - 1]
            segments.append(
                Segment(
                    int(c),
                    label,
                    score,
                    int(pixel_areas[c]),
                    boxes[int(c)],
                    [(classes[j], float(row[j])) for j in order],
                )
            )
        return largest_first(segments)
