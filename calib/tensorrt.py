"""TensorRT INT8 calibration (GPU only): an IInt8EntropyCalibrator2 fed the same preprocessed frames as ONNX Runtime's.

Pass it to the plan builder: ``EngineSpec(fp16=True, int8=True, calibrator=entropy_calibrator(frames, cache))``.
TensorRT reads the cache file when it exists (no calibration run then) and writes it after calibrating. Device
memory comes from NVIDIA's cuda-python, which the runtime's TensorRT runner uses too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .data import CalibrationError

CACHE_SUFFIX = ".int8.trt.calib"


def trt_cache_path(model_path: Path) -> Path:
    """``dinov2.onnx`` -> ``dinov2.int8.trt.calib`` next to it (per TensorRT version and network, like the plan)."""
    return model_path.with_name(model_path.name.removesuffix(".onnx") + CACHE_SUFFIX)


def entropy_calibrator(frames: np.ndarray, cache: Path, batch_size: int = 1):
    """An ``IInt8EntropyCalibrator2`` over ``frames`` (N, 3, S, S) float32, preprocessed as the runtime does."""
    try:
        import tensorrt as trt
    except ImportError:
        raise CalibrationError(
            "TensorRT INT8 calibration needs the tensorrt package and a CUDA GPU: pip install 'ovseg[tensorrt]' on the device"
        ) from None
    from ovseg.runtime.sessions import SegmenterError, _cudart

    try:
        cudart = _cudart()
    except SegmenterError as e:
        raise CalibrationError(str(e)) from None
    frames = np.ascontiguousarray(frames, dtype=np.float32)
    if frames.ndim != 4 or len(frames) < batch_size:
        raise CalibrationError(
            f"TensorRT calibration needs (N >= {batch_size}, 3, S, S) frames, got shape {frames.shape}"
        )

    def check(result):
        err, *values = result
        if int(err) != 0:
            raise CalibrationError(f"CUDA call failed with {err} during TensorRT calibration")
        return values[0] if values else None

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.cache = Path(cache)
            self.batch_size = batch_size
            self.index = 0
            self.nbytes = frames[:batch_size].nbytes
            self.device = check(cudart.cudaMalloc(self.nbytes))

        def get_batch_size(self) -> int:
            return self.batch_size

        def get_batch(self, names):
            if self.index + self.batch_size > len(frames):
                return None
            batch = frames[self.index : self.index + self.batch_size]
            kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            check(cudart.cudaMemcpy(self.device, batch.ctypes.data, self.nbytes, kind))
            self.index += self.batch_size
            return [int(self.device)]

        def read_calibration_cache(self):
            return self.cache.read_bytes() if self.cache.is_file() else None

        def write_calibration_cache(self, data) -> None:
            tmp = self.cache.with_name(f".{self.cache.name}.tmp-{os.getpid()}")
            tmp.write_bytes(bytes(data))
            os.replace(tmp, self.cache)

        def close(self) -> None:
            if self.device is not None:
                cudart.cudaFree(self.device)
                self.device = None

    return EntropyCalibrator()


def build_int8_plans(
    d: Path,
    files: dict[str, dict[str, str]],
    frames: dict[str, np.ndarray],
    image_size: int,
    reuse_cache: dict[str, bool],
    say,
) -> dict[str, str]:
    """TensorRT INT8 plans (``<model>.int8.plan``) of the image encoders in ``d``, where TensorRT imports; role -> plan.

    Implicit quantisation of the fp32 ONNX (TensorRT's explicit Q/DQ path wants symmetric int8 activations, the
    ONNX Runtime model has asymmetric uint8 ones), calibrated by the entropy calibrator on the same frames. A role's
    calibration cache is kept only when ``reuse_cache[role]`` (its ONNX Runtime calibration was reused: same model,
    frames and method). LayerNorm and Softmax stay fp32, the rest may run fp16. These plans are not gated here: the
    gate measures ONNX Runtime on the CPU.
    """
    from ovseg.export.errors import ExportError
    from ovseg.export.tensorrt import EngineSpec, build_engine, tensorrt_available

    version = tensorrt_available()
    if version is None:
        return {}
    shape = (1, 3, image_size, image_size)
    plans = {}
    for role, role_files in files.items():
        fp32 = d / role_files["fp32"]
        cache = trt_cache_path(fp32)
        if not reuse_cache.get(role, False):
            cache.unlink(missing_ok=True)
        plan = fp32.with_name(fp32.name.removesuffix(".onnx") + ".int8.plan")
        say(f"TensorRT {version}: building {plan.name} (INT8, entropy calibration on {len(frames[role])} frames)")
        calibrator = entropy_calibrator(frames[role], cache)
        try:
            build_engine(
                fp32,
                plan,
                EngineSpec(fp16=True, int8=True, calibrator=calibrator, shapes={"pixel_values": (shape, shape, shape)}),
            )
        except ExportError as e:
            raise CalibrationError(str(e)) from None
        finally:
            calibrator.close()
        plans[role] = plan.name
    return plans
