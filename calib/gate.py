"""The accuracy gate: a lower precision against fp32, per encoder and through the whole pipeline.

Encoder: per-token cosine of every output (int8 vs fp32) on the held-out frames; the worst token counts.
Pipeline: the Segmenter at fp32 and at the candidate precision on the same held-out frames (``reset()`` between
frames, guidance-free mode with the bundle's vocabulary). Segment ids are arbitrary per run, so they are matched
before comparing:
  * label agreement: each fp32 segment is matched to the candidate segment it overlaps most (IoU of their pixels);
    the fraction of fp32 segments whose matched segment has the same label (segments counted, not pixels);
  * pixel agreement: both label maps are turned into label *names* (segments with one label are one region after
    the Segmenter's merge, so matching by name is matching by label); the fraction of pixels named alike.
Speed: the two encoder sessions timed interleaved (warm-up, then ``runs`` each, median) with the runtime's settings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ovseg.onnx_helpers import row_cosines, session_options

DEFAULT_COSINE = 0.98
DEFAULT_AGREEMENT = 0.95


@dataclass(frozen=True)
class Thresholds:
    cosine: float = DEFAULT_COSINE
    agreement: float = DEFAULT_AGREEMENT  # applies to label agreement; pixel agreement is reported


@dataclass
class EncoderCheck:
    min_cosine: float
    mean_cosine: float
    outputs: dict[str, dict[str, float]]  # output -> {"min_cosine", "mean_cosine"}


@dataclass
class Timing:
    fp32_ms: float
    candidate_ms: float

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.candidate_ms


def session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session with the runtime's settings (all graph optimisations, the default thread count)."""
    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def encoder_check(fp32: ort.InferenceSession, candidate: ort.InferenceSession, frames: np.ndarray) -> EncoderCheck:
    """Per-token cosine of every output of ``candidate`` against ``fp32`` on ``frames`` (N, 3, S, S)."""
    name = fp32.get_inputs()[0].name
    outputs = [o.name for o in fp32.get_outputs()]
    per: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
    for x in frames:
        want = fp32.run(outputs, {name: x[None]})
        have = candidate.run(outputs, {name: x[None]})
        for o, a, b in zip(outputs, want, have):
            per[o].append(row_cosines(a, b))
    stats = {
        o: {"min_cosine": float(np.concatenate(c).min()), "mean_cosine": float(np.concatenate(c).mean())}
        for o, c in per.items()
    }
    return EncoderCheck(
        min_cosine=min(s["min_cosine"] for s in stats.values()),
        mean_cosine=float(np.mean([s["mean_cosine"] for s in stats.values()])),
        outputs=stats,
    )


def time_pair(fp32: ort.InferenceSession, candidate: ort.InferenceSession, x: np.ndarray, runs: int = 5) -> Timing:
    """Median latency of both sessions on ``x`` (1, 3, S, S), runs interleaved so load changes hit both alike."""
    feed = {fp32.get_inputs()[0].name: x}
    for s in (fp32, candidate):
        s.run(None, feed)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(runs):
        for s, t in zip((fp32, candidate), times):
            start = time.perf_counter()
            s.run(None, feed)
            t.append(time.perf_counter() - start)
    return Timing(float(np.median(times[0]) * 1e3), float(np.median(times[1]) * 1e3))


def label_map_names(result) -> tuple[np.ndarray, list[str]]:
    """The label map as indices into a sorted list of label names."""
    names = sorted({s.label for s in result.segments} | set(result.labels.values()))
    lut = np.zeros(int(result.label_map.max()) + 1 if result.label_map.size else 1, np.int32)
    for sid, label in result.labels.items():
        if sid < len(lut):
            lut[sid] = names.index(label)
    return lut[result.label_map], names


def agreement(reference, candidate) -> tuple[int, int, float]:
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


def pipeline_agreement(reference, candidate, frames: list[np.ndarray]) -> tuple[float, float]:
    """(label agreement, pixel agreement) over the held-out frames; both Segmenters are reset before every frame."""
    matches = total = 0
    pixels = []
    for frame in frames:
        reference.reset()
        candidate.reset()
        m, t, p = agreement(reference(frame), candidate(frame))
        matches += m
        total += t
        pixels.append(p)
    return (matches / total if total else 1.0), float(np.mean(pixels)) if pixels else 1.0


def open_segmenter(bundle_dir: Path, precision: str):
    """The guidance-free Segmenter on the CPU at ``precision`` (asked for by name: a failed gate does not stop it)."""
    from ovseg.runtime.segmenter import Segmenter  # the native module loads here, not when the CLIs build their parsers

    return Segmenter.from_bundle(bundle_dir, backend="cpu", precision=precision, mode="guidance-free")
