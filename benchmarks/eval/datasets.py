"""The benchmarks, each read from its usual on-disk layout (the ones PixelCLIP's datasets/README.md documents).

Every dataset is a sorted list of (image, label) file pairs plus a 256-entry lookup table that turns
the stored label values into class indices in the order of the ``ovseg.runtime.pipeline.vocabulary`` preset
of the same name, with 255 = ignore. The per-dataset conventions live in those tables:

- VOC-21: 0 background, 1-20 objects, 255 (the object outlines) ignored. VOC-20: background ignored too.
- Context-59: PixelCLIP's prepared ``annotations_detectron2/pc59_val`` (0-58, 255 = every other pixel).
  Context-60: the same files with those other pixels as class 0, "background" (nothing is ignored).
- ADE-150: the challenge's ``annotations/validation``: 0 ("other") ignored, 1-150 -> 0-149.
- COCO-Stuff-171: ``annotations_detectron2/val2017`` (0-170), or the raw stuffthingmaps (value = COCO id - 1).
- Cityscapes-19: ``*_gtFine_labelTrainIds.png`` (0-18, 255 ignored), or ``*_gtFine_labelIds.png`` mapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ovseg.errors import OvsegError
from ovseg.runtime.pipeline.vocabulary import load_vocabulary

IGNORE = 255


@dataclass(frozen=True)
class Sample:
    name: str  # the dataset's image id
    image: Path
    label: Path


def lut(mapping: dict[int, int]) -> np.ndarray:
    """A 256-entry uint8 table: stored label value -> class index; values not in ``mapping`` -> IGNORE."""
    table = np.full(256, IGNORE, np.uint8)
    for stored, index in mapping.items():
        table[stored] = index
    return table


def read_label_values(path: Path) -> np.ndarray:
    """The stored values of a label PNG: palette indices (VOC) or grey levels, as uint8."""
    from PIL import Image  # Pillow, not OpenCV: OpenCV turns palette PNGs into colours

    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise OvsegError(
                    f"label {path} is a {im.mode} image: expected class ids as palette indices or grey levels"
                )
            values = np.asarray(im)
    except OSError as e:
        raise OvsegError(f"cannot read label {path}: {e}") from None
    if values.dtype != np.uint8:
        if values.size and (values.min() < 0 or values.max() > 255):
            raise OvsegError(f"label {path} has values outside 0-255: not a label map of this dataset")
        values = values.astype(np.uint8)
    return values


class SegDataset:
    """A benchmark on disk; subclasses find the samples and the label table of one layout."""

    title: str
    layout: str  # the expected layout, for the error message

    def __init__(self, root: str | Path, key: str):
        self.root, self.key = Path(root).expanduser(), key  # key: preset name in ovseg.runtime.pipeline.vocabulary
        if not self.root.is_dir():
            raise self.layout_error("no such directory")
        self.samples, self.table = self._scan()
        if not self.samples:
            raise self.layout_error("no images found")
        self.classes = self._classes()

    def _classes(self) -> list[str]:
        return load_vocabulary(self.key)

    def layout_error(self, why: str) -> OvsegError:
        return OvsegError(f"{self.root} is not {self.title} ({why}): expected {self.layout}")

    def _base(self, prefixes: tuple[str, ...], required: tuple[str, ...]) -> Path:
        """The first of root/prefix that has every required path."""
        for prefix in prefixes:
            if all((self.root / prefix / r).exists() for r in required):
                return self.root / prefix
        raise self.layout_error(f"{' or '.join(required)} not found")

    def _scan(self) -> tuple[list[Sample], np.ndarray]:
        raise NotImplementedError

    def image(self, sample: Sample) -> np.ndarray:
        """BGR uint8, pixels as stored: labels are aligned to the stored pixels, so EXIF orientation is not applied."""
        image = cv2.imread(str(sample.image), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if image is None:
            raise OvsegError(f"cannot read image {sample.image}: the file is missing or not an image")
        return image

    def label(self, sample: Sample) -> np.ndarray:
        """Class indices (uint8, 255 = ignore) at the image's size."""
        return self.table[read_label_values(sample.label)]

    def __len__(self) -> int:
        return len(self.samples)

    def _pairs(self, images: Path, labels: Path, image_glob: str, label_of=None) -> list[Sample]:
        """Every image under ``images`` with a label file ``label_of(image)`` (default: labels/STEM.png); an image
        without one is a layout error."""
        samples = []
        for image in sorted(images.glob(image_glob)):
            label = label_of(image) if label_of else labels / f"{image.stem}.png"
            if not label.is_file():
                raise self.layout_error(f"{image.name} has no label {label.relative_to(labels.parent.parent)}")
            samples.append(Sample(image.stem, image, label))
        return samples


