"""ovseg-check: does every backend and precision this machine offers give what CPU fp32 gives? No torch.

For each backend ONNX Runtime offers here (cpu; cuda; tensorrt: the bundle's TensorRT plans where tensorrt imports,
else ONNX Runtime's TensorRT provider) and each precision the bundle has (fp32, fp16, int8), the guidance-free
Segmenter runs on the same frames as the CPU fp32 reference (reset before every frame) and is compared with it:
  * encoders: per-token cosine of every output of the CLIP image and DINOv2 encoders on the same inputs; the worst
    token counts, the mean is reported;
  * label agreement: segment ids are arbitrary per run, so each reference segment is matched to the candidate
    segment it overlaps most (IoU of their pixels); the fraction of reference segments whose match has its label;
  * pixel agreement: both label maps as label *names* (segments with one label are one region after the Segmenter's
    merge, so matching by name is matching by label); the fraction of pixels named alike. Reported, not gated.
A combination passes when its worst cosine and its label agreement reach the thresholds (by default those of
ovseg-calib's gate, which compares with these same functions). One that cannot run here is SKIP, with the reason;
one that cannot be opened or run, or that runs on another provider than asked, is FAIL, with the error.
Exit status: 0 when every combination that ran passed, 1 when one failed, 2 for a usage or bundle error.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ovseg import __version__
from ovseg.cli import add_bundle_argument, first_line, fraction, log_lines, positive_int, run_cli, say
from ovseg.constants import (
    BACKENDS,
    DEFAULT_AGREEMENT,
    DEFAULT_COSINE,
    PRECISIONS,
    RANDOM_WEIGHTS_WARNING,
)
from ovseg.environment import gpu_unused_warning, is_jetson, nvidia_gpu_present
from ovseg.errors import OvsegError

from ..bundle.manifest import Manifest, describe_sizes, read_manifest
from ..engines.precision import has_precision
from ..engines.sessions import PROVIDERS, OnnxEncoder, provider_problem
from ..engines.tensorrt import TensorRTEngine, tensorrt_importable
from ..io.sources import ImageSource, SourceError, VideoFileSource, evenly_spaced, sample_clip
from ..result import Result
from .compare import (
    ENCODERS,
    EncoderCheck,
    Thresholds,
    compare_outputs,
    encoder_inputs,
    open_segmenter,
    results_agreement,
    run_encoders,
    run_pipeline,
    synthetic_frames,
)

PROG = "ovseg-check"
CHECKED_BACKENDS = tuple(b for b in BACKENDS if b != "auto")
CHECKED_PRECISIONS = tuple(p for p in PRECISIONS if p != "auto")
REFERENCE = ("cpu", "fp32")
DEFAULT_FRAMES = 8
REF, PASS, FAIL, SKIP = "REF", "PASS", "FAIL", "SKIP"
ENGINE_NAMES = {
    "CPUExecutionProvider": "ORT CPU",
    "CUDAExecutionProvider": "ORT CUDA",
    "TensorrtExecutionProvider": "ORT TensorRT EP",
}
HOW_TO_ADD = {"fp16": "ovseg-export --fp16 adds them", "int8": "ovseg-calib adds them"}
GATE_HELP = {  # the thresholds to pass, against CPU fp32: ovseg-calib's by default
    "cosine": "worst per-token cosine to pass (%(default)s, as ovseg-calib)",
    "agree": "segment-label agreement to pass (%(default)s, as ovseg-calib)",
}


# ---- the self-check -------------------------------------------------------------------------------------------------


@dataclass
class Frames:
    images: list[np.ndarray]
    source: str  # what they are, for the report


@dataclass
class Row:
    """One backend x precision: how it compares with CPU fp32 on the frames, or why it did not run."""

    backend: str
    precision: str
    status: str  # REF (the reference itself), PASS, FAIL or SKIP
    engine: str = ""  # what ran: "ORT CPU", "ORT CUDA", "ORT TensorRT EP", "TensorRT plan"
    note: str = ""
    min_cosine: float | None = None  # the worst token of any output of either encoder
    mean_cosine: float | None = None  # the worse encoder's mean
    label_agreement: float | None = None
    pixel_agreement: float | None = None
    ms_per_frame: float | None = None  # median of the Segmenter's total per frame, after one warm-up frame
    encoders: dict[str, EncoderCheck] = field(default_factory=dict)


@dataclass
class Reference:
    """CPU fp32 on the frames: the encoders' inputs and outputs, and the Segmenter's results."""

    inputs: list[dict[str, np.ndarray]]  # per frame: encoder -> its normalised input (1, 3, S, S)
    outputs: list[dict[str, dict[str, np.ndarray]]]  # per frame: encoder -> output name -> array
    results: list[Result]
    row: Row


@dataclass
class Report:
    bundle: str
    image_sizes: dict[str, int]  # encoder -> its square input side
    random_weights: bool
    frames: str
    frame_count: int
    thresholds: Thresholds
    machine: dict[str, object]
    rows: list[Row]

    @property
    def passed(self) -> bool:
        return not any(r.status == FAIL for r in self.rows)


def load_frames(images: str | None, count: int) -> Frames:
    """``count`` frames spread evenly over ``images`` (an image, a folder or a glob); by default over the sample
    clip's photos, or synthetic frames where the sample cannot be made (no scikit-image, no mp4v encoder)."""
    if images is not None:
        source = ImageSource(images)
        source.paths = [source.paths[i] for i in evenly_spaced(len(source.paths), count)]
        frames = [f.image for f in source]
        return Frames(frames, f"{len(frames)} image(s) from {images}")
    try:
        with tempfile.TemporaryDirectory(prefix="ovseg-check-") as tmp:
            with VideoFileSource(sample_clip(Path(tmp) / "sample.mp4")) as video:
                clip = [f.image for f in video]
                frames = [clip[i] for i in evenly_spaced(len(clip), count)]
        return Frames(frames, f"{_count(len(frames), 'frame')} of the sample clip (scikit-image photos)")
    except SourceError as e:
        return Frames(
            synthetic_frames(count),
            f"{_count(count, 'synthetic frame')} (shapes on gradients), not the sample photos: {first_line(e)}",
        )


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def skip_reason(manifest: Manifest, backend: str, precision: str, available: list[str]) -> str | None:
    """Why ``backend`` x ``precision`` cannot run here, or None."""
    if PROVIDERS[backend] not in available:
        return f"this onnxruntime has no {PROVIDERS[backend]}"
    if backend != "cpu" and provider_problem(PROVIDERS[backend]):
        return provider_problem(PROVIDERS[backend])
    if not has_precision(manifest, precision):
        return f"the bundle has no {precision} files ({HOW_TO_ADD.get(precision, 're-export it')})"
    if precision == "int8" and backend == "cuda":
        return "the int8 files are the CPU's QDQ models; int8 on a GPU is the tensorrt backend's int8 plans"
    if precision == "int8" and backend == "tensorrt":
        if not all("trt_int8" in getattr(manifest, e).files for e in ENCODERS):
            return "int8 on TensorRT runs int8 plans, and the bundle has none"
        if not tensorrt_importable():
            return "the bundle's int8 plans need the tensorrt package, which does not import here"
    return None


