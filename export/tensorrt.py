"""TensorRT plans from the bundle's ONNX files. Plans are per device: build them on the device that runs them.

Written against the TensorRT 10 Python API; needs a CUDA GPU (not exercised on CPU-only machines).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ExportError


@dataclass
class EngineSpec:
    """What trtexec would be told: precision flags, workspace and the shapes of every dynamic input."""

    fp16: bool = True
    int8: bool = False
    workspace_mib: int = 2048
    # input name -> (min, opt, max) shapes
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] | None = None
    calibrator: object | None = None  # a trt.IInt8Calibrator for --int8 without a QDQ model


def tensorrt_available() -> str | None:
    """The TensorRT version, or None when it does not import."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt.__version__


def build_engine(onnx_path: Path, plan_path: Path, spec: EngineSpec) -> Path:
    """Parse ``onnx_path`` and serialise an engine to ``plan_path`` (written to a temporary file, then renamed)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib << 20)
    if spec.fp16:
        if not builder.platform_has_fast_fp16:
            raise ExportError("--fp16 asked for, but this GPU has no fast fp16: build without --fp16")
        config.set_flag(trt.BuilderFlag.FP16)
    if spec.int8:
        if not builder.platform_has_fast_int8:
            raise ExportError("--int8 asked for, but this GPU has no fast int8: build without --int8")
        config.set_flag(trt.BuilderFlag.INT8)
        if spec.calibrator is not None:
            config.int8_calibrator = spec.calibrator
    # LayerNorm and Softmax stay in fp32, as in the ONNX fp16 variants.
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX):
            layer.precision = trt.float32
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if spec.shapes and tensor.name in spec.shapes:
            profile.set_shape(tensor.name, *spec.shapes[tensor.name])
        elif any(d < 0 for d in tensor.shape):
            fixed = tuple(1 if d < 0 else d for d in tensor.shape)
            profile.set_shape(tensor.name, fixed, fixed, fixed)
    config.add_optimization_profile(profile)
    if spec.int8 and spec.calibrator is not None:
        config.set_calibration_profile(profile)  # calibration runs at these shapes (the inputs may be dynamic)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path.name} (see the TensorRT log above)")
    tmp = plan_path.with_suffix(".plan.tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(plan_path)
    return plan_path
