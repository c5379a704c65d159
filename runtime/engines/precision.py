"""Which precision of the image encoders to run: a measured, gated choice (no torch).

``ovseg-calib`` writes, per precision, the gate result into ``manifest.gates`` (accuracy against fp32 and the
measured speed-up on the machine that calibrated, which it names). On a CPU, "auto" is the fastest precision that passed
its gate with a speed-up measured on this machine.
On a GPU, "auto" is fp16 where the bundle has it and its gate did not fail (``ovseg-check`` compares it with CPU fp32
on this GPU). A precision that failed its gate is never picked by "auto"; asked for by name it runs, with a warning.
"""

from __future__ import annotations

import logging

from ovseg.constants import PRECISIONS
from ovseg.environment import machine_key
from ovseg.errors import SegmenterError

from ..bundle.manifest import EncoderInfo, Manifest

log = logging.getLogger("ovseg")


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
    """The image encoders' precision on ``device`` ("cpu", or "gpu"/"cuda"/"tensorrt"): gated, never a silent
    fallback; a one-line SegmenterError for what cannot be."""
    refuse_cuda_int8(device, requested)
    if requested not in PRECISIONS:
        raise SegmenterError(f"unknown precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        if device in ("gpu", "cuda", "tensorrt"):
            return "fp16" if has_precision(manifest, "fp16") and gate_passed(manifest, "fp16") is not False else "fp32"
        return _auto(manifest)
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
        raise SegmenterError(
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


_warned: set[tuple] = set()  # warnings of "auto" already given in this process


def _auto(manifest: Manifest) -> str:
    """The fastest precision whose gate passed and measured a speed-up over fp32 on this machine (a lower precision's
    gain depends on the CPU: int8 was 1.21x for DINOv2 on an AVX2-only AMD, 1.55-1.66x on an AMX Intel)."""
    best, best_speedup = "fp32", 1.0
    here = machine_key()
    for precision, gate in manifest.gates.items():
        speedup, machine = gate.get("speedup_vs_fp32"), gate.get("machine")
        if gate.get("passed") is not True or not isinstance(speedup, (int, float)) or speedup <= best_speedup:
            continue
        if not has_precision(manifest, precision):
            continue
        if machine == here:
            best, best_speedup = precision, float(speedup)
        elif (precision, machine) not in _warned:
            _warned.add((precision, machine))
            log.warning(
                "precision auto does not take %s: its gate measured %.2fx over fp32 on %s, not on this machine (%s): "
                "run `ovseg-calib` here to measure it",
                precision,
                speedup,
                machine or "a machine it did not record",
                here,
            )
    return best


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def refuse_cuda_int8(backend: str, precision: str) -> None:
    """The bundle's int8 ONNX files are ovseg-calib's CPU models: they are not for ONNX Runtime's CUDA provider."""
    if backend == "cuda" and precision == "int8":
        raise SegmenterError(
            "precision int8 on backend 'cuda' would run ovseg-calib's CPU model (uint8 activations, int8 weights, made "
            "for the CPU's integer kernels) on the GPU: use precision='fp16' on CUDA or on backend='tensorrt' (plans from "
            "`ovseg-build --fp16`), or backend='cpu' for int8"
        )
