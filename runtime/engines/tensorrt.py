"""The native TensorRT runner: a plan that ``ovseg-build`` built on this device, run with TensorRT's Python bindings on
device memory from cuda-python (engines.device)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ovseg.errors import SegmenterError

from .device import _cudart, cuda_error_fix
from .sessions import _pick_outputs


def tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


class TensorRTEngine:
    """A TensorRT 10 plan: deserialised once; a device buffer per tensor, pinned host buffers for the input and the
    outputs read, allocated once; run with execute_async_v3 on one stream. Never run on a GPU yet (docs/gpu.md)."""

    backend = "tensorrt"
    max_batch = 1  # ovseg-build's plans have one profile, of batch 1

    def __init__(self, plan: Path, input_shape: tuple[int, ...], outputs: Sequence[str] | None = None):
        import tensorrt as trt

        self._cudart = _cudart()
        self.path = Path(plan)
        self.stream = None
        self.device: dict[str, int] = {}
        self.pinned: dict[str, int] = {}
        self.host: dict[str, np.ndarray] = {}
        try:
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        except TypeError:  # the bindings' NULL runtime: no usable GPU or driver (TensorRT logged why)
            raise SegmenterError(
                f"TensorRT cannot create a runtime here for {self.path.name} (no usable CUDA GPU or driver: TensorRT's "
                "message above says which): check it with nvidia-smi, or use backend='cpu'"
            ) from None
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise SegmenterError(
                f"TensorRT cannot load {self.path.name} (plans are per device and TensorRT version): rebuild it here"
            )
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise SegmenterError(
                f"TensorRT cannot create an execution context for {self.path.name} (out of GPU memory?)"
            )
        try:
            self._allocate(trt, tuple(input_shape), outputs)
        except BaseException:
            self.close()
            raise

    def _allocate(self, trt, input_shape: tuple[int, ...], outputs: Sequence[str] | None) -> None:
        rt = self._cudart
        self.stream = self._cuda(rt.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        inputs = [n for n in names if is_input[n]]
        if len(inputs) != 1:
            raise SegmenterError(f"{self.path.name} has {len(inputs)} inputs, the runtime feeds one")
        self.input_name = inputs[0]
        if not self.context.set_input_shape(self.input_name, input_shape):
            raise SegmenterError(
                f"{self.path.name} does not take {self.input_name} of shape {input_shape} (outside its optimisation "
                "profile): rebuild the plan from this bundle"
            )
        self.output_names = _pick_outputs(self.path.name, [n for n in names if not is_input[n]], outputs)
        for n in names:
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
            shape = tuple(self.context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise SegmenterError(f"{self.path.name} leaves the shape of {n} open ({shape}) at input {input_shape}")
            nbytes = int(np.prod(shape)) * dtype.itemsize
            self.device[n] = self._cuda(rt.cudaMalloc(nbytes))
            self.context.set_tensor_address(n, self.device[n])
            if n == self.input_name or n in self.output_names:
                self.pinned[n] = self._cuda(rt.cudaMallocHost(nbytes))
                buffer = (ctypes.c_byte * nbytes).from_address(self.pinned[n])
                self.host[n] = np.frombuffer(buffer, dtype).reshape(shape)
        self.input = self.host[self.input_name]
        if self.input.shape != input_shape or self.input.dtype != np.float32:
            raise SegmenterError(
                f"{self.path.name} takes {self.input.dtype} {self.input.shape}, the runtime feeds float32 {input_shape}"
            )

    def _cuda(self, result):
        err, *values = result
        if int(err) != 0:
            raise SegmenterError(
                f"CUDA call failed with {getattr(err, 'name', err)} while running {self.path.name}: {cuda_error_fix(err)}"
            )
        return values[0] if values else None

    def run(self) -> dict[str, np.ndarray]:
        rt = self._cudart
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        x = self.host[self.input_name]
        self._cuda(rt.cudaMemcpyAsync(self.device[self.input_name], x.ctypes.data, x.nbytes, h2d, self.stream))
        if not self.context.execute_async_v3(self.stream):
            raise SegmenterError(f"TensorRT failed to run {self.path.name}")
        for n in self.output_names:
            out = self.host[n]
            self._cuda(rt.cudaMemcpyAsync(out.ctypes.data, self.device[n], out.nbytes, d2h, self.stream))
        self._cuda(rt.cudaStreamSynchronize(self.stream))
        # The next run overwrites the pinned buffers, and callers keep outputs (keyframes, per thread): one host copy.
        return {n: self.host[n].copy() for n in self.output_names}

    def close(self) -> None:
        rt = self._cudart
        for ptr in self.device.values():
            rt.cudaFree(ptr)
        for ptr in self.pinned.values():
            rt.cudaFreeHost(ptr)
        self.device.clear()
        self.pinned.clear()
        self.host.clear()
        self.input = np.zeros(0, np.float32)  # the pinned buffer it viewed is freed
        if self.stream is not None:
            rt.cudaStreamDestroy(self.stream)
            self.stream = None
        self.context = None
        self.engine = None
