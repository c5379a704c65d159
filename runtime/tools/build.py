"""ovseg-build: TensorRT plans of a bundle's image encoders, built on the device that runs them. No torch.

A plan is built from the ONNX file of its precision (``--fp16``: the fp16 file; ``--int8``: the symmetric int8 model
of ``ovseg-calib --tensorrt``; else the fp32 one) as a strongly typed network: TensorRT runs every tensor in the type
the file gives it, so the fp32 islands that ovseg-export kept in the fp16 file (and checked against torch) stay fp32,
and int8 runs exactly where the file's explicit Q/DQ put it (no INT8 builder flag, no calibrator). This is the only
mode of TensorRT 11 (it exists since 9.1; ovseg takes 10.3, JetPack 6's, and later: the bindings it is checked
against, tests/trt_api). TF32 is cleared (TensorRT allows it by default on Ampere and later), so
the float tensors, all of an fp32 plan's and the fp32 islands of the others, run in fp32 as the check compares them.
Each plan is run on sample frames and compared with the fp32 ONNX file on the CPU (worst per-token cosine), then the
Segmenter on both plans with the Segmenter on CPU fp32 (segment-label agreement), as ovseg-check compares; the plan,
the TensorRT version, GPU name and compute capability it was built with and the comparison go into the manifest, and
the bundle is replaced in one rename (copy-on-write) with every sha256. Under either gate nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ovseg.cli import add_bundle_argument, positive_int, run_cli, say
from ovseg.constants import DEFAULT_AGREEMENT, DEFAULT_COSINE, INT8_SYMMETRIC, ovseg_home
from ovseg.environment import tensorrt_fix
from ovseg.errors import OvsegError, one_line

from ..bundle.manifest import DeviceInfo, EncoderInfo, Manifest, PlanRecord, atomic_bundle_dir, link_tree, read_manifest
from ..bundle.manifest import write_manifest as _write_manifest
from ..bundle.signing import add_sign_argument, load_private_key, unsigned_after_rewrite
from ..engines.device import device_key, this_device
from ..engines.engine import Engine
from ..engines.sessions import PROVIDERS, TRT_CACHE, OnnxEncoder
from ..engines.tensorrt import TensorRTEngine
from .compare import (
    ENCODERS,
    EncoderCheck,
    compare_outputs,
    encoder_inputs,
    open_segmenter,
    results_agreement,
    run_pipeline,
    synthetic_frames,
)

PROG = "ovseg-build"
MIN_TENSORRT = (10, 3)


def install() -> str:
    return f"`{tensorrt_fix()}` (TensorRT >= 10.3) on the machine with the NVIDIA GPU, and run it there"


DEFAULT_FRAMES = 4
# The ONNX file (files key) each plan precision is built from: int8 plans from the symmetric int8 model, not from the
# CPU's "int8" one (uint8 activations, which TensorRT cannot take).
SOURCES = {"fp32": "fp32", "fp16": "fp16", "int8": INT8_SYMMETRIC}
RETRY = {"fp16": "build without --fp16, or ", "int8": "build --fp16 plans, or "}  # what to try when a plan falls short


@dataclass(frozen=True)
class PlanSpec:
    """What trtexec would be told: the input's one shape (min = opt = max), workspace and timing cache."""

    input_shape: tuple[int, ...]
    workspace_mib: int = 2048
    timing_cache: Path | None = None


