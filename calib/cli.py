"""ovseg-calib: INT8 encoders for a bundle, calibrated on your frames and gated against fp32.

The int8 files and the gate result (per-token cosine of the encoders, segment-label and pixel agreement of the
whole pipeline, measured speed-up) go into the bundle's manifest. A precision under the thresholds is not written
unless --force, and then it is recorded as failed: the runtime never picks it by itself.

With --tensorrt, a second int8 model per image encoder is written from the same ranges, with the same nodes in float,
for TensorRT: symmetric int8 activations (explicit Q/DQ, which TensorRT 10.3+ and 11 build int8 plans from), checked
against fp32 by the same cosine on ONNX Runtime's CPU. `ovseg-build --int8` builds the plans on the device.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path

from ovseg.cli import add_bundle_argument, fraction, log_lines, run_cli
from ovseg.constants import DEFAULT_AGREEMENT, DEFAULT_COSINE
from ovseg.runtime.bundle.signing import add_sign_argument, unsigned_after_rewrite

PROG = "ovseg-calib"


def _csv(choices: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return items

    return parse


def add_gate_arguments(p, *method_flags: str) -> None:
    """The flags ovseg-calib and ovseg-export --int8 share (``method_flags``: the calibration method's flag names)."""
    from .data import DEFAULT_FRAMES, DEFAULT_HOLDOUT

    p.add_argument(
        *(method_flags or ("--calib-method",)),
        dest="method",
        choices=("minmax", "entropy", "percentile"),
        default="minmax",
        help="activation range calibration (default minmax, the closest to fp32 of the three on DINOv2: "
        "docs/DESIGN.md has the numbers)",
    )
    p.add_argument(
        "--frames",
        type=int,
        default=DEFAULT_FRAMES,
        metavar="N",
        help=f"frames sampled evenly from the source (default {DEFAULT_FRAMES})",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=DEFAULT_HOLDOUT,
        metavar="F",
        help=f"fraction held out for the gate, at least 2 frames (default {DEFAULT_HOLDOUT})",
    )
    p.add_argument(
        "--gate-cosine",
        type=fraction,
        default=DEFAULT_COSINE,
        metavar="C",
        help=f"worst per-token cosine vs fp32 to pass (default {DEFAULT_COSINE})",
    )
    p.add_argument(
        "--gate-agreement",
        type=fraction,
        default=DEFAULT_AGREEMENT,
        metavar="A",
        help=f"segment-label agreement vs fp32 to pass (default {DEFAULT_AGREEMENT})",
    )
    p.add_argument(
        "--timing-runs",
        type=int,
        default=5,
        metavar="N",
        help="timed runs per encoder and precision for the speed-up (default 5)",
    )
    p.add_argument(
        "--tensorrt",
        action="store_true",
        help="also write the symmetric int8 model (*.int8_symmetric.onnx) that `ovseg-build --int8` builds TensorRT "
        "int8 plans from, checked against fp32 like the CPU's",
    )


def build_parser() -> argparse.ArgumentParser:
    from .bundle import MODELS, PRECISIONS

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bundle_argument(p, "bundle to add int8 encoders to")
    p.add_argument(
        "--calib-images",
        type=Path,
        required=True,
        metavar="DIR_OR_VIDEO",
        help="a folder of images or a video like the ones you will segment",
    )
    add_gate_arguments(p, "--method")
    p.add_argument(
        "--models",
        type=_csv(MODELS),
        default=MODELS,
        metavar="LIST",
        help="encoders to calibrate (default clip,dinov2)",
    )
    p.add_argument(
        "--precisions",
        type=_csv(PRECISIONS),
        default=("int8",),
        metavar="LIST",
        help="precisions to gate (default int8; fp16 gates the bundle's fp16 variants on this CPU)",
    )
    p.add_argument(
        "--fallback-rounds",
        type=int,
        default=3,
        metavar="N",
        help="times to move the most sensitive nodes back to float when an encoder's cosine is short (default 3)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write a precision that failed its gate (recorded as failed; never auto-picked)",
    )
    add_sign_argument(p, "the bundle's new manifest")
    return p


def options_from(args: argparse.Namespace, source: Path, force: bool, models=None, precisions=("int8",)):
    from ovseg.runtime.tools.compare import Thresholds

    from .bundle import MODELS, CalibOptions

    return CalibOptions(
        source=source,
        method=args.method,
        frames=args.frames,
        holdout=args.holdout,
        thresholds=Thresholds(args.gate_cosine, args.gate_agreement),
        models=tuple(models or MODELS),
        precisions=tuple(precisions),
        force=force,
        tensorrt=args.tensorrt,
        timing_runs=args.timing_runs,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm.contrib.logging import logging_redirect_tqdm

    # ovseg's warnings (a frame that cannot be read, a damaged calibration cache) as ``ovseg-calib: ...`` lines while
    # the command runs, written above the progress bars
    with log_lines(PROG, logging.WARNING) as logger, logging_redirect_tqdm([logger]):
        return run_cli(PROG, functools.partial(calibrate, args), aftermath=f"{args.bundle} is unchanged")


def calibrate(args: argparse.Namespace) -> int:
    from .bundle import calibrate_bundle

    opts = options_from(args, args.calib_images, args.force, args.models, args.precisions)
    opts.fallback_rounds = args.fallback_rounds
    unsigned = unsigned_after_rewrite(args.bundle.expanduser(), args.sign)
    gates = calibrate_bundle(args.bundle, opts, args.sign)
    failed = [p for p in opts.precisions if not gates[p]["passed"]]
    verdict = f"written with --force, recorded as failed: {', '.join(failed)}" if failed else "passed"
    signed = f", signed with {args.sign}" if args.sign else ""
    print(f"{PROG}: {', '.join(opts.precisions)} {verdict}; manifest updated in {args.bundle}{signed}")
    if unsigned:
        print(f"{PROG}: {unsigned}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
