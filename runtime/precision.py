"""Which precision of the image encoders to run: a measured, gated choice (no torch).

``ovseg-calib`` writes, per precision, the gate result into ``manifest.gates`` (accuracy against fp32 and the
measured speed-up on the machine that calibrated). On a CPU, "auto" is the fastest precision that passed its gate;
on a GPU, fp16 when the bundle has it (and its gate, if measured, passed). A precision that failed its gate is
never picked by "auto"; asked for by name it runs, with a warning.
"""

from __future__ import annotations

import logging

from ovseg.constants import PRECISIONS

from .bundle import EncoderInfo, Manifest

log = logging.getLogger("ovseg")

GPU_DEVICES = ("gpu", "cuda", "tensorrt")


def encoders(manifest: Manifest) -> dict[str, EncoderInfo]:
    return {"CLIP image": manifest.clip, "DINOv2": manifest.dinov2}


def has_precision(manifest: Manifest, precision: str) -> bool:
    """True when every image encoder has a file (ONNX or TensorRT plan) for ``precision``."""
    return all(precision in info.files or f"trt_{precision}" in info.files for info in encoders(manifest).values())


def gate_passed(manifest: Manifest, precision: str) -> bool | None:
    """The gate's verdict, or None when the precision was never gated."""
    gate = manifest.gates.get(precision)
    return None if gate is None else bool(gate.get("passed", False))


def pick_precision(manifest: Manifest, device: str, requested: str = "auto") -> str:
    """The precision to run on ``device`` ("cpu", or "gpu"/"cuda"/"tensorrt"); ValueError (one line) for what cannot be."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        return _auto(manifest, device in GPU_DEVICES)
    missing = [
        role
        for role, info in encoders(manifest).items()
        if requested not in info.files and f"trt_{requested}" not in info.files
    ]
    if missing:
        have = sorted(set.intersection(*(set(info.files) for info in encoders(manifest).values())))
        how = (
            "run `ovseg-calib --bundle DIR --calib-images DIR`"
            if requested == "int8"
            else f"re-export with `ovseg-export --{requested}`"
        )
        raise ValueError(
            f"the bundle has no {requested} variant of the {' and '.join(missing)} encoder{'s' if len(missing) > 1 else ''} "
            f"(every encoder has {', '.join(have) or 'nothing in common'}): {how}, or pick precision='fp32'"
        )
    if gate_passed(manifest, requested) is False:
        gate = manifest.gates[requested]
        log.warning(
            "precision %s failed its accuracy gate (min cosine %s, label agreement %s) and runs only because it was asked for",
            requested,
            _num(gate.get("min_cosine")),
            _num(gate.get("label_agreement")),
        )
    return requested


def _auto(manifest: Manifest, gpu: bool) -> str:
    if gpu:
        return "fp16" if has_precision(manifest, "fp16") and gate_passed(manifest, "fp16") is not False else "fp32"
    best, best_speedup = "fp32", 1.0
    for precision, gate in manifest.gates.items():
        speedup = gate.get("speedup_vs_fp32")
        if (
            gate.get("passed") is True
            and isinstance(speedup, (int, float))
            and speedup > best_speedup
            and has_precision(manifest, precision)
        ):
            best, best_speedup = precision, float(speedup)
    return best


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"
