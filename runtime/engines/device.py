"""This device as engines and their records name it: the GPU that CUDA calls device 0 (a Jetson's model from the device
tree, else cuda-python's, else nvidia-smi's), its compute capability, the TensorRT version a plan is built with, and
what to do when a CUDA call fails."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from ovseg.environment import cuda_major, driver_cuda, installed, is_jetson
from ovseg.errors import SegmenterError

from ..bundle.manifest import DeviceInfo


def device_key() -> str:
    """The GPU's name as a path component ("nvidia-geforce-rtx-4090"), or "gpu0" when nothing here tells it."""
    name = gpu_name()
    key = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") if name else ""
    return key or "gpu0"


@functools.lru_cache(maxsize=1)
def gpu_name() -> str | None:
    """The name of the GPU that CUDA calls device 0 (ONNX Runtime's and TensorRT's): a Jetson's model from the device
    tree, else cuda-python's, else nvidia-smi's; None when none tells."""
    model = Path("/proc/device-tree/model")
    if is_jetson() and model.is_file():
        return model.read_text(errors="replace").strip("\0 \n") or None
    try:
        err, prop = _cudart().cudaGetDeviceProperties(0)
    except Exception:  # whatever cuda-python raises without itself, a driver or a device: nvidia-smi may know
        err = None
    if err is not None and int(err) == 0:
        return _device_name(prop) or None
    return _nvidia_smi("name")


def _device_name(prop) -> str:
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return name.strip("\0 ")


def _nvidia_smi(field: str) -> str | None:
    """nvidia-smi's ``field`` of the GPU CUDA calls device 0, the first of CUDA_VISIBLE_DEVICES (an index or a UUID),
    else 0; None without nvidia-smi, a visible GPU or an answer. An index names the same GPU for both only in PCI bus
    order (CUDA_DEVICE_ORDER=PCI_BUS_ID, or GPUs all alike); a UUID always does."""
    device = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    smi = shutil.which("nvidia-smi")
    if smi is None or not device or device.startswith("-"):
        return None
    try:
        out = subprocess.run(
            [smi, f"--query-gpu={field}", "--format=csv,noheader", f"--id={device}"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return lines[0].strip() if lines else None


@functools.lru_cache(maxsize=1)
def this_device() -> DeviceInfo:
    """TensorRT's version and GPU 0's name and compute capability (cuda-python), as a plan's record has them."""
    import tensorrt as trt

    err, prop = _cudart().cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise SegmenterError(
            f"CUDA cannot read the GPU's properties ({getattr(err, 'name', err)}): {cuda_error_fix(err)}"
        )
    return DeviceInfo(str(trt.__version__), _device_name(prop), f"{prop.major}.{prop.minor}")


def cuda_error_fix(err) -> str:
    """What to do about a cuda-python call that failed with ``err``: cuda-python is built for one CUDA major (13.x
    needs driver 580+; JetPack 6 is CUDA 12), and every call fails where the driver is missing or older."""
    if int(err) != 35:  # cudaErrorInsufficientDriver: no driver, or one older than cuda-python's CUDA
        return "check the GPU and driver with nvidia-smi"
    bindings = installed(("cuda-bindings", "cuda-python"))
    version = bindings.get("cuda-bindings") or bindings.get("cuda-python") or "?"
    driver = driver_cuda()
    major = cuda_major(driver)
    if major is None:
        return f"no NVIDIA driver answers (cuda-python {version} needs one): install it, check it with nvidia-smi"
    return (
        f"cuda-python {version} needs a newer driver than this one, which runs CUDA {driver} at most: "
        f"pip install 'cuda-python>={major},<{major + 1}'"
    )


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
