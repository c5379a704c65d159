"""A tiny SA-1B-style dataset whose masks follow colour regions: for tests and a first smoke run of ovseg-train."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

# Distinct region colours (RGB); each image paints a few of them.
COLOURS = np.array(
    [(220, 40, 40), (40, 200, 60), (40, 70, 220), (230, 220, 50), (200, 60, 210), (60, 210, 220)], np.uint8
)


def write_colour_regions(root: Path, count: int = 8, size: tuple[int, int] = (96, 128), seed: int = 0) -> Path:
    """``count`` images of 2-4 coloured regions (a random split of the frame, light noise) with one COCO RLE mask
    per region in IMAGE.json, as SA-1B lays them out."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    for i in range(count):
        regions = int(rng.integers(2, 5))
        centres = rng.uniform((0, 0), (h, w), size=(regions, 2))
        yy, xx = np.mgrid[:h, :w]
        labels = np.argmin((yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2, axis=-1)
        colours = COLOURS[rng.choice(len(COLOURS), regions, replace=False)]
        image = colours[labels].astype(np.int16) + rng.integers(-12, 13, size=(h, w, 3))
        name = f"synthetic_{i:04d}"
        cv2.imwrite(str(root / f"{name}.png"), cv2.cvtColor(image.clip(0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR))
        record = sa1b_record([labels == r for r in range(regions)], i, f"{name}.png")
        (root / f"{name}.json").write_text(json.dumps(record))
    return root


def sa1b_record(masks: list[np.ndarray], image_id: int, file_name: str) -> dict:
    """An SA-1B-style annotation: one COCO RLE per (H, W) bool mask, no labels."""
    from pycocotools import mask as coco_mask

    h, w = masks[0].shape
    annotations = []
    for r, mask in enumerate(masks):
        rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotations.append(
            {"id": r, "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}, "area": int(mask.sum())}
        )
    return {
        "image": {"image_id": image_id, "width": w, "height": h, "file_name": file_name},
        "annotations": annotations,
    }
