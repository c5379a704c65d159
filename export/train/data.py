"""Training data: images with SA-1B-style masks (COCO RLE in IMAGE.json) or DINOv2 k-means masks made on the fly.

Every sample is a random crop of the image resized to a fixed short side (PixelCLIP: 1024, crops of 640, flip),
seen twice at the CLIP input size: un-augmented by the teacher, strongly augmented by the student (colour
jitter, grayscale, blur, a cut-out box). Masks are sampled (nearest) on a mask_size² grid over the crop.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset, Sampler

from ovseg import _native
from ovseg.export.clip import CLIP_MEAN
from ovseg.export.dinov2 import IMAGENET_MEAN, IMAGENET_STD, Dinov2PatchTokens
from ovseg.export.errors import ExportError

MASK_SOURCES = ("sa1b", "dino")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class CropConfig:
    short_side: int = 1024  # PixelCLIP: MIN_SIZE_TRAIN 1024
    max_size: int = 1333  # detectron2's MAX_SIZE_TRAIN default, which PixelCLIP keeps
    crop: int = 640  # PixelCLIP: absolute 640x640 crops
    clip_size: int = 320  # PixelCLIP's CLIP_RESOLUTION, for teacher and student
    mask_size: int = 256  # PixelCLIP's MASK_RESOLUTION
    strong: bool = True  # student augmentation (off: the student sees the teacher's view)
    hue: bool = True  # the strong augmentation's hue jitter and grayscale (off where colour names the class)
    dino_size: int = 0  # > 0: also emit the crop at this size for DINOv2 masks


@dataclass
class Sample:
    teacher: torch.Tensor  # uint8 (3, clip_size, clip_size), un-augmented
    student: torch.Tensor  # uint8 (3, clip_size, clip_size), augmented
    masks: torch.Tensor  # bool (n, mask_size, mask_size), largest first; empty for DINOv2 masks
    keep: torch.Tensor  # bool (mask_size, mask_size): False in the cut-out box and the padding
    dino: torch.Tensor | None  # uint8 (3, dino_size, dino_size) or None


@dataclass
class Batch:
    teacher: torch.Tensor
    student: torch.Tensor
    masks: list[torch.Tensor]
    keep: torch.Tensor
    dino: torch.Tensor | None

    def _map(self, fn) -> Batch:
        dino = None if self.dino is None else fn(self.dino)
        return Batch(fn(self.teacher), fn(self.student), [fn(m) for m in self.masks], fn(self.keep), dino)

    def to(self, device: torch.device) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        return self._map(lambda t: t.pin_memory())


def collate(samples: list[Sample]) -> Batch:
    dino = torch.stack([s.dino for s in samples]) if samples[0].dino is not None else None
    return Batch(
        torch.stack([s.teacher for s in samples]),
        torch.stack([s.student for s in samples]),
        [s.masks for s in samples],
        torch.stack([s.keep for s in samples]),
        dino,
    )


@dataclass
class Item:
    image: Path
    annotation: Path | None  # SA-1B-style JSON, None for DINOv2 masks


def find_images(root: Path, masks: str, annotations: Path | None = None) -> list[Item]:
    """Images under ``root`` (recursively). For SA-1B masks each needs its JSON: IMAGE.json beside it (the SA-1B
    tars' layout) or, with ``annotations``, at the same relative path under that folder (PixelCLIP's layout)."""
    if masks not in MASK_SOURCES:
        raise ExportError(f"unknown mask source {masks!r}: choose one of {', '.join(MASK_SOURCES)}")
    if not root.is_dir():
        raise ExportError(f"data directory {root} does not exist")
    if annotations is not None and not annotations.is_dir():
        raise ExportError(f"annotation directory {annotations} does not exist")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ExportError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    if masks == "dino":
        return [Item(p, None) for p in images]
    items = [Item(p, (annotations / p.relative_to(root) if annotations else p).with_suffix(".json")) for p in images]
    orphans = [i.annotation for i in items if not i.annotation.is_file()]
    if orphans:
        raise ExportError(
            f"{len(orphans)} of {len(items)} images have no annotation JSON (e.g. {orphans[0]}); "
            "SA-1B layout is IMAGE.jpg + IMAGE.json (or --annotations DIR mirroring --data), or use --masks dino"
        )
    return items


def read_rles(path: Path, height: int, width: int) -> list[dict]:
    """The COCO RLE segmentations of an SA-1B-style annotation file, checked against the image size."""
    try:
        data = json.loads(path.read_text())
        annotations = data["annotations"]
        rles = [a["segmentation"] for a in annotations if not a.get("iscrowd", 0)]
        sizes = {tuple(r["size"]) for r in rles}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(
            f"unreadable annotation {path}: {type(e).__name__} {str(e)[:80]} (want {{'annotations': [{{'segmentation': {{'size', 'counts'}}}}]}})"
        ) from None
    if sizes - {(height, width)}:
        raise ExportError(f"annotation {path} has masks of size {sorted(sizes)[0]} for a {height}x{width} image")
    return rles


def decode_rle(rle: dict) -> np.ndarray:
    """One COCO RLE (compressed string or uncompressed counts) -> uint8 (h, w)."""
    from pycocotools import mask as coco_mask

    if isinstance(rle.get("counts"), list):
        rle = coco_mask.frPyObjects(rle, *rle["size"])
    with warnings.catch_warnings():  # pycocotools 2.0.x under numpy 2 warns about __array__(copy=...) on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode(rle)


class MaskDataset(Dataset):
    """Sample ``draw`` is image ``draw % len`` with augmentation drawn from (seed, draw): a resumed run sees the same data."""

    def __init__(self, items: list[Item], masks: str, crop: CropConfig, seed: int = 0):
        self.items = items
        self.masks = masks
        self.cfg = crop
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, draw: int) -> Sample:
        cfg = self.cfg
        item = self.items[draw % len(self.items)]
        path = item.image
        rng = np.random.default_rng([self.seed, draw])
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise ExportError(f"cannot read image {path}")
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        h, w = image.shape[:2]
        scale = cfg.short_side / min(h, w)
        scale = min(scale, cfg.max_size / max(h, w))
        rh, rw = max(1, round(h * scale)), max(1, round(w * scale))
        ch, cw = min(cfg.crop, rh), min(cfg.crop, rw)
        y0, x0 = int(rng.integers(0, rh - ch + 1)), int(rng.integers(0, rw - cw + 1))
        flip = bool(rng.random() < 0.5)

        resized = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_LINEAR)
        crop = np.zeros((cfg.crop, cfg.crop, 3), np.uint8)
        crop[:] = np.round(np.array(CLIP_MEAN) * 255)  # pad with CLIP's mean colour
        crop[:ch, :cw] = resized[y0 : y0 + ch, x0 : x0 + cw]
        if flip:
            crop = crop[:, ::-1]
        view = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)

        m = cfg.mask_size
        centres = (np.arange(m) + 0.5) * cfg.crop / m  # mask-grid pixel centres in crop pixels
        inside_y, inside_x = centres < ch, centres < cw
        if flip:
            inside_x = inside_x[::-1]
        keep = np.outer(inside_y, inside_x)
        student = view
        if cfg.strong:
            student, (by0, bx0, by1, bx1) = _strong_augment(view, (ch, cw), flip, rng, cfg.hue)
            keep = keep & ~np.outer((centres >= by0) & (centres < by1), (centres >= bx0) & (centres < bx1))

        masks = np.zeros((0, m, m), bool)
        if self.masks == "sa1b":
            ys = np.minimum(((y0 + np.minimum(centres, ch - 1)) / (rh / h)).astype(int), h - 1)
            xs = np.minimum(((x0 + np.minimum(centres, cw - 1)) / (rw / w)).astype(int), w - 1)
            if flip:
                xs = xs[::-1]
            grids = [decode_rle(r)[np.ix_(ys, xs)].astype(bool) & keep for r in read_rles(item.annotation, h, w)]
            # PixelCLIP drops masks of <= 1 pixel
            grids = sorted((g for g in grids if g.sum() > 1), key=lambda g: -int(g.sum()))
            if grids:
                masks = np.stack(grids)

        dino = _resize(view, cfg.dino_size) if cfg.dino_size else None
        return Sample(
            _resize(view, cfg.clip_size),
            _resize(student, cfg.clip_size),
            torch.from_numpy(masks),
            torch.from_numpy(keep),
            dino,
        )


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size), bilinear without antialias (as PixelCLIP's F.interpolate)."""
    if image.shape[-1] == size and image.shape[-2] == size:
        return image.contiguous()
    out = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
    return out.round().clamp(0, 255).to(torch.uint8)