@dataclass(frozen=True)
class BuildOptions:
    bundle: Path
    fp16: bool = False
    int8: bool = False
    workspace_mib: int = 2048
    timing_cache: Path | None = None  # None: default_timing_cache()
    frames: int = DEFAULT_FRAMES
    min_cosine: float = DEFAULT_COSINE
    min_agreement: float = DEFAULT_AGREEMENT  # segment-label agreement of the Segmenter on the plans vs CPU fp32
    sign: Path | None = None  # Ed25519 private key: sign the new manifest (runtime.bundle.signing)

    @property
    def precision(self) -> str:
        return "int8" if self.int8 else "fp16" if self.fp16 else "fp32"


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def load_tensorrt():
    """The tensorrt module once it imports, is 10.3 or later and can create a builder here; else OvsegError."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise OvsegError(f"tensorrt does not import ({e}): {install()}") from None
    version = str(getattr(trt, "__version__", "0"))
    if _version(version) < MIN_TENSORRT:
        raise OvsegError(f"TensorRT {version} is older than 10.3, the oldest ovseg is checked against: {install()}")
    try:
        trt.Builder(trt.Logger(trt.Logger.WARNING))
    except Exception as e:  # TypeError for the NULL builder of a machine without a usable GPU (TensorRT logged why)
        why = "no usable CUDA GPU or driver: TensorRT's message above says which" if isinstance(e, TypeError) else None
        raise OvsegError(
            f"TensorRT {version} cannot create a builder here ({why or one_line(e)}): {install()}"
        ) from None
    return trt


def default_timing_cache(device: DeviceInfo) -> Path:
    """Timing caches are per GPU and TensorRT version, like plans."""
    return ovseg_home() / TRT_CACHE / "timing" / f"{device_key()}-trt{device.tensorrt}.cache"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # replaces a hard link to the old bundle's file, never writes through it


def build_plan(trt, onnx_path: Path, plan_path: Path, spec: PlanSpec) -> Path:
    """Parse ``onnx_path`` as a strongly typed network and serialise its plan to ``plan_path``."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise OvsegError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    if network.num_inputs != 1:
        raise OvsegError(f"{onnx_path.name} has {network.num_inputs} inputs, an image encoder has one: re-export it")
    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib << 20)
    cache_file = spec.timing_cache
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")
    if not config.set_timing_cache(cache, False):
        raise OvsegError(f"TensorRT refuses the timing cache {cache_file} (another GPU or TensorRT?): delete it")
    profile = builder.create_optimization_profile()
    shape = tuple(spec.input_shape)
    profile.set_shape(network.get_input(0).name, shape, shape, shape)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise OvsegError(f"TensorRT could not build a plan from {onnx_path.name} (its log above says why)")
    _write_atomic(plan_path, bytes(serialized))
    if cache_file is not None:
        _write_atomic(cache_file, bytes(config.get_timing_cache().serialize()))
    return plan_path


def _open_plan(path: Path, shape: tuple[int, ...]) -> Engine:
    return TensorRTEngine(path, shape)


def check_plan(engine: Engine, reference: OnnxEncoder, inputs: Sequence[np.ndarray]) -> EncoderCheck:
    """Every output of the plan against the fp32 ONNX file on the CPU, on the same inputs."""
    pairs = []
    for x in inputs:
        engine.input[...] = x
        pairs.append((reference.run(x), engine.run()))
    return compare_outputs(pairs)


def build_dir(
    d: Path,
    manifest: Manifest,
    opts: BuildOptions,
    trt,
    log: Callable[[str], None],
) -> Manifest:
    """Build, check and record the plans of both image encoders in ``d``; the manifest with them (not written)."""
    precision, source_key = opts.precision, SOURCES[opts.precision]
    missing = [e for e in ENCODERS if source_key not in getattr(manifest, e).files]
    if missing and precision == "int8":
        raise OvsegError(
            f"the bundle has no symmetric int8 {' or '.join(missing)} model for TensorRT: run `ovseg-calib --tensorrt` "
            "first (it writes one beside the CPU's int8 model)"
        )
    if missing:
        raise OvsegError(f"the bundle has no {precision} {' or '.join(missing)} model: re-export with --{precision}")
    device = this_device()
    cache = opts.timing_cache or default_timing_cache(device)
    frames = synthetic_frames(opts.frames)
    inputs = encoder_inputs(manifest, frames)
    manifest = dataclasses.replace(manifest)
    plans: dict[str, Path] = {}
    engines: dict[str, Engine] = {}
    checks: dict[str, EncoderCheck] = {}
    try:
        for e in ENCODERS:
            info: EncoderInfo = getattr(manifest, e)
            shape = (1, 3, info.image_size, info.image_size)  # each encoder at its own input size
            plans[e] = d / (info.files["fp32"].removesuffix(".onnx") + f".{precision}.plan")
            log(
                f"building {plans[e].name} from {info.files[source_key]} on {device} (minutes on a Jetson; timing cache {cache})"
            )
            build_plan(trt, d / info.files[source_key], plans[e], PlanSpec(shape, opts.workspace_mib, cache))
            log(f"checking {plans[e].name} against {info.files['fp32']} on the CPU ({opts.frames} frames)")
            engines[e] = _open_plan(plans[e], shape)
            reference = OnnxEncoder(d / info.files["fp32"], [PROVIDERS["cpu"]], input_shape=shape)
            try:
                checks[e] = check_plan(engines[e], reference, [x[e] for x in inputs])
            finally:
                reference.close()
            if checks[e].min_cosine < opts.min_cosine:
                raise OvsegError(
                    f"{plans[e].name} reaches a worst per-token cosine of {checks[e].min_cosine:.4f} against fp32, under "
                    f"{opts.min_cosine}: nothing written; {RETRY.get(precision, '')}run ovseg-check on the ONNX files"
                )
            log(f"{plans[e].name}: worst cosine {checks[e].min_cosine:.4f}, mean {checks[e].mean_cosine:.4f}")
        log(f"checking the Segmenter on the {precision} plans against CPU fp32 ({opts.frames} frames)")
        labels, pixels = plan_agreement(d, manifest, engines, precision, frames)
    finally:
        for engine in engines.values():
            engine.close()
    if labels < opts.min_agreement:
        raise OvsegError(
            f"the Segmenter on the {precision} plans labels {labels:.3f} of the segments as CPU fp32 does, under "
            f"{opts.min_agreement}: nothing written; {RETRY.get(precision, '')}run ovseg-check on the ONNX files"
        )
    log(f"{precision} plans: label agreement {labels:.3f}, pixel agreement {pixels:.3f}")
    key = f"trt_{precision}"
    for e in ENCODERS:
        info = getattr(manifest, e)
        c = checks[e]
        record = PlanRecord(
            info.files[source_key],
            device.tensorrt,
            device.gpu,
            device.compute_capability,
            c.min_cosine,
            c.mean_cosine,
            labels,
        )
        setattr(
            manifest,
            e,
            dataclasses.replace(info, files={**info.files, key: plans[e].name}, plans={**info.plans, key: record}),
        )
    return manifest


