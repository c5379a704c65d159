"""Guidance-free naming (TAG): fused per-segment pooling of the CLIP features -> the top-k labels of every segment from
the vocabulary -> label hysteresis across frames -> segments with one label merge -> the label map and its segments."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ovseg import _native

from ..result import UNKNOWN, Segment, StageTimer, largest_first
from .features import DenseFeatures
from .lookup import LabelIndex, Matches
from .render import label_stats
from .segments import SegmentMaps


@dataclass
class SegmentEmbeddings:
    vectors: np.ndarray  # (K, D) float32, L2-normalised mean feature over each segment's pixels at P x P; 0 when empty
    areas: np.ndarray  # (K,) float32 pixels of each segment at P x P


def pool_segments(scores: np.ndarray, grid: np.ndarray, size: int) -> SegmentEmbeddings:
    """TAG's segment embeddings: ``grid`` (gh, gw, D) upsampled bilinearly to the pooling size P x P (``size``: CLIP's
    input size) and averaged over each segment of the argmax of ``scores`` (K, h, w; any grid, e.g. DINOv2's)
    upsampled likewise; fused, never materialising either (docs/DESIGN.md)."""
    vectors, areas, _ = _native.pool_segments_from_scores(scores, grid, size, size)
    return SegmentEmbeddings(vectors, areas)


@dataclass
class SegmentLabels:
    ids: np.ndarray  # (n,) the segments with pixels at P x P
    matches: Matches  # (n, top_k) this frame's best labels of each, best first
    held: np.ndarray  # (n,) the label each keeps after hysteresis (vocabulary index)
    score: np.ndarray  # (n,) cosine of each with its held label
    known: np.ndarray  # (n,) bool: score at or over the threshold; the others are "unknown"
    groups: list[np.ndarray]  # ids merged by held label, each sorted: its first id names the merged segment


# A segment keeps its held label only while its DINOv2 centre's cosine with the centre its label was last confirmed on
# stays at or over this: under it the segment is something else (docs/api.md, "Video").
SAME_SEGMENT = 0.8


class LabelHysteresis:
    """Per segment id, a held label that changes only when a new label wins ``frames`` frames in a row, while the
    segment stays the same thing (its k-means centre close to the one its label was last confirmed on)."""

    def __init__(self, size: int, frames: int):
        self.frames = frames
        self.held = np.full(size, -1, np.int64)
        self.candidate = np.full(size, -1, np.int64)
        self.streak = np.zeros(size, np.int64)
        self.anchor: np.ndarray | None = None  # (size, Dd) unit centre of each segment where its label was confirmed

    def update(self, ids: np.ndarray, labels: np.ndarray, centres: np.ndarray | None = None) -> np.ndarray:
        """Feed this frame's best label of each segment in ``ids`` (``centres``: all segments' k-means centres);
        returns their held labels."""
        same = np.ones(len(ids), bool)
        unit = anchor = None
        if centres is not None:
            unit = centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
            if self.anchor is None or self.anchor.shape != unit.shape:
                self.anchor = unit.copy()
            anchor = self.anchor
            same = np.einsum("nd,nd->n", unit[ids], anchor[ids]) >= SAME_SEGMENT
        for row, (i, new) in enumerate(zip(ids.tolist(), labels.tolist())):
            if not (self.held[i] < 0 or new == self.held[i] or self.frames <= 1 or not same[row]):
                self.streak[i] = self.streak[i] + 1 if new == self.candidate[i] else 1
                self.candidate[i] = new
                if self.streak[i] < self.frames:
                    continue
            self.held[i], self.candidate[i], self.streak[i] = new, -1, 0
            if anchor is not None and unit is not None:
                anchor[i] = unit[i]  # the label is decided (or confirmed) on this centre
        return self.held[ids]


class GuidanceFreeHead:
    def __init__(self, size: int, num_segments: int, top_k: int, score_threshold: float | None):
        self.size, self.num_segments, self.top_k, self.score_threshold = size, num_segments, top_k, score_threshold

    def __call__(
        self,
        maps: SegmentMaps,
        features: DenseFeatures,
        index: LabelIndex,
        hysteresis: LabelHysteresis,
        shape: tuple[int, int],
        timer: StageTimer,
    ) -> tuple[np.ndarray, list[Segment]]:
        """The label map at ``shape`` (merged segment ids) and its segments, largest first."""
        with timer("pooling"):
            pooled = pool_segments(maps.scores, features.grid, self.size)
        with timer("lookup"):
            labels = self.label(pooled, index, hysteresis, maps.centres)
        with timer("render"):
            label_map = merged_label_map(maps.scores, labels.groups, shape)
            pixel_areas, boxes = label_stats(label_map, self.num_segments)
        return label_map, self.segments(labels, pooled.areas, pixel_areas, boxes, index.names)

    def label(
        self,
        pooled: SegmentEmbeddings,
        index: LabelIndex,
        hysteresis: LabelHysteresis,
        centres: np.ndarray | None = None,
    ) -> SegmentLabels:
        ids = np.flatnonzero(pooled.areas > 0)
        queries = pooled.vectors[ids]
        matches = index.search(queries, self.top_k)
        held = hysteresis.update(ids, matches.index[:, 0], centres)
        score = index.score(queries, held)
        known = score >= self.score_threshold if self.score_threshold is not None else np.ones(len(ids), bool)
        return SegmentLabels(ids, matches, held, score, known, merge(ids, held, known))

    def segments(
        self,
        labels: SegmentLabels,
        areas: np.ndarray,
        pixel_areas: np.ndarray,
        boxes: dict[int, tuple[int, int, int, int]],
        names: list[str],
    ) -> list[Segment]:
        """One Segment per merged group present at the frame's size: the held label, its area-weighted score, and the
        largest member's other top labels as alternatives."""
        segments = []
        row_of = {int(i): r for r, i in enumerate(labels.ids)}
        for members in labels.groups:
            root = int(members[0])
            if pixel_areas[root] == 0:
                continue
            rows = [row_of[int(m)] for m in members]
            weights = areas[members]
            score = float(np.average(labels.score[rows], weights=weights))
            label = names[labels.held[rows[0]]] if labels.known[rows[0]] else UNKNOWN
            largest = rows[int(np.argmax(weights))]
            top = zip(labels.matches.index[largest], labels.matches.score[largest])
            alternatives = [(names[j], float(s)) for j, s in top if names[j] != label]
            segments.append(
                Segment(root, label, score, int(pixel_areas[root]), boxes[root], alternatives[: self.top_k - 1])
            )
        listed = {s.id for s in segments}
        for i in np.flatnonzero(
            pixel_areas
        ).tolist():  # empty at P x P, yet a few pixels at the frame's size: no embedding
            if i not in listed:
                segments.append(Segment(i, UNKNOWN, 0.0, int(pixel_areas[i]), boxes[i], []))
        return largest_first(segments)


def merge(ids: np.ndarray, held: np.ndarray, known: np.ndarray) -> list[np.ndarray]:
    """Segment ids grouped by held label (unknown ones stay alone), each group sorted: its first id names it."""
    groups: dict[int, list[int]] = {}
    alone: list[int] = []
    for i, label, ok in zip(ids.tolist(), held.tolist(), known.tolist()):
        (groups.setdefault(label, []) if ok else alone).append(i)
    return sorted((np.array(sorted(g)) for g in [*groups.values(), *([a] for a in alone)]), key=lambda g: g[0])


def merged_label_map(scores: np.ndarray, groups: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """The argmax of the score maps upsampled to ``shape``, every group's ids replaced by its first."""
    raw = _native.upsample_argmax(scores, *shape)
    lut = np.arange(scores.shape[0], dtype=np.int32)
    for members in groups:
        lut[members] = members[0]
    return lut[raw] if any(len(m) > 1 for m in groups) else raw