def _strong_augment(
    view: torch.Tensor, valid: tuple[int, int], flip: bool, rng: np.random.Generator, hue: bool = True
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """PixelCLIP's student view: ColorJitter(.5, .5, .5, .25) with p .8, grayscale p .2, Gaussian blur p .5
    (sigma 0.1-2), then a black box of 10-50% of each side inside the image. Returns the box (y0, x0, y1, x1).
    ``hue`` False: no hue jitter and no grayscale."""
    x = view
    if rng.random() < 0.8:
        ops = [
            lambda t: TF.adjust_brightness(t, rng.uniform(0.5, 1.5)),
            lambda t: TF.adjust_contrast(t, rng.uniform(0.5, 1.5)),
            lambda t: TF.adjust_saturation(t, rng.uniform(0.5, 1.5)),
            lambda t: TF.adjust_hue(t, rng.uniform(-0.25, 0.25)),
        ]
        for i in rng.permutation(4 if hue else 3):
            x = ops[i](x)
    if rng.random() < 0.2 and hue:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if rng.random() < 0.5:
        sigma = rng.uniform(0.1, 2.0)
        x = TF.gaussian_blur(x, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=sigma)
    x = x.clone()
    ch, cw = valid
    bh, bw = int(ch * rng.uniform(0.1, 0.5)), int(cw * rng.uniform(0.1, 0.5))
    y0 = int(rng.integers(0, ch - bh + 1))
    x0 = int(rng.integers(0, cw - bw + 1))
    if flip:  # the valid region sits at the right of a flipped, padded crop
        x0 += x.shape[-1] - cw
    x[:, y0 : y0 + bh, x0 : x0 + bw] = 0
    return x, (y0, x0, y0 + bh, x0 + bw)


class InfiniteDraws(Sampler[int]):
    """Endless draws for one rank: epoch e is a seeded permutation of the images, dealt round-robin to the ranks
    (padded to a multiple of the world size); a draw id is e * n + index, so each draw augments differently."""

    def __init__(self, n: int, rank: int = 0, world: int = 1, seed: int = 0, skip: int = 0):
        self.n, self.rank, self.world, self.seed, self.skip = n, rank, world, seed, skip

    def __iter__(self):
        per_rank = math.ceil(self.n / self.world)
        epoch, skip = divmod(self.skip, per_rank)
        while True:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            order = (order * math.ceil(per_rank * self.world / self.n))[: per_rank * self.world]
            for index in order[self.rank :: self.world][skip:]:
                yield epoch * self.n + index
            epoch, skip = epoch + 1, 0


class DinoMasker:
    """PixelCLIP's DINO masks, the ovseg way: DINOv2 patch tokens of the un-augmented crop, the runtime's spherical
    k-means (16 clusters per image), its bilinear score upsampling + argmax onto the mask grid, one mask per cluster."""

    def __init__(
        self, model, image_size: int = 448, clusters: int = 16, mask_size: int = 256, iters: int = 10, seed: int = 0
    ):
        self.tokens = Dinov2PatchTokens(model, image_size).eval().requires_grad_(False)
        self.clusters, self.mask_size, self.iters, self.seed = clusters, mask_size, iters, seed
        self.grid = self.tokens.grid

    def to(self, device: torch.device) -> DinoMasker:
        self.tokens.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, keep: torch.Tensor) -> list[torch.Tensor]:
        """uint8 images (B, 3, S, S) at the DINOv2 size, keep (B, M, M) -> bool masks (n_i, M, M) per image."""
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        tokens = self.tokens((images.float() / 255 - mean) / std).float().cpu().numpy()
        out = []
        for b, x in enumerate(tokens):
            _, _, scores = _native.spherical_kmeans(np.ascontiguousarray(x), self.clusters, self.iters, self.seed)
            scores = np.ascontiguousarray(scores.T.reshape(self.clusters, self.grid, self.grid))
            labels = torch.from_numpy(_native.upsample_argmax(scores, self.mask_size, self.mask_size)).to(keep.device)
            masks = (labels[None] == torch.arange(self.clusters, device=keep.device)[:, None, None]) & keep[b]
            masks = masks[masks.sum(dim=(1, 2)) > 1]
            out.append(masks[masks.sum(dim=(1, 2)).argsort(descending=True)])
        return out