class VOC2012(SegDataset):
    """PASCAL VOC 2012 val: the 1449 images of ImageSets/Segmentation/val.txt."""

    title = "PASCAL VOC 2012"
    layout = "VOCdevkit/VOC2012/ with JPEGImages/, SegmentationClass/ (palette PNGs) and ImageSets/Segmentation/val.txt"
    split = "ImageSets/Segmentation/val.txt"

    def _scan(self):
        base = self._base(("", "VOC2012", "VOCdevkit/VOC2012"), ("JPEGImages", "SegmentationClass", self.split))
        samples = []
        for name in (base / self.split).read_text().split():
            sample = Sample(name, base / "JPEGImages" / f"{name}.jpg", base / "SegmentationClass" / f"{name}.png")
            if not (sample.image.is_file() and sample.label.is_file()):
                raise self.layout_error(
                    f"{name} is in val.txt but JPEGImages/{name}.jpg or SegmentationClass/{name}.png is missing"
                )
            samples.append(sample)
        shift = 0 if self.key == "voc21" else 1  # VOC-20: background joins the ignored outlines
        return samples, lut({v: v - shift for v in range(shift, 21)})


class PascalContext(SegDataset):
    """PASCAL Context val (5105 images) as PixelCLIP prepares it: VOC2010 photos + annotations_detectron2/pc59_val."""

    title = "PASCAL Context"
    layout = (
        "VOCdevkit/VOC2010/ with JPEGImages/ and annotations_detectron2/pc59_val/*.png "
        "(written by PixelCLIP's datasets/prepare_pascal_context_59.py)"
    )

    def _scan(self):
        labels_rel = "annotations_detectron2/pc59_val"
        base = self._base(("", "VOC2010", "VOCdevkit/VOC2010"), ("JPEGImages", labels_rel))
        samples = []
        for label in sorted((base / labels_rel).glob("*.png")):
            image = base / "JPEGImages" / f"{label.stem}.jpg"
            if not image.is_file():
                raise self.layout_error(f"label {label.name} has no photo JPEGImages/{image.name}")
            samples.append(Sample(label.stem, image, label))
        if self.key == "context60":  # the pixels outside the 59 classes are "background", class 0
            return samples, lut({**{v: v + 1 for v in range(59)}, IGNORE: 0})
        return samples, lut({v: v for v in range(59)})


class ADE20K(SegDataset):
    """ADE20K (SceneParsing, 150 classes) validation: 2000 images."""

    title = "ADE20K-150"
    layout = "ADEChallengeData2016/ with images/validation/*.jpg and annotations/validation/*.png"

    def _scan(self):
        base = self._base(("", "ADEChallengeData2016"), ("images/validation", "annotations/validation"))
        samples = self._pairs(base / "images/validation", base / "annotations/validation", "*.jpg")
        return samples, lut({v: v - 1 for v in range(1, 151)})


# COCO category ids of the 171 COCO-Stuff classes (80 things, 91 stuff), in the order of the cocostuff171 preset.
COCO_STUFF_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)] + list(range(92, 183))


