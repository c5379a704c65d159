"""Calibrate a bundle's image encoders to INT8, gate every lower precision against fp32, write the result atomically.

``calibrate_bundle`` (ovseg-calib) works on a copy-on-write twin of the bundle (hard links to the unchanged files,
new files written beside them) that replaces the bundle in one rename only when everything passed, or failed with
--force. ``calibrate_export`` (ovseg-export --int8) runs the same steps inside the export's temporary directory.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

import ovseg.cli
from ovseg.constants import INT8_SYMMETRIC
from ovseg.environment import machine_key
from ovseg.export.errors import ExportError
from ovseg.runtime.bundle.manifest import (
    EncoderInfo,
    Manifest,
    atomic_bundle_dir,
    link_tree,
    read_manifest,
    write_manifest,
)
from ovseg.runtime.bundle.signing import load_private_key
from ovseg.runtime.tools.compare import Thresholds, open_segmenter

from . import gate
from .cli import PROG
from .data import DEFAULT_FRAMES, DEFAULT_HOLDOUT, CalibrationData, Norm, load_calibration
from .quantize import METHODS, cache_path, calibrate, quantize, sensitivity

MODELS = ("clip", "dinov2")  # --models names = Manifest attributes
PRECISIONS = ("int8", "fp16")
FALLBACK_ROUNDS = 3  # at most this many re-quantisations per encoder when its cosine is under the gate
FALLBACK_STEP = 4  # nodes moved back to float per round, the most sensitive first


@dataclass
class CalibOptions:
    source: Path  # folder of images or a video
    method: str = "minmax"
    frames: int = DEFAULT_FRAMES
    holdout: float = DEFAULT_HOLDOUT
    thresholds: Thresholds = field(default_factory=Thresholds)
    models: tuple[str, ...] = MODELS  # encoders to (re)calibrate; the gate always covers every int8 encoder
    precisions: tuple[str, ...] = ("int8",)  # "fp16": also gate the bundle's fp16 variants (nothing new is written)
    force: bool = False  # write a precision that failed its gate, recorded as passed=False
    tensorrt: bool = False  # also write the symmetric int8 model of TensorRT's int8 plans (ovseg-build --int8)
    fallback_rounds: int = FALLBACK_ROUNDS
    timing_runs: int = 5

    def check(self) -> None:
        if self.method not in METHODS:
            raise ExportError(f"unknown calibration method {self.method!r}: choose one of {', '.join(METHODS)}")
        unknown = [m for m in self.models if m not in MODELS] + [p for p in self.precisions if p not in PRECISIONS]
        if unknown or not self.models:
            raise ExportError(
                f"unknown or no models/precisions {unknown}: models are {', '.join(MODELS)}, precisions {', '.join(PRECISIONS)}"
            )
        if self.timing_runs < 1 or self.fallback_rounds < 0:
            raise ExportError("--timing-runs must be at least 1 and --fallback-rounds at least 0")


say = functools.partial(ovseg.cli.say, PROG)


def norms(manifest: Manifest) -> dict[str, Norm]:
    return {m: Norm(info.mean, info.std, info.image_size) for m in MODELS for info in [getattr(manifest, m)]}


def check_fp32(bundle_dir: Path, manifest: Manifest, models: tuple[str, ...]) -> None:
    for m in models:
        name = getattr(manifest, m).files.get("fp32")
        if not name or not (bundle_dir / name).is_file():
            raise ExportError(
                f"the bundle at {bundle_dir} has no fp32 {m} model to calibrate: re-export it with `ovseg-export`"
            )


def calibrate_bundle(bundle: str | Path, opts: CalibOptions, sign: Path | None = None) -> dict:
    """ovseg-calib: calibrate, gate and rewrite ``bundle`` (or leave it untouched), its new manifest signed with the
    private key at ``sign`` if given; returns the manifest's gates."""
    opts.check()
    key = load_private_key(sign) if sign is not None else None  # a bad key fails before any calibration
    bundle = Path(bundle).expanduser()
    manifest = read_manifest(bundle)
    check_fp32(bundle, manifest, opts.models)
    data = load_calibration(opts.source, norms(manifest), opts.frames, opts.holdout)
    say(f"{data.n_calib} calibration + {data.n_holdout} held-out frames from {data.source}")
    with atomic_bundle_dir(bundle, force=True) as tmp:
        link_tree(bundle, tmp)
        manifest = calibrate_dir(tmp, manifest, data, opts)
        write_manifest(tmp, manifest, key)
    return manifest.gates