def plan_agreement(
    d: Path, manifest: Manifest, plans: dict[str, Engine], precision: str, frames: list[np.ndarray]
) -> tuple[float, float]:
    """(label agreement, pixel agreement) of the guidance-free Segmenter on the image encoders' ``plans`` against CPU
    fp32 on ``frames``, as ovseg-check measures them. The Segmenter reads the bundle from disk: ``manifest`` is
    written into ``d`` first (the caller writes the final one)."""
    from ..segmenter import Segmenter  # the native module loads here, not when the parser is built

    _write_manifest(d, manifest)
    reference = open_segmenter(d, "cpu", "fp32", None)
    try:
        engines = dataclasses.replace(reference.engines, backend="tensorrt", precision=precision, **plans)
        candidate = Segmenter(reference.manifest, d, engines, reference.config, reference.index)
        expected, _ = run_pipeline(reference, frames)
        got, _ = run_pipeline(candidate, frames)
    finally:
        reference.close()  # the plans are the caller's to close
    return results_agreement(expected, got)


def build_bundle(opts: BuildOptions) -> Manifest:
    """ovseg-build: the bundle with its plans, replaced in one rename, or untouched when anything fails."""
    trt = load_tensorrt()
    key = load_private_key(opts.sign) if opts.sign is not None else None  # a bad key fails before any plan is built
    bundle = Path(opts.bundle).expanduser()
    manifest = read_manifest(bundle)
    try:
        with atomic_bundle_dir(bundle, force=True) as tmp:
            link_tree(bundle, tmp)
            manifest = build_dir(tmp, manifest, opts, trt, lambda m: say(PROG, m))
            _write_manifest(tmp, manifest, key)
    except OSError as e:
        raise OvsegError(f"cannot write the bundle {bundle} ({e.strerror or e}): make it writable") from None
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_bundle_argument(p, "bundle to build plans for")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument(
        "--fp16", action="store_true", help="plans from the fp16 ONNX files (default: the fp32 ones)"
    )
    precision.add_argument(
        "--int8",
        action="store_true",
        help="int8 plans from the symmetric int8 models of `ovseg-calib --tensorrt` (explicit Q/DQ; float parts fp32)",
    )
    p.add_argument("--workspace", type=positive_int, default=2048, metavar="MiB", help="builder workspace (2048)")
    p.add_argument("--timing-cache", type=Path, metavar="FILE", help="default: under OVSEG_HOME, per GPU and TensorRT")
    p.add_argument("--frames", type=positive_int, default=DEFAULT_FRAMES, help="sample frames each plan is checked on")
    add_sign_argument(p, "the bundle's new manifest")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = BuildOptions(
        args.bundle, args.fp16, args.int8, args.workspace, args.timing_cache, args.frames, sign=args.sign
    )

    def body() -> int:
        unsigned = unsigned_after_rewrite(opts.bundle.expanduser(), opts.sign)
        build_bundle(opts)
        say(
            PROG,
            f"{opts.precision} plans written into {opts.bundle}" + (f", signed with {opts.sign}" if opts.sign else ""),
        )
        if unsigned:
            say(PROG, unsigned)
        return 0

    return run_cli(PROG, body, aftermath=f"{opts.bundle} is unchanged")


if __name__ == "__main__":
    sys.exit(main())
