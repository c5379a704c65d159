"""SA-1B-style annotations: the mask files ovseg-train reads, written for generated images."""

from __future__ import annotations

import numpy as np


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