def calibrate_export(tmp: Path, manifest: Manifest, opts: CalibOptions, previous: Path | None = None) -> Manifest:
    """ovseg-export --int8: the same steps inside the export's temporary bundle directory, before its manifest is written.

    Calibration caches of the bundle being replaced (``previous``) are reused when their key still matches.
    """
    opts.check()
    for m in opts.models:
        old = previous and cache_path(previous / getattr(manifest, m).files["fp32"])
        if old and old.is_file():
            shutil.copy2(old, cache_path(tmp / getattr(manifest, m).files["fp32"]))
    data = load_calibration(opts.source, norms(manifest), opts.frames, opts.holdout)
    return calibrate_dir(tmp, manifest, data, opts)


def calibrate_dir(d: Path, manifest: Manifest, data: CalibrationData, opts: CalibOptions) -> Manifest:
    """Write the int8 encoders into ``d``, gate every asked-for precision, return the manifest with files and gates.

    Raises ExportError (having written nothing that the caller keeps) when a gate fails without ``opts.force``.
    """
    # the gates being re-measured are dropped until then (an old failed verdict would only make the Segmenter warn)
    manifest = dataclasses.replace(
        manifest, gates={p: g for p, g in manifest.gates.items() if p not in opts.precisions}
    )
    details: dict[str, dict] = {}
    if "int8" in opts.precisions:
        for m in opts.models:
            info = getattr(manifest, m)
            say(f"int8 {m}: {info.files['fp32']} ({opts.method} calibration)")
            info, details[m] = _quantize_encoder(d, info, data, m, opts)
            setattr(manifest, m, info)
        lacking = [m for m in MODELS if "int8" not in getattr(manifest, m).files]
        if lacking:
            raise ExportError(
                f"int8 needs every image encoder: the bundle has no int8 {', '.join(lacking)}; add it to --models"
            )
    write_manifest(d, manifest)  # the Segmenter reads the bundle from disk
    failed = []
    for precision in opts.precisions:
        if not all(precision in getattr(manifest, m).files for m in MODELS):
            raise ExportError(
                f"the bundle has no {precision} variant of every image encoder to gate: re-export with --{precision}"
            )
        record = gate_precision(d, manifest, precision, data, opts, details if precision == "int8" else {})
        manifest.gates[precision] = record
        say(_summary(precision, record))
        if not record["passed"]:
            failed.append(precision)
    if failed and not opts.force:
        worst, t = manifest.gates[failed[0]], opts.thresholds
        short = [f"min cosine {worst['min_cosine']:.4f} < {t.cosine}"] if worst["min_cosine"] < t.cosine else []
        if worst["label_agreement"] < t.agreement:
            short.append(f"label agreement {worst['label_agreement']:.3f} < {t.agreement}")
        raise ExportError(
            f"{failed[0]} failed its gate ({' and '.join(short)}): nothing written; pass --force to keep it, recorded as failed"
        )
    return manifest


def _quantize_encoder(
    d: Path, info: EncoderInfo, data: CalibrationData, m: str, opts: CalibOptions
) -> tuple[EncoderInfo, dict]:
    """Calibrate (or reuse the cache), quantise, and move the most sensitive nodes back to float while the cosine is short.

    With ``opts.tensorrt`` the symmetric int8 model for TensorRT follows, from the same ranges with the same nodes in
    float, checked against fp32 by the same cosine; an int8 plan built from the model it replaces is dropped."""
    fp32 = d / info.files["fp32"]
    out = _variant(fp32, "int8")
    cache = cache_path(fp32)
    ranges, recalibrated = calibrate(fp32, data.calib[m], data.digest, opts.method, cache)
    if not recalibrated:
        say(f"int8 {m}: calibration reused from {cache.name} (same model, frames and method)")
    reference = gate.session(fp32)
    excluded: list[str] = []

    def quantize_checked(path: Path, tensorrt: bool = False) -> tuple[list[str], list[str], gate.EncoderCheck]:
        path.unlink(missing_ok=True)  # never write through a hard link into the bundle being replaced
        kept, quantized = quantize(fp32, path, ranges, tuple(excluded), tensorrt)
        return kept, quantized, gate.encoder_check(reference, gate.session(path), data.holdout[m])

    rounds = []
    for round_ in range(opts.fallback_rounds + 1):
        kept, quantized, check = quantize_checked(out)
        rounds.append({"excluded": len(excluded), "min_cosine": check.min_cosine, "mean_cosine": check.mean_cosine})
        if check.min_cosine >= opts.thresholds.cosine or round_ == opts.fallback_rounds or not quantized:
            break
        ranked = [n for n, _ in sensitivity(fp32, out, data.holdout[m][:2]) if n not in excluded]
        excluded += ranked[:FALLBACK_STEP]
        say(
            f"int8 {m}: min cosine {check.min_cosine:.4f} < {opts.thresholds.cosine}; keeping {', '.join(ranked[:FALLBACK_STEP])} in float"
        )
    info = dataclasses.replace(info, files={**info.files, "int8": out.name})
    details = {
        "file": out.name,
        "cache": cache.name,
        "recalibrated": recalibrated,
        "int8_nodes": len(quantized),
        "float_nodes": len(kept),
        "fallback": excluded,
        "rounds": rounds,
        "weights": info.weights,
    }
    if opts.tensorrt:
        symmetric = _variant(fp32, INT8_SYMMETRIC)
        *_, check = quantize_checked(symmetric, tensorrt=True)
        stale = info.files.get("trt_int8")
        info.files = {**{k: v for k, v in info.files.items() if k != "trt_int8"}, INT8_SYMMETRIC: symmetric.name}
        info.plans = {k: v for k, v in info.plans.items() if k != "trt_int8"}
        passed = check.min_cosine >= opts.thresholds.cosine
        details[INT8_SYMMETRIC] = {
            "file": symmetric.name,
            "min_cosine": check.min_cosine,
            "mean_cosine": check.mean_cosine,
            "passed": passed,
        }
        say(f"{symmetric.name} (TensorRT's int8 source): min cosine {check.min_cosine:.4f}")
        if not passed and not opts.force:
            raise ExportError(
                f"{symmetric.name} (for TensorRT) reaches a worst per-token cosine of {check.min_cosine:.4f} against "
                f"fp32, under {opts.thresholds.cosine}: nothing written; pass --force to keep it, recorded as failed"
            )
        if stale:
            (d / stale).unlink(missing_ok=True)
            say(f"int8 {m}: {stale} removed (built from the previous model): run `ovseg-build --int8` on the device")
    return info, details


