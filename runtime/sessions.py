"""Inference engines: one ONNX Runtime session per encoder, the native TensorRT runner, and how both are chosen.

Every engine is created once and owns its input buffer: the preprocessor writes the next frame into
``engine.input`` and ``engine.run()`` returns the outputs by name (arrays the caller may keep).
What is asked for and not available (a provider, a precision file) is a one-line SegmenterError.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from ovseg.constants import BACKENDS
from ovseg.environment import gpu_onnxruntime_fix, gpu_unused_warning
from ovseg.errors import OvsegError
from ovseg.onnx_helpers import session_options

from .bundle import EncoderInfo, Manifest
from .precision import pick_precision

log = logging.getLogger("ovseg")

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
TRT_CACHE = "trt_cache"  # TensorRT EP engine cache, inside the bundle directory


class SegmenterError(OvsegError, RuntimeError):
    """The Segmenter cannot do what was asked; the message is one line saying what is missing."""


class Engine(Protocol):
    input: np.ndarray  # preallocated (1, 3, S, S) float32, written by the preprocessor

    def run(self) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def resolve_backend(backend: str, available: list[str] | None = None) -> str:
    """ "auto" -> "cuda" when ONNX Runtime has CUDA, else "cpu"; an explicit backend must be available."""
    if backend not in BACKENDS:
        raise SegmenterError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    available = ort.get_available_providers() if available is None else available
    if backend == "auto":
        unused = gpu_unused_warning(available)
        if unused:
            log.warning(unused)
        return "cuda" if PROVIDERS["cuda"] in available else "cpu"
    if PROVIDERS[backend] not in available:
        raise SegmenterError(
            f"backend {backend!r} needs ONNX Runtime's {PROVIDERS[backend]}, which this onnxruntime {ort.__version__} "
            f"does not have (it has {', '.join(available)}): {gpu_onnxruntime_fix()}, or use backend='cpu'"
        )
    return backend


def choose_precision(manifest: Manifest, backend: str, requested: str) -> str:
    """The image encoders' precision (runtime.precision.pick_precision: gated, never a silent fallback)."""
    try:
        return pick_precision(manifest, backend, requested)
    except ValueError as e:
        raise SegmenterError(str(e)) from None


def tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def open_engine(
    bundle_dir: Path, info: EncoderInfo, role: str, image_size: int, backend: str, precision: str, threads: int | None
) -> Engine:
    """The engine for one image encoder: a native TensorRT plan when there is one and TensorRT imports, else ONNX Runtime."""
    shape = (1, 3, image_size, image_size)
    plan = info.files.get(f"trt_{precision}")
    if backend == "tensorrt" and plan and tensorrt_importable():
        return TensorRTEngine(bundle_dir / plan, shape)
    if backend == "tensorrt" and precision == "int8":  # the EP cannot take the CPU's uint8 Q/DQ model, nor calibrate
        raise SegmenterError(
            f"int8 on TensorRT runs the {role} encoder's int8 plan, and "
            + (
                "the bundle has none: run `ovseg-calib` on this device (with tensorrt installed) to build it"
                if not plan
                else "the tensorrt package does not import here: pip install 'ovseg[tensorrt]'"
            )
        )
    onnx_file = info.files.get(precision)
    if backend == "tensorrt":
        onnx_file = info.files.get("fp32")  # the EP builds its own fp16 engine from the fp32 graph
    if onnx_file is None:
        raise SegmenterError(
            f"the bundle has only {', '.join(sorted(info.files))} for the {role} encoder, not an ONNX {precision} file: "
            f"re-export with `ovseg-export --{precision}`"
        )
    return OnnxEncoder(bundle_dir / onnx_file, providers(backend, precision, bundle_dir), threads, shape)


def providers(backend: str, precision: str, bundle_dir: Path) -> list:
    if backend == "cpu":
        return [PROVIDERS["cpu"]]
    if backend == "cuda":
        return [PROVIDERS["cuda"], PROVIDERS["cpu"]]  # CPU only for the few ops CUDA lacks, as ORT requires
    options = {
        "trt_fp16_enable": precision == "fp16",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(bundle_dir / TRT_CACHE),
    }
    return [(PROVIDERS["tensorrt"], options), PROVIDERS["cuda"], PROVIDERS["cpu"]]