class CocoStuff(SegDataset):
    """COCO-Stuff 164k val2017: 5000 images, 171 classes."""

    title = "COCO-Stuff-171"
    layout = (
        "coco-stuff/ (or coco/) with images/val2017/*.jpg (or val2017/*.jpg) and annotations_detectron2/val2017/*.png "
        "(prepared, 0-170) or annotations/val2017/*.png (stuffthingmaps_trainval2017)"
    )

    def _scan(self):
        for base in (self.root, self.root / "coco-stuff", self.root / "coco"):
            images = next((base / d for d in ("images/val2017", "val2017") if (base / d).is_dir()), None)
            prepared, raw = base / "annotations_detectron2/val2017", base / "annotations/val2017"
            if images is None or not (prepared.is_dir() or raw.is_dir()):
                continue
            if prepared.is_dir():
                return self._pairs(images, prepared, "*.jpg"), lut({v: v for v in range(171)})
            return self._pairs(images, raw, "*.jpg"), lut({cid - 1: i for i, cid in enumerate(COCO_STUFF_IDS)})
        raise self.layout_error("val2017 photos or their label PNGs not found")


# Cityscapes labelIds of the 19 evaluation classes, in trainId order (cityscapesScripts' labels.py).
CITYSCAPES_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


class Cityscapes(SegDataset):
    """Cityscapes val: 500 images of Frankfurt, Lindau and Münster, 19 classes."""

    title = "Cityscapes"
    layout = "cityscapes/ with leftImg8bit/val/<city>/*_leftImg8bit.png and gtFine/val/<city>/*_gtFine_labelTrainIds.png (or _labelIds.png)"

    def _scan(self):
        base = self._base(("", "cityscapes"), ("leftImg8bit/val", "gtFine/val"))
        images, labels = base / "leftImg8bit/val", base / "gtFine/val"

        def label_of(image: Path, ids: str = "labelTrainIds") -> Path:
            return labels / image.parent.name / image.name.replace("leftImg8bit.png", f"gtFine_{ids}.png")

        first = next(iter(sorted(images.glob("*/*_leftImg8bit.png"))), None)
        if first is not None and not label_of(first).is_file():  # labelIds only: mapped to trainIds
            samples = self._pairs(images, labels, "*/*_leftImg8bit.png", lambda im: label_of(im, "labelIds"))
            table = lut({label_id: i for i, label_id in enumerate(CITYSCAPES_LABEL_IDS)})
        else:
            samples, table = (
                self._pairs(images, labels, "*/*_leftImg8bit.png", label_of),
                lut({v: v for v in range(19)}),
            )
        return [Sample(s.name.replace("_leftImg8bit", ""), s.image, s.label) for s in samples], table


class Synthetic(SegDataset):
    """The synthetic world's scenes (ovseg.benchmarks.synthetic): coloured shapes on grey floors, classes in the folder."""

    title = "the synthetic world"
    layout = (
        "classes.txt, images/*.png and labels/*.png (class indices), as `python -m ovseg.benchmarks.synthetic.dataset` "
        "writes them"
    )

    def _classes(self) -> list[str]:
        return [line.strip() for line in (self.root / "classes.txt").read_text().splitlines() if line.strip()]

    def _scan(self):
        self._base(("",), ("classes.txt", "images", "labels"))
        table = lut({v: v for v in range(len(self._classes()))})
        return self._pairs(self.root / "images", self.root / "labels", "*.png"), table


DATASETS = {
    "voc20": VOC2012,
    "voc21": VOC2012,
    "context59": PascalContext,
    "context60": PascalContext,
    "ade150": ADE20K,
    "cocostuff171": CocoStuff,
    "cityscapes19": Cityscapes,
    "synthetic": Synthetic,
}


def open_dataset(key: str, root: str | Path) -> SegDataset:
    return DATASETS[key](root, key)