def _variant(fp32: Path, infix: str) -> Path:
    """``clip_visual.onnx`` -> ``clip_visual.<infix>.onnx`` next to it."""
    return fp32.with_name(fp32.name.removesuffix(".onnx") + f".{infix}.onnx")


def gate_precision(
    d: Path, manifest: Manifest, precision: str, data: CalibrationData, opts: CalibOptions, details: dict
) -> dict:
    """The gate record of ``precision`` against fp32: encoder cosines, speed, pipeline agreement."""
    models: dict[str, dict] = {}
    for m in MODELS:
        info = getattr(manifest, m)
        reference, candidate = gate.session(d / info.files["fp32"]), gate.session(d / info.files[precision])
        check = gate.encoder_check(reference, candidate, data.holdout[m])
        ms = gate.time_pair(reference, candidate, data.holdout[m][:1], opts.timing_runs)
        models[m] = {
            **details.get(m, {}),
            "min_cosine": check.min_cosine,
            "mean_cosine": check.mean_cosine,
            "outputs": check.outputs,
            "fp32_ms": ms[0],
            f"{precision}_ms": ms[1],
            "speedup_vs_fp32": ms[0] / ms[1],
            "weights": info.weights,
        }
    say(f"{precision}: pipeline agreement on {data.n_holdout} held-out frames")
    reference, candidate = open_segmenter(d, "cpu", "fp32", None), open_segmenter(d, "cpu", precision, None)
    try:
        label_agreement, pixel_agreement = gate.pipeline_agreement(reference, candidate, data.holdout_frames)
    finally:
        reference.close()
        candidate.close()
    min_cosine = min(r["min_cosine"] for r in models.values())
    passed = min_cosine >= opts.thresholds.cosine and label_agreement >= opts.thresholds.agreement
    return {
        "passed": bool(passed),
        "min_cosine": min_cosine,
        "mean_cosine": min(r["mean_cosine"] for r in models.values()),
        "label_agreement": label_agreement,
        "pixel_agreement": pixel_agreement,
        "speedup_vs_fp32": sum(r["fp32_ms"] for r in models.values())
        / sum(r[f"{precision}_ms"] for r in models.values()),
        "frames": data.n_holdout,
        "calibration_frames": data.n_calib if precision == "int8" else 0,
        "method": opts.method if precision == "int8" else None,
        "thresholds": {"cosine": opts.thresholds.cosine, "label_agreement": opts.thresholds.agreement},
        # per encoder: models.*.weights
        "weights": "random weights" if manifest.random_weights else "weights as exported",
        "measured_on": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__} CPU",
        "machine": machine_key(),  # precision "auto" trusts speedup_vs_fp32 only on this machine
        "models": models,
    }


def _summary(precision: str, r: dict) -> str:
    verdict = "PASSED" if r["passed"] else "FAILED"
    return (
        f"{precision} {verdict}: min cosine {r['min_cosine']:.4f}, mean {r['mean_cosine']:.4f}, label agreement "
        f"{r['label_agreement']:.3f}, pixel agreement {r['pixel_agreement']:.3f}, {r['speedup_vs_fp32']:.2f}x vs fp32 "
        f"({r['frames']} held-out frames, {r['weights']})"
    )
