"""ovseg-build: TensorRT plans of a bundle's image encoders, built on the device that runs them. No torch.

A plan is built from the ONNX file of its precision (``--fp16``: the fp16 file, else the fp32 one) as a strongly
typed network: TensorRT runs every tensor in the type the file gives it, so the fp32 islands that ovseg-export kept
in the fp16 file (and checked against torch) stay fp32. This is the only mode of TensorRT 11 and exists since 10.3.
Each plan is run on sample frames and compared with the fp32 ONNX file on the CPU (worst per-token cosine, as
ovseg-check compares); the plan, the TensorRT version, GPU name and compute capability it was built with and the
comparison go into the manifest, and the bundle is replaced in one rename (copy-on-write) with every sha256.
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
from ovseg.constants import DEFAULT_COSINE, ovseg_home
from ovseg.errors import OvsegError

from .bundle import DeviceInfo, EncoderInfo, Manifest, PlanRecord, atomic_bundle_dir, link_tree, read_manifest
from .bundle import write_manifest as _write_manifest
from .check import ENCODERS, EncoderCheck, compare_outputs, encoder_inputs, synthetic_frames
from .sessions import PROVIDERS, TRT_CACHE, Engine, OnnxEncoder, TensorRTEngine, device_key, this_device

PROG = "ovseg-build"
MIN_TENSORRT = (10, 3)
INSTALL = "pip install 'ovseg[tensorrt]' (TensorRT >= 10.3) on the machine with the NVIDIA GPU, and run it there"
INT8_REFUSED = (
    "TensorRT int8 plans need a model quantised with symmetric int8 activations (explicit Q/DQ); the bundle's int8 "
    "model is ovseg-calib's CPU model (uint8 activations), which ovseg does not convert yet: build --fp16 plans"
)
DEFAULT_FRAMES = 4


class BuildError(OvsegError, RuntimeError):
    """A plan cannot be built or does not match fp32; one line saying what to do."""


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

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def load_tensorrt():
    """The tensorrt module once it imports, is 10.3 or later and can create a builder here; else BuildError."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BuildError(f"tensorrt does not import ({e}): {INSTALL}") from None
    version = str(getattr(trt, "__version__", "0"))
    if _version(version) < MIN_TENSORRT:
        raise BuildError(f"TensorRT {version} is older than 10.3 (no strongly typed networks): {INSTALL}")
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    except Exception as e:  # no GPU or driver: TensorRT raises its own types
        raise BuildError(f"TensorRT {version} cannot create a builder here ({_one_line(e)}): {INSTALL}") from None
    if builder is None:
        raise BuildError(f"TensorRT {version} cannot create a builder here (no CUDA device?): {INSTALL}")
    return trt


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


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
        raise BuildError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    if network.num_inputs != 1:
        raise BuildError(f"{onnx_path.name} has {network.num_inputs} inputs, an image encoder has one: re-export it")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib << 20)
    cache_file = spec.timing_cache
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")
    if not config.set_timing_cache(cache, False):
        raise BuildError(f"TensorRT refuses the timing cache {cache_file} (another GPU or TensorRT?): delete it")
    profile = builder.create_optimization_profile()
    shape = tuple(spec.input_shape)
    profile.set_shape(network.get_input(0).name, shape, shape, shape)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT could not build a plan from {onnx_path.name} (its log above says why)")
    _write_atomic(plan_path, bytes(serialized))
    if cache_file is not None:
        _write_atomic(cache_file, bytes(config.get_timing_cache().serialize()))
    return plan_path


