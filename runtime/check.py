"""How a backend or precision is compared with CPU fp32 (no torch): ovseg-calib's gate uses these comparisons.

Encoders: per-token cosine of every output on the same inputs; the worst token counts.
Pipeline: Results of one frame from two Segmenters (guidance-free). Segment ids are arbitrary per run, so they are
matched before comparing:
  * label agreement: each reference segment is matched to the candidate segment it overlaps most (IoU of their
    pixels); the fraction of reference segments whose matched segment has the same label (segments, not pixels);
  * pixel agreement: both label maps are turned into label *names* (segments with one label are one region after
    the Segmenter's merge, so matching by name is matching by label); the fraction of pixels named alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ovseg.constants import DEFAULT_AGREEMENT, DEFAULT_COSINE
from ovseg.errors import OvsegError
from ovseg.onnx_helpers import row_cosines

from .result import Result


class CheckError(OvsegError, RuntimeError):
    """Two runs cannot be compared (no output in common, shapes that differ); one line."""


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
    for every output name both have; CheckError when they share none or an output's shape differs."""
    per: dict[str, list[np.ndarray]] = {}
    for want, have in pairs:
        shared = [name for name in want if name in have]
        if not shared:
            raise CheckError(f"no output in common: the reference has {sorted(want)}, the candidate {sorted(have)}")
        for name in shared:
            a, b = want[name], have[name]
            if a.shape != b.shape:
                raise CheckError(f"output {name} has shape {tuple(b.shape)}, the reference {tuple(a.shape)}")
            per.setdefault(name, []).append(row_cosines(a, b))
    if not per:
        raise CheckError("nothing to compare: no inputs")
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
