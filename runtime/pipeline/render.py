"""What a label map looks like: per-segment pixel counts and boxes, the palette, the legend, the tinted overlay."""

from __future__ import annotations

import cv2
import numpy as np

from ovseg import _native
from ovseg.errors import SegmenterError

from ..result import Result, Segment
from .preprocess import to_bgr8


def label_stats(
    label_map: np.ndarray, n: int, chunk: int = 1 << 20
) -> tuple[np.ndarray, dict[int, tuple[int, int, int, int]]]:
    """Pixels per id (n,) and the bounding box (x0, y0, x1, y1), exclusive, of every id present; bounded temporaries."""
    h, w = label_map.shape
    rows = max(1, chunk // w)
    areas = np.zeros(n, np.int64)
    for y in range(0, h, rows):
        areas += np.bincount(label_map[y : y + rows].ravel(), minlength=n)[:n]
    mask = np.empty((h, w), bool)
    boxes = {}
    for i in np.flatnonzero(areas).tolist():
        np.equal(label_map, i, out=mask)
        x, y, bw, bh = cv2.boundingRect(mask.view(np.uint8))
        boxes[i] = (x, y, x + bw, y + bh)
    return areas, boxes


def segment_palette(n: int) -> np.ndarray:
    """BGR colours of ids 0..n-1: the VOC colour map without its black."""
    return _native.default_palette(n + 1)[1:]


def overlay(frame_bgr: np.ndarray, result: Result, alpha: float = 0.5, legend: bool = True) -> np.ndarray:
    """The frame (uint8 BGR) with each segment tinted in its colour and, with ``legend``, a swatch + label per segment."""
    frame = to_bgr8(frame_bgr)
    if frame.shape[:2] != result.label_map.shape:
        raise SegmenterError(
            f"the frame is {frame.shape[1]}x{frame.shape[0]}, the result's label map {result.label_map.shape[1]}x{result.label_map.shape[0]}"
        )
    palette = segment_palette(max((s.id for s in result.segments), default=0) + 1)
    tinted = cv2.addWeighted(frame, 1.0 - alpha, palette[result.label_map], alpha, 0.0)
    if legend:
        draw_legend(tinted, result.segments, palette)
    return tinted


def draw_legend(
    image: np.ndarray, segments: list[Segment], palette: np.ndarray, max_rows: int = 20
) -> list[tuple[int, int, int, int]]:
    """A colour swatch and ``label score`` per segment (largest first), top-left, in place; returns the boxes drawn
    (x0, y0, x1, y1), exclusive.

    The text is white on a darkened band, not outlined: a thicker Hershey outline has wider glyph advances than the
    text it outlines and smears into ghost characters.
    """
    scale = max(0.4, min(image.shape[:2]) / 900)
    line = int(22 * scale / 0.5)
    h, w = image.shape[:2]
    boxes = []
    for row, seg in enumerate(segments[:max_rows]):
        y = 6 + row * line
        if y + line > h:
            break
        colour = tuple(int(v) for v in palette[seg.id])
        cv2.rectangle(image, (6, y), (6 + line - 4, y + line - 4), colour, -1)
        boxes.append((6, y, min(w, 6 + line - 3), min(h, y + line - 3)))
        text = f"{seg.label} {seg.score:.2f}"
        origin = (10 + line, y + line - 8)
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        x0, y0, x1, y1 = (
            origin[0] - 2,
            max(0, origin[1] - th - 3),
            min(w, origin[0] + tw + 2),
            min(h, origin[1] + base + 1),
        )
        if x1 > x0 and y1 > y0:
            band = image[y0:y1, x0:x1]
            band[...] = (band * 0.4).astype(image.dtype)
            boxes.append((x0, y0, x1, y1))
        cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return boxes
