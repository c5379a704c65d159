"""Side-by-side pictures for ``--save-vis``: photo | ground truth | prediction | legend."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ovseg.errors import OvsegError

from .metrics import IGNORE

PANEL_WIDTH = 480  # each panel is scaled to this width, so Cityscapes' 2048 px photos stay readable side by side
LEGEND_WIDTH = 240
TITLE_HEIGHT = 28
FONT = cv2.FONT_HERSHEY_SIMPLEX


def palette(n: int = 256) -> np.ndarray:
    """(n, 3) BGR colours: PASCAL VOC's bit-interleaved colour map, shifted by one so no class is black.

    Class c is drawn in VOC colour c + 1; black is kept for ignored pixels and no-class predictions.
    """
    colours = np.zeros((n + 1, 3), np.uint8)
    for i in range(n + 1):
        r = g = b = 0
        c = i
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colours[i] = (b, g, r)
    out = colours[1:].copy()
    out[IGNORE] = 0
    return out


PALETTE = palette()


def _panel(image: np.ndarray, title: str) -> np.ndarray:
    h, w = image.shape[:2]
    scaled = cv2.resize(image, (PANEL_WIDTH, max(1, round(h * PANEL_WIDTH / w))), interpolation=cv2.INTER_NEAREST)
    bar = np.full((TITLE_HEIGHT, PANEL_WIDTH, 3), 255, np.uint8)
    cv2.putText(bar, title, (8, 20), FONT, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([bar, scaled])


def _legend(classes: list[str], shown: list[int], height: int) -> np.ndarray:
    panel = np.full((height, LEGEND_WIDTH, 3), 255, np.uint8)
    rows = max(1, (height - 8) // 22)
    entries = [(PALETTE[c], classes[c]) for c in shown] + [((0, 0, 0), "ignore / no class")]
    if len(entries) > rows:
        entries = entries[: rows - 1] + [((255, 255, 255), f"+{len(entries) - rows + 1} more")]
    for row, (colour, name) in enumerate(entries):
        y = 8 + 22 * row
        cv2.rectangle(panel, (8, y), (26, y + 16), tuple(int(v) for v in colour), -1)
        cv2.rectangle(panel, (8, y), (26, y + 16), (128, 128, 128), 1)
        cv2.putText(panel, name[:26], (34, y + 13), FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return panel


def side_by_side(
    photo: np.ndarray, gt: np.ndarray, prediction: np.ndarray, classes: list[str], title: str
) -> np.ndarray:
    """One BGR picture; the legend lists the classes in the ground truth or the prediction, most pixels first."""
    counts = np.bincount(gt[gt != IGNORE], minlength=len(classes)) + np.bincount(
        prediction[prediction != IGNORE], minlength=len(classes)
    )
    shown = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0 and c < len(classes)]
    panels = [_panel(photo, "photo"), _panel(PALETTE[gt], "ground truth"), _panel(PALETTE[prediction], title)]
    picture = np.hstack(panels)
    return np.hstack([picture, _legend(classes, shown, picture.shape[0])])


def save_side_by_side(path: Path, *args, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), side_by_side(*args, **kwargs)):
        raise OvsegError(f"cannot write {path}: check that its folder is writable and the disk has room")