OpenPlan = Callable[[Path, tuple[int, ...]], Engine]


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
    open_plan: OpenPlan | None = None,
) -> Manifest:
    """Build, check and record the plans of both image encoders in ``d``; the manifest with them (not written)."""
    if opts.int8:
        raise BuildError(INT8_REFUSED)
    precision = opts.precision
    missing = [e for e in ENCODERS if precision not in getattr(manifest, e).files]
    if missing:
        raise BuildError(f"the bundle has no {precision} {' or '.join(missing)} model: re-export with --{precision}")
    device = this_device()
    cache = opts.timing_cache or default_timing_cache(device)
    size = manifest.image_size
    shape = (1, 3, size, size)
    inputs = encoder_inputs(manifest, synthetic_frames(opts.frames))
    manifest = dataclasses.replace(manifest)
    for e in ENCODERS:
        info: EncoderInfo = getattr(manifest, e)
        source = info.files[precision]
        plan = d / (info.files["fp32"].removesuffix(".onnx") + f".{precision}.plan")
        log(f"building {plan.name} from {source} on {device} (minutes on a Jetson; timing cache {cache})")
        build_plan(trt, d / source, plan, PlanSpec(shape, opts.workspace_mib, cache))
        log(f"checking {plan.name} against {info.files['fp32']} on the CPU ({opts.frames} frames)")
        reference = OnnxEncoder(d / info.files["fp32"], [PROVIDERS["cpu"]], input_shape=shape)
        engine = (open_plan or _open_plan)(plan, shape)
        try:
            check = check_plan(engine, reference, [x[e] for x in inputs])
        finally:
            engine.close()
            reference.close()
        if check.min_cosine < opts.min_cosine:
            raise BuildError(
                f"{plan.name} reaches a worst per-token cosine of {check.min_cosine:.4f} against fp32, under "
                f"{opts.min_cosine}: nothing written; build without --fp16, or run ovseg-check on the ONNX files"
            )
        key = f"trt_{precision}"
        record = PlanRecord(
            source, device.tensorrt, device.gpu, device.compute_capability, check.min_cosine, check.mean_cosine
        )
        log(f"{plan.name}: worst cosine {check.min_cosine:.4f}, mean {check.mean_cosine:.4f}")
        setattr(
            manifest,
            e,
            dataclasses.replace(info, files={**info.files, key: plan.name}, plans={**info.plans, key: record}),
        )
    return manifest


def build_bundle(opts: BuildOptions, open_plan: OpenPlan | None = None) -> Manifest:
    """ovseg-build: the bundle with its plans, replaced in one rename, or untouched when anything fails."""
    trt = load_tensorrt()
    bundle = Path(opts.bundle).expanduser()
    manifest = read_manifest(bundle)
    if opts.int8:
        raise BuildError(INT8_REFUSED)
    try:
        with atomic_bundle_dir(bundle, force=True) as tmp:
            link_tree(bundle, tmp)
            manifest = build_dir(tmp, manifest, opts, trt, lambda m: say(PROG, m), open_plan)
            _write_manifest(tmp, manifest)
    except OSError as e:
        raise BuildError(f"cannot write the bundle {bundle} ({e.strerror or e}): make it writable") from None
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_bundle_argument(p, "bundle to build plans for")
    p.add_argument("--fp16", action="store_true", help="plans from the fp16 ONNX files (default: the fp32 ones)")
    p.add_argument("--int8", action="store_true", help="int8 plans (refused: no symmetric int8 model yet)")
    p.add_argument("--workspace", type=positive_int, default=2048, metavar="MiB", help="builder workspace (2048)")
    p.add_argument("--timing-cache", type=Path, metavar="FILE", help="default: under OVSEG_HOME, per GPU and TensorRT")
    p.add_argument("--frames", type=positive_int, default=DEFAULT_FRAMES, help="sample frames each plan is checked on")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = BuildOptions(args.bundle, args.fp16, args.int8, args.workspace, args.timing_cache, args.frames)

    def body() -> int:
        build_bundle(opts)
        say(PROG, f"{opts.precision} plans written into {opts.bundle}")
        return 0

    return run_cli(PROG, body, aftermath=f"{opts.bundle} is unchanged")


if __name__ == "__main__":
    sys.exit(main())