@contextlib.contextmanager
def warnings_into(notes: list[str]) -> Iterator[None]:
    """While it lasts, the "ovseg" logger's warnings also go into ``notes`` (a row's note); the random-weights
    warning of every opening is dropped (the report says it once)."""
    logger = logging.getLogger("ovseg")

    def keep(record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        if RANDOM_WEIGHTS_WARNING in message:
            return False
        notes.append(message)
        return True

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def describe_engines(engines) -> str:
    """What runs the image encoders: "ORT CUDA", or per encoder where they differ."""
    names = {}
    for e in ENCODERS:
        engine = getattr(engines, e)
        used = engine.session.get_providers()[0] if isinstance(engine, OnnxEncoder) else type(engine).__name__
        names[e] = "TensorRT plan" if isinstance(engine, TensorRTEngine) else ENGINE_NAMES.get(used, used)
    return names[ENCODERS[0]] if len(set(names.values())) == 1 else ", ".join(f"{e}: {n}" for e, n in names.items())


def reference_run(bundle_dir: Path, manifest: Manifest, frames: Frames, threads: int | None) -> Reference:
    """CPU fp32 on the frames; an error here is the bundle's (or the usage's), not a combination's."""
    notes: list[str] = []
    with warnings_into(notes):
        seg = open_segmenter(bundle_dir, *REFERENCE, threads)
        try:
            inputs = encoder_inputs(manifest, frames.images)
            outputs = run_encoders(seg.engines, inputs)
            results, ms = run_pipeline(seg, frames.images)
            engine = describe_engines(seg.engines)
        finally:
            seg.close()
    row = Row(*REFERENCE, REF, engine, "; ".join(["the reference", *notes]), ms_per_frame=ms)
    return Reference(inputs, outputs, results, row)


def check_combination(
    bundle_dir: Path,
    backend: str,
    precision: str,
    frames: Frames,
    reference: Reference,
    thresholds: Thresholds,
    threads: int | None,
) -> Row:
    """One backend x precision against the reference: PASS, or FAIL with why (its error, or what fell short)."""
    row = Row(backend, precision, FAIL)
    notes: list[str] = []
    with warnings_into(notes):
        try:
            seg = open_segmenter(bundle_dir, backend, precision, threads)
        except Exception as e:  # whatever stops a session from opening is this row's failure, not the check's
            row.note = "; ".join([f"cannot open: {_error(e)}", *notes])
            return row
        try:
            row.engine = describe_engines(seg.engines)  # a session on another provider did not open (check_providers)
            outputs = run_encoders(seg.engines, reference.inputs)
            results, row.ms_per_frame = run_pipeline(seg, frames.images)
            row.encoders = {
                e: compare_outputs(zip((r[e] for r in reference.outputs), (o[e] for o in outputs))) for e in ENCODERS
            }
            row.min_cosine = min(c.min_cosine for c in row.encoders.values())
            row.mean_cosine = min(c.mean_cosine for c in row.encoders.values())
            row.label_agreement, row.pixel_agreement = results_agreement(reference.results, results)
            row.status = PASS if thresholds.passed(row.min_cosine, row.label_agreement) else FAIL
            notes[:0] = shortfalls(row, thresholds)
        except Exception as e:  # an error while running fails this row; the others still run
            notes.insert(0, f"failed while running: {_error(e)}")
            row.status = FAIL
        finally:
            seg.close()
    row.note = "; ".join(notes)
    return row


def shortfalls(row: Row, thresholds: Thresholds) -> list[str]:
    """What fell short of the thresholds, for the row's note."""
    short = []
    if not (row.min_cosine or 0.0) >= thresholds.cosine:
        e, name, worst = min(
            ((e, name, s["min_cosine"]) for e, c in row.encoders.items() for name, s in c.outputs.items()),
            key=lambda t: t[2] if not math.isnan(t[2]) else -math.inf,
        )
        short.append(f"{e} {name} cosine {worst:.4f} < {thresholds.cosine}")
    if not (row.label_agreement or 0.0) >= thresholds.agreement:
        short.append(f"label agreement {row.label_agreement:.3f} < {thresholds.agreement}")
    return short


def _error(e: Exception) -> str:
    return first_line(e) if isinstance(e, OvsegError) else f"{type(e).__name__}: {first_line(e)}"


def machine(available: list[str]) -> dict[str, object]:
    return {
        "arch": platform.machine(),
        "processor": platform.processor(),
        "cores": os.cpu_count(),
        "jetson": is_jetson(),
        "nvidia_gpu": nvidia_gpu_present(),
        "onnxruntime": ort.__version__,
        "providers": list(available),
        "tensorrt": tensorrt_importable(),
    }


def run_checks(
    bundle_dir: Path,
    manifest: Manifest,
    frames: Frames,
    thresholds: Thresholds,
    threads: int | None = None,
    available: list[str] | None = None,
) -> Report:
    """The reference, then every backend x precision; progress on stderr."""
    available = ort.get_available_providers() if available is None else available
    n = len(frames.images)
    if not n:
        raise OvsegError(f"no frames to compare on ({frames.source})")
    say(PROG, f"{' '.join(REFERENCE)} (the reference) on {_count(n, 'frame')}")
    reference = reference_run(bundle_dir, manifest, frames, threads)
    rows = [reference.row]
    for backend in CHECKED_BACKENDS:
        for precision in CHECKED_PRECISIONS:
            if (backend, precision) == REFERENCE:
                continue
            reason = skip_reason(manifest, backend, precision, available)
            if reason:
                rows.append(Row(backend, precision, SKIP, note=reason))
                continue
            wait = " (TensorRT builds its engines first: minutes on a Jetson)" if backend == "tensorrt" else ""
            say(PROG, f"{backend} {precision} on {_count(n, 'frame')}{wait}")
            rows.append(check_combination(bundle_dir, backend, precision, frames, reference, thresholds, threads))
    return Report(
        str(bundle_dir),
        manifest.image_sizes,
        bool(manifest.random_weights),
        frames.source,
        n,
        thresholds,
        machine(available),
        rows,
    )


# ---- output ---------------------------------------------------------------------------------------------------------

COLUMNS = ("backend", "precision", "engine", "status", "worst cos", "label agr", "pixel agr", "ms/frame", "note")
NUMERIC = {"worst cos", "label agr", "pixel agr", "ms/frame"}


def _cells(row: Row) -> list[str]:
    def num(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    return [
        row.backend,
        row.precision,
        row.engine or "-",
        row.status,
        num(row.min_cosine, 4),
        num(row.label_agreement, 3),
        num(row.pixel_agreement, 3),
        num(row.ms_per_frame, 1),
        row.note,
    ]


def format_report(report: Report) -> str:
    m, t = report.machine, report.thresholds
    weights = "; random weights: labels are meaningless, compared all the same" if report.random_weights else ""
    device = f"{m['arch']}{', Jetson' if m['jetson'] else ''}{', NVIDIA GPU' if m['nvidia_gpu'] else ''}"
    providers = m["providers"]
    assert isinstance(providers, list)
    lines = [
        f"bundle: {report.bundle} ({describe_sizes(report.image_sizes)}{weights})",
        f"frames: {report.frames}",
        f"machine: {device}, {m['cores']} cores; onnxruntime {m['onnxruntime']} ({', '.join(providers)}); "
        f"tensorrt {'imports' if m['tensorrt'] else 'does not import'}",
        "",
    ]
    table = [list(COLUMNS)] + [_cells(r) for r in report.rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS) - 1)]
    for cells in table:
        padded = [c.rjust(w) if COLUMNS[i] in NUMERIC else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        lines.append("  ".join([*padded, cells[-1]]).rstrip())
    failed = [f"{r.backend} {r.precision}" for r in report.rows if r.status == FAIL]
    ran = sum(r.status in (PASS, FAIL) for r in report.rows)
    lines += [
        "",
        f"gate: worst per-token cosine >= {t.cosine} and segment-label agreement >= {t.agreement} against "
        f"{' '.join(REFERENCE)} (pixel agreement reported)",
        f"FAILED: {', '.join(failed)}"
        if failed
        else f"passed: {ran} combination(s) match {' '.join(REFERENCE)}; "
        f"{sum(r.status == SKIP for r in report.rows)} skipped",
    ]
    unused = gpu_unused_warning(providers)
    return "\n".join(lines + ([f"note: {unused}"] if unused else []))


def report_json(report: Report) -> str:
    data = asdict(report)
    data["passed"] = report.passed
    data["ovseg_version"] = __version__
    return json.dumps(_finite(data), indent=2)


def _finite(value):
    """NaN and infinities (an fp16 overflow's cosines) as null: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# ---- command line ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bundle_argument(p, "bundle to check")
    p.add_argument(
        "--images",
        metavar="PATH_DIR_OR_GLOB",
        help="frames to compare on: an image, a folder or a quoted glob (default: the sample clip's photos; "
        "synthetic frames where scikit-image is missing)",
    )
    p.add_argument(
        "--frames", type=positive_int, default=DEFAULT_FRAMES, metavar="N", help="frames, spread evenly (%(default)s)"
    )
    p.add_argument("--gate-cosine", type=fraction, default=DEFAULT_COSINE, metavar="C", help=GATE_HELP["cosine"])
    p.add_argument("--gate-agreement", type=fraction, default=DEFAULT_AGREEMENT, metavar="A", help=GATE_HELP["agree"])
    p.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads per session (default: all cores)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the report as JSON to OUT")
    return p


def check(args: argparse.Namespace) -> int:
    if args.json is not None and not args.json.parent.is_dir():
        raise OvsegError(f"--json {args.json}: the folder {args.json.parent} does not exist")
    bundle = args.bundle.expanduser()
    manifest = read_manifest(bundle)
    frames = load_frames(args.images, args.frames)
    report = run_checks(
        bundle,
        manifest,
        frames,
        Thresholds(args.gate_cosine, args.gate_agreement),
        args.threads,
    )
    print(format_report(report), flush=True)
    if args.json is not None:
        try:
            args.json.write_text(report_json(report) + "\n")
        except OSError as e:
            raise OvsegError(f"cannot write --json {args.json}: {e.strerror or e}") from None
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with log_lines(PROG, logging.WARNING):
        return run_cli(PROG, functools.partial(check, args))


if __name__ == "__main__":
    sys.exit(main())