class OnnxEncoder:
    """One ONNX Runtime session, created once, with a preallocated input and IO binding on a GPU."""

    def __init__(
        self,
        path: Path,
        providers: list,
        threads: int | None = None,
        input_shape: tuple[int, ...] | None = None,
        io_binding: bool | None = None,
    ):
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
        except Exception as e:  # ORT raises several unrelated types; all mean "this file cannot run here"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SegmenterError(f"ONNX Runtime cannot load {self.path.name}: {first}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise SegmenterError(
                f"{self.path.name} has {len(inputs)} inputs, the runtime feeds one: re-export the bundle"
            )
        self.input_name = inputs[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input = np.zeros(input_shape, np.float32) if input_shape else np.zeros(0, np.float32)
        if input_shape:
            _check_shape(self.path.name, inputs[0], input_shape)
        self.io_binding = self.session.get_providers()[0] != PROVIDERS["cpu"] if io_binding is None else io_binding
        self._binding = None
        if self.io_binding and input_shape:
            self._binding = self.session.io_binding()
            for name in self.output_names:
                self._binding.bind_output(name, "cpu")

    def run(self, x: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Run on ``x``, or on the preallocated ``self.input`` when ``x`` is None."""
        if x is None and self._binding is not None:
            self._binding.bind_cpu_input(self.input_name, self.input)  # ORT copies it to the device inside the run
            self.session.run_with_iobinding(self._binding)
            return dict(zip(self.output_names, self._binding.copy_outputs_to_cpu()))
        outputs = self.session.run(self.output_names, {self.input_name: self.input if x is None else x})
        return dict(zip(self.output_names, outputs))

    def close(self) -> None:
        self._binding = None
        self.session = None


def _check_shape(name: str, node, shape: tuple[int, ...]) -> None:
    declared = node.shape
    fits = len(declared) == len(shape) and all(not isinstance(d, int) or d == s for d, s in zip(declared, shape))
    if not fits or node.type != "tensor(float)":
        raise SegmenterError(
            f"{name} takes {node.name} {node.type} {list(declared)}, the runtime feeds float {list(shape)}: "
            "the file does not fit the manifest; re-export with `ovseg-export --force`"
        )


class TensorRTEngine:
    """A TensorRT 10 plan: deserialised once, device buffers allocated once, run with execute_async_v3 on one stream."""

    def __init__(self, plan: Path, input_shape: tuple[int, ...]):
        import tensorrt as trt

        self._cudart = _cudart()
        self.path = Path(plan)
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise SegmenterError(
                f"TensorRT cannot load {self.path.name} (plans are per device and TensorRT version): rebuild it here"
            )
        self.context = self.engine.create_execution_context()
        self.stream = self._cuda(self._cudart.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        inputs = [n for n in names if is_input[n]]
        if len(inputs) != 1:
            raise SegmenterError(f"{self.path.name} has {len(inputs)} inputs, the runtime feeds one")
        self.input_name = inputs[0]
        self.context.set_input_shape(self.input_name, input_shape)
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, int] = {}
        for n in names:
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
            self.host[n] = np.zeros(tuple(self.context.get_tensor_shape(n)), dtype)
            self.device[n] = self._cuda(self._cudart.cudaMalloc(self.host[n].nbytes))
            self.context.set_tensor_address(n, self.device[n])
        self.input = self.host[self.input_name]
        if self.input.shape != tuple(input_shape) or self.input.dtype != np.float32:
            raise SegmenterError(
                f"{self.path.name} takes {self.input.dtype} {self.input.shape}, the runtime feeds float32 {input_shape}"
            )
        self.output_names = [n for n in names if not is_input[n]]

    def _cuda(self, result):
        err, *values = result
        if int(err) != 0:
            raise SegmenterError(f"CUDA call failed with {err} while running {self.path.name}")
        return values[0] if values else None

    def run(self) -> dict[str, np.ndarray]:
        rt = self._cudart
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._cuda(
            rt.cudaMemcpyAsync(
                self.device[self.input_name], self.input.ctypes.data, self.input.nbytes, h2d, self.stream
            )
        )
        if not self.context.execute_async_v3(self.stream):
            raise SegmenterError(f"TensorRT failed to run {self.path.name}")
        for n in self.output_names:
            out = self.host[n]
            self._cuda(rt.cudaMemcpyAsync(out.ctypes.data, self.device[n], out.nbytes, d2h, self.stream))
        self._cuda(rt.cudaStreamSynchronize(self.stream))
        return {n: self.host[n].copy() for n in self.output_names}

    def close(self) -> None:
        for ptr in self.device.values():
            self._cudart.cudaFree(ptr)
        self.device.clear()
        if self.stream is not None:
            self._cudart.cudaStreamDestroy(self.stream)
            self.stream = None


def _cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise SegmenterError(
                "the TensorRT runner needs NVIDIA's cuda-python for device memory: pip install cuda-python"
            ) from None
    return runtime
