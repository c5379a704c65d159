"""Side-by-side pictures for ``--save-vis``: photo | ground truth | prediction | legend."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ovseg.errors import OvsegError
from ovseg.runtime.pipeline.render import segment_palette

from .metrics import IGNORE

PANEL_WIDTH = 480  # each panel is scaled to this width, so Cityscapes' 2048 px photos stay readable side by side
LEGEND_WIDTH = 240
TITLE_HEIGHT = 28
FONT = cv2.FONT_HERSHEY_SIMPLEX


# Class c in the runtime's segment colour c (PASCAL VOC's colour c + 1, so no class is black); black is kept for ignored
# pixels and no-class predictions.
PALETTE = segment_palette(256)
PALETTE[IGNORE] = 0


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


def save_side_by_side(
    path: Path, photo: np.ndarray, gt: np.ndarray, prediction: np.ndarray, classes: list[str], title: str
) -> None:
    """One BGR picture; the legend lists the classes in the ground truth or the prediction, most pixels first."""
    counts = sum(np.bincount(m[m != IGNORE], minlength=len(classes)) for m in (gt, prediction))
    shown = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0 and c < len(classes)]
    picture = np.hstack(
        [_panel(photo, "photo"), _panel(PALETTE[gt], "ground truth"), _panel(PALETTE[prediction], title)]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.hstack([picture, _legend(classes, shown, picture.shape[0])])):
        raise OvsegError(f"cannot write {path}: check that its folder is writable and the disk has room")
