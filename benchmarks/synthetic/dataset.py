"""The synthetic world on disk, in the layout ``ovseg-eval --dataset synthetic`` and ``ovseg-train`` read.

    python -m ovseg.benchmarks.synthetic.dataset DIR [--count N] [--seed S] [--split val|train]

DIR/classes.txt      the class names, one per line; label values index them
DIR/images/NAME.png  the scenes
DIR/labels/NAME.png  uint8 class indices (every pixel has a class)
DIR/masks/NAME.json  unlabelled instance masks, SA-1B style (``ovseg-train --data DIR/images --annotations DIR/masks``)
DIR/captions.json    NAME -> caption

``val`` scenes (2-5 objects of all 24, held-out colour-shape combinations included) come from a seed stream that
pre-training never draws from; ``train`` scenes (1-3 objects) use only the combinations pre-training saw.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

from ovseg.export.train.synthetic import sa1b_record

from .scenes import Layout, Scene, clip_layouts, render, sample_layout
from .world import CLASSES, OBJECTS, SEEN_OBJECTS

SPLITS = {
    "val": ((2, 5), OBJECTS, 1_000_000),
    "train": ((1, 3), SEEN_OBJECTS, 2_000_000),
}  # objects, allowed, seed offset


def split_layouts(split: str, count: int, seed: int = 0, size: tuple[int, int] = (224, 224)) -> list[Layout]:
    objects, allowed, offset = SPLITS[split]
    rng = np.random.default_rng(offset + seed)
    return [sample_layout(rng, size, objects, allowed) for _ in range(count)]


def write_dataset(root: Path, layouts: list[Layout], prefix: str = "scene") -> Path:
    root = Path(root)
    for d in ("images", "labels", "masks"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    captions = {}
    for i, layout in enumerate(layouts):
        name = f"{prefix}_{i:05d}"
        scene = render(layout)
        cv2.imwrite(str(root / "images" / f"{name}.png"), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(root / "labels" / f"{name}.png"), scene.labels)
        (root / "masks" / f"{name}.json").write_text(json.dumps(sa1b_record(scene.masks, i, f"{name}.png")))
        captions[name] = scene.caption
    (root / "captions.json").write_text(json.dumps(captions, indent=1))
    return root


def video_frames(count: int, frames: int, seed: int = 0, size: tuple[int, int] = (224, 224)) -> list[list[Scene]]:
    """``count`` clips of ``frames`` frames each: val scenes whose objects move."""
    rng = np.random.default_rng(3_000_000 + seed)
    return [
        [render(f) for f in clip_layouts(layout, frames, rng)] for layout in split_layouts("val", count, seed, size)
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ovseg.benchmarks.synthetic.dataset", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("out", type=Path)
    p.add_argument("--split", choices=list(SPLITS), default="val")
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224, help="square scenes of this side")
    args = p.parse_args(argv)
    write_dataset(args.out, split_layouts(args.split, args.count, args.seed, (args.size, args.size)))
    print(f"{args.count} {args.split} scenes in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
