"""Two runs of the same frames compared, as ovseg-check, ovseg-build and ovseg-calib's gate compare them: encoder
outputs by per-token cosine, Results by segment-label agreement (each reference segment matched to the candidate
segment it overlaps most) and pixel agreement (label maps as label names); the frames and runs they compare on."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ovseg.constants import DEFAULT_AGREEMENT, DEFAULT_COSINE
from ovseg.errors import OvsegError
from ovseg.onnx_helpers import row_cosines

from ..bundle.manifest import Manifest
from ..pipeline.preprocess import Preprocessors
from ..result import Result

ENCODERS = ("clip", "dinov2")  # Manifest and Engines attributes alike


@dataclass(frozen=True)
class Thresholds:
    cosine: float = DEFAULT_COSINE
    agreement: float = DEFAULT_AGREEMENT  # applies to label agreement; pixel agreement is reported

    def passed(self, min_cosine: float, label_agreement: float) -> bool:
        return min_cosine >= self.cosine and label_agreement >= self.agreement


@dataclass
class EncoderCheck:
    min_cosine: float
    mean_cosine: float
    outputs: dict[str, dict[str, float]]  # output -> {"min_cosine", "mean_cosine"}


def compare_outputs(pairs: Iterable[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]) -> EncoderCheck:
    """Per-token cosine of the reference's outputs (first of each pair, one pair per input) against the candidate's,
    for every output name both have; OvsegError when they share none or an output's shape differs."""
    per: dict[str, list[np.ndarray]] = {}
    for want, have in pairs:
        shared = [name for name in want if name in have]
        if not shared:
            raise OvsegError(f"no output in common: the reference has {sorted(want)}, the candidate {sorted(have)}")
        for name in shared:
            a, b = want[name], have[name]
            if a.shape != b.shape:
                raise OvsegError(f"output {name} has shape {tuple(b.shape)}, the reference {tuple(a.shape)}")
            per.setdefault(name, []).append(row_cosines(a, b))
    if not per:
        raise OvsegError("nothing to compare: no inputs")
    stats = {
        name: {"min_cosine": float(np.concatenate(c).min()), "mean_cosine": float(np.concatenate(c).mean())}
        for name, c in per.items()
    }
    return EncoderCheck(
        min_cosine=min(s["min_cosine"] for s in stats.values()),
        mean_cosine=float(np.mean([s["mean_cosine"] for s in stats.values()])),
        outputs=stats,
    )


def label_map_names(result: Result) -> tuple[np.ndarray, list[str]]:
    """The label map as indices into a sorted list of label names."""
    names = sorted({s.label for s in result.segments} | set(result.labels.values()))
    lut = np.zeros(int(result.label_map.max()) + 1 if result.label_map.size else 1, np.int32)
    for sid, label in result.labels.items():
        if sid < len(lut):
            lut[sid] = names.index(label)
    return lut[result.label_map], names


def agreement(reference: Result, candidate: Result) -> tuple[int, int, float]:
    """(matching segments, reference segments, pixel agreement) of two Results of one frame."""
    ref, cand = reference.label_map, candidate.label_map
    n_ref, n_cand = int(ref.max()) + 1, int(cand.max()) + 1
    joint = np.bincount(ref.ravel().astype(np.int64) * n_cand + cand.ravel(), minlength=n_ref * n_cand).reshape(
        n_ref, n_cand
    )
    area_ref, area_cand = joint.sum(1), joint.sum(0)
    iou = joint / np.maximum(area_ref[:, None] + area_cand[None, :] - joint, 1)
    matches = total = 0
    for sid, label in reference.labels.items():
        if sid >= n_ref or area_ref[sid] == 0:
            continue
        total += 1
        best = int(iou[sid].argmax())
        matches += candidate.labels.get(best) == label
    ref_names, ref_list = label_map_names(reference)
    cand_names, cand_list = label_map_names(candidate)
    common = np.array([ref_list.index(n) if n in ref_list else -1 for n in cand_list], np.int32)
    pixels = float((common[cand_names] == ref_names).mean()) if ref_names.size else 1.0
    return matches, total, pixels


