"""The accuracy gate: a lower precision against fp32, per encoder and through the whole pipeline.

Encoder: per-token cosine of every output (int8 vs fp32) on the held-out frames; the worst token counts.
Pipeline: the Segmenter at fp32 and at the candidate precision on the same held-out frames (``reset()`` between
frames, guidance-free mode with the bundle's vocabulary), compared by segment-label and pixel agreement.
The comparisons are the runtime's (ovseg.runtime.tools.compare, which ovseg-check runs on a device), so both agree.
Speed: the two encoder sessions timed interleaved (warm-up, then ``runs`` each, median) with the runtime's settings.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ovseg.onnx_helpers import session_options
from ovseg.runtime.tools.compare import EncoderCheck, agreement, agreement_totals, compare_outputs


def session(path: Path) -> ort.InferenceSession:
    """A CPU session with the runtime's settings (all graph optimisations, the default thread count)."""
    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


def encoder_check(fp32: ort.InferenceSession, candidate: ort.InferenceSession, frames: np.ndarray) -> EncoderCheck:
    """Per-token cosine of every output of ``candidate`` against ``fp32`` on ``frames`` (N, 3, S, S)."""
    name = fp32.get_inputs()[0].name
    outputs = [o.name for o in fp32.get_outputs()]
    return compare_outputs(
        (
            dict(zip(outputs, fp32.run(outputs, {name: x[None]}))),
            dict(zip(outputs, candidate.run(outputs, {name: x[None]}))),
        )
        for x in frames
    )


def time_pair(fp32: ort.InferenceSession, candidate: ort.InferenceSession, x: np.ndarray, runs: int = 5) -> list[float]:
    """Median latency in ms of both sessions on ``x`` (1, 3, S, S), runs interleaved so load changes hit both alike."""
    feed = {fp32.get_inputs()[0].name: x}
    for s in (fp32, candidate):
        s.run(None, feed)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(runs):
        for s, t in zip((fp32, candidate), times):
            start = time.perf_counter()
            s.run(None, feed)
            t.append(time.perf_counter() - start)
    return [float(np.median(t) * 1e3) for t in times]


def pipeline_agreement(reference, candidate, frames: list[np.ndarray]) -> tuple[float, float]:
    """(label agreement, pixel agreement) over the held-out frames; both Segmenters are reset before every frame."""
    per_frame = []
    for frame in frames:
        reference.reset()
        candidate.reset()
        per_frame.append(agreement(reference(frame), candidate(frame)))
    return agreement_totals(per_frame)