def agreement_totals(per_frame: list[tuple[int, int, float]]) -> tuple[float, float]:
    """(label agreement, pixel agreement) over frames of ``agreement``: segments pooled, pixel agreement averaged."""
    matches = sum(m for m, _, _ in per_frame)
    total = sum(t for _, t, _ in per_frame)
    return (matches / total if total else 1.0), (float(np.mean([p for _, _, p in per_frame])) if per_frame else 1.0)


def results_agreement(reference: list[Result], candidate: list[Result]) -> tuple[float, float]:
    """(label agreement, pixel agreement) of two runs' Results, frame by frame."""
    return agreement_totals([agreement(ref, res) for ref, res in zip(reference, candidate, strict=True)])


def synthetic_frames(count: int, height: int = 480, width: int = 640) -> list[np.ndarray]:
    """Deterministic BGR frames: a colour gradient under filled rectangles, circles and ellipses, seeded per frame."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (0.5 * x / width + 0.5 * y / height)[..., None]
    frames = []
    for i in range(count):
        rng = np.random.default_rng(i)
        start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        frame = np.ascontiguousarray((start * (1 - ramp) + end * ramp).astype(np.uint8))
        for _ in range(8):
            colour = [int(c) for c in rng.integers(0, 256, 3)]
            cx, cy, r = int(rng.integers(width)), int(rng.integers(height)), int(rng.integers(30, 160))
            shape = int(rng.integers(3))
            if shape == 0:
                cv2.rectangle(frame, (cx - r, cy - r // 2), (cx + r, cy + r // 2), colour, -1)
            elif shape == 1:
                cv2.circle(frame, (cx, cy), r, colour, -1)
            else:
                cv2.ellipse(frame, (cx, cy), (r, r // 3), float(rng.uniform(0, 180)), 0, 360, colour, -1)
        frames.append(frame)
    return frames


def open_segmenter(bundle_dir: Path, backend: str, precision: str, threads: int | None):
    """The guidance-free Segmenter on ``backend`` at ``precision``, both asked for by name (no "auto")."""
    from ..segmenter import Segmenter, SegmenterConfig  # the native module loads here, not when the parser is built

    return Segmenter.from_bundle(
        bundle_dir, backend=backend, threads=threads, config=SegmenterConfig(precision=precision)
    )


def encoder_inputs(manifest: Manifest, frames: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Every frame preprocessed as the Segmenter does it (once per input size), normalised for each encoder."""
    pre = Preprocessors(manifest.image_sizes)
    inputs = []
    for frame in frames:
        pre(frame)
        inputs.append(
            {
                e: pre[e].normalise(np.zeros((1, 3, info.image_size, info.image_size), np.float32), info.mean, info.std)
                for e, info in ((e, getattr(manifest, e)) for e in ENCODERS)
            }
        )
    return inputs


def run_encoders(engines, inputs: list[dict[str, np.ndarray]]) -> list[dict[str, dict[str, np.ndarray]]]:
    outputs = []
    for x in inputs:
        per = {}
        for e in ENCODERS:
            engine = getattr(engines, e)
            np.copyto(engine.input, x[e])
            per[e] = engine.run()
        outputs.append(per)
    return outputs


def run_pipeline(seg, frames: list[np.ndarray]) -> tuple[list[Result], float]:
    """The Segmenter's results on ``frames`` (reset before each) and its median ms per frame, after one warm-up
    frame (a GPU provider allocates, and TensorRT's provider builds its engines, on the first run)."""
    seg(frames[0])
    results, ms = [], []
    for frame in frames:
        seg.reset()
        result = seg(frame)
        results.append(result)
        ms.append(result.timings["total"])
    return results, float(np.median(ms))
