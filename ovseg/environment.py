"""Is this install right for this machine? One ONNX Runtime and one OpenCV, the GPU one where a GPU is, a GUI build
where windows are wanted, and GPU packages of one CUDA major that the driver runs. Each problem is one line with the
command that fixes it.

``python -m ovseg.environment`` prints what was found (``make setup`` runs it) and exits 2 on a problem that stops
ovseg from running; GPU packages that do not fit are warnings (the CPU still runs).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .errors import OvsegError

ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
OPENCV_DISTRIBUTIONS = (
    "opencv-python",
    "opencv-python-headless",
    "opencv-contrib-python",
    "opencv-contrib-python-headless",
)
TENSORRT_DISTRIBUTIONS = ("tensorrt-cu13", "tensorrt-cu12", "tensorrt")  # pip's, by CUDA major; else JetPack's
JETSON_RELEASE = Path("/etc/nv_tegra_release")


class InstallError(OvsegError, ImportError):
    """The Python environment cannot run ovseg as installed; the message says what to run."""


def installed(names: tuple[str, ...]) -> dict[str, str]:
    """The distributions among ``names`` that pip installed here, with their versions."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """This machine as far as CPU speed goes: "AMD EPYC, 2 logical CPUs". ovseg-calib's gate records the speed-up it
    measured under it, and precision "auto" on a CPU trusts a speed-up only when it was measured under the same key."""
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs"


def is_jetson() -> bool:
    return JETSON_RELEASE.is_file()


@functools.lru_cache(maxsize=1)
def nvidia_gpu_present() -> bool:
    """An NVIDIA driver is loaded (desktop GPU: /proc/driver/nvidia/gpus; Jetson: its Tegra release file)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or is_jetson()


def _flavour_fix() -> str:
    if is_jetson():
        return "pip install onnxruntime-gpu from NVIDIA's Jetson index (docs/install.md: Jetson)"
    return (
        f"pip install -e '.[{cuda_extra('gpu')}]'"
        if nvidia_gpu_present() and platform.machine() == "x86_64"
        else "pip install -e '.[cpu]'"
    )


def check_onnxruntime() -> None:
    """One ONNX Runtime distribution, and a module to import."""
    ort = installed(ORT_DISTRIBUTIONS)
    if len(ort) > 1:
        raise InstallError(
            f"both {' and '.join(f'{n} {v}' for n, v in ort.items())} are installed and overwrite each other's files "
            f"(the CPU one wins silently): run `pip uninstall -y {' '.join(ort)}` then `{_flavour_fix()}`"
        )
    if importlib.util.find_spec("onnxruntime") is None:
        how = _flavour_fix() if not ort else f"pip install --force-reinstall {next(iter(ort))}"
        raise InstallError(f"ONNX Runtime is not installed: run `{how}`")


def check_opencv() -> None:
    """One OpenCV distribution (pip's or the system's, e.g. JetPack's), and a module to import."""
    cv = installed(OPENCV_DISTRIBUTIONS)
    if len(cv) > 1:
        keep = "opencv-python" if "opencv-python" in cv else next(iter(cv))
        raise InstallError(
            f"{' and '.join(f'{n} {v}' for n, v in cv.items())} are installed and overwrite each other's cv2: "
            f"run `pip uninstall -y {' '.join(cv)}` then `pip install {keep}`"
        )
    if importlib.util.find_spec("cv2") is None:
        how = (
            "pip install -e '.[gui]'"
            if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
            else "pip install -e '.[headless]'"
        )
        if is_jetson():
            how = "sudo apt-get install python3-opencv (JetPack's OpenCV, with GStreamer), in a venv made with --system-site-packages"
        raise InstallError(f"OpenCV is not installed: run `{how}`")


def check_install() -> None:
    """Refuse an environment that cannot run: two ONNX Runtimes or two OpenCVs, or none. Imports neither."""
    check_onnxruntime()
    check_opencv()


def gpu_onnxruntime_fix() -> str:
    """The commands that replace this ONNX Runtime with the GPU one."""
    gpu = _flavour_fix().replace("[cpu]", f"[{cuda_extra('gpu')}]")
    return f"run `pip uninstall -y {' '.join(installed(ORT_DISTRIBUTIONS)) or 'onnxruntime'}` then `{gpu}`"


def gpu_unused_warning(available_providers: list[str]) -> str | None:
    """A line for an NVIDIA GPU that ONNX Runtime cannot use (the CPU build is installed), else None."""
    if not nvidia_gpu_present() or "CUDAExecutionProvider" in available_providers:
        return None
    return f"an NVIDIA GPU is present but this ONNX Runtime has no CUDA provider, so everything runs on the CPU: {gpu_onnxruntime_fix()}"


# The GPU packages. Each is built for one CUDA major, which the driver must run (a CUDA 12 driver runs 12, 580+ runs
# 13): onnxruntime-gpu (build_and_package_info.cuda_version), cuda-python (its major), TensorRT (tensorrt-cu12/-cu13).
# ONNX Runtime's TensorRT provider also links one TensorRT major (libnvinfer.so.10), which the tensorrt package must be.


@dataclass(frozen=True)
class GpuPackages:
    """What this environment has for the GPU, as installed; None where absent."""

    driver_cuda: str | None  # the newest CUDA the driver runs: "12.6"
    onnxruntime: str | None  # ONNX Runtime's version: "1.31.1"
    onnxruntime_cuda: str | None  # the CUDA it was built for: "13.0"; None for a CPU build
    cuda_python: str | None  # cuda-python's bindings: "13.4.4"
    tensorrt: dict[str, str]  # the tensorrt distributions, the tensorrt module's first: {"tensorrt-cu13": "10.16.1.11"}
    tensorrt_link: str | None  # the libnvinfer ONNX Runtime's TensorRT provider links: "libnvinfer.so.10"


def parse_driver_cuda(nvidia_smi_output: str) -> str | None:
    """The CUDA version in nvidia-smi's header ("| NVIDIA-SMI 560.35.03   Driver Version: 560.35.03   CUDA Version:
    12.6 |" gives "12.6"); None when there is none (without a driver nvidia-smi prints why instead)."""
    found = re.search(r"CUDA Version: *(\d+\.\d+)", nvidia_smi_output)
    return found.group(1) if found else None


@functools.lru_cache(maxsize=1)
def driver_cuda() -> str | None:
    """The newest CUDA the NVIDIA driver runs, as nvidia-smi says; "12" on JetPack 6 (L4T R36) without nvidia-smi;
    None without a driver."""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            return parse_driver_cuda(subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout)
        except (OSError, subprocess.SubprocessError):
            return None
    return "12" if is_jetson() and JETSON_RELEASE.read_text().startswith("# R36") else None


def cuda_major(version: str | None) -> int | None:
    return int(version.split(".")[0]) if version else None


def cuda_extra(name: str, major: int | None = None) -> str:
    """The extra of ``name`` ("gpu", "tensorrt") for CUDA ``major``, by default the driver's: [gpu] is CUDA 13,
    [gpu-cu12] CUDA 12 (also the nearest for older drivers); 13 where no driver says."""
    major = major or cuda_major(driver_cuda()) or 13
    return name if major >= 13 else f"{name}-cu12"


def tensorrt_link() -> str | None:
    """The libnvinfer ONNX Runtime's TensorRT provider links ("libnvinfer.so.10"), read from the provider's bytes
    (loading it needs TensorRT and CUDA); None without one."""
    spec = importlib.util.find_spec("onnxruntime")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        library = Path(folder, "capi", "libonnxruntime_providers_tensorrt.so")
        if library.is_file():
            found = re.search(rb"libnvinfer\.so\.\d+", library.read_bytes())
            return found.group().decode() if found else None
    return None


def tensorrt_fix() -> str:
    """The command that installs the TensorRT Python package that fits this machine."""
    if is_jetson():
        return (
            "sudo apt-get install python3-libnvinfer (JetPack's TensorRT), in a venv made with --system-site-packages"
        )
    return f"pip install -e '.[{cuda_extra('tensorrt')}]'"


def gpu_packages() -> GpuPackages:
    """What this environment has for the GPU (reads onnxruntime's build record; loads no provider)."""
    try:
        from onnxruntime.capi import build_and_package_info as ort_build
    except ImportError:
        ort_build = None
    cuda_python = installed(("cuda-bindings", "cuda-python"))  # the bindings are cuda-bindings since 12.6
    return GpuPackages(
        driver_cuda=driver_cuda(),
        onnxruntime=getattr(ort_build, "__version__", None),
        onnxruntime_cuda=getattr(ort_build, "cuda_version", None) or None,
        cuda_python=cuda_python.get("cuda-bindings") or cuda_python.get("cuda-python"),
        tensorrt=installed(TENSORRT_DISTRIBUTIONS),
        tensorrt_link=tensorrt_link(),
    )


def gpu_report(found: GpuPackages) -> list[str]:
    """The CUDA line and the TensorRT line, where this machine or environment has anything for the GPU."""
    lines = []
    if found.driver_cuda or found.onnxruntime_cuda or found.tensorrt:
        ort = f"CUDA {found.onnxruntime_cuda}" if found.onnxruntime_cuda else "the CPU only"
        lines.append(
            f"CUDA: driver {found.driver_cuda or 'none (no nvidia-smi or no driver)'}; ONNX Runtime built for {ort}; "
            f"cuda-python {found.cuda_python or 'not installed'}"
        )
    if found.tensorrt or found.tensorrt_link:
        trt = ", ".join(f"{n} {v}" for n, v in found.tensorrt.items()) or "not installed"
        link = f"; ONNX Runtime's TensorRT provider links {found.tensorrt_link}" if found.tensorrt_link else ""
        lines.append(f"TensorRT: {trt}{link}")
    return lines


def gpu_problems(found: GpuPackages) -> list[str]:
    """Each GPU package that does not fit the driver or the others, one line with the command that fixes it."""
    driver, ort, cuda_python = (cuda_major(v) for v in (found.driver_cuda, found.onnxruntime_cuda, found.cuda_python))
    runs = f"this driver runs CUDA {found.driver_cuda} at most"
    problems = []
    if driver and ort and ort > driver:
        problems.append(f"onnxruntime-gpu {found.onnxruntime} is a CUDA {ort} build and {runs}: run `{_flavour_fix()}`")
    if driver and cuda_python and cuda_python > driver:
        problems.append(
            f"cuda-python {found.cuda_python} needs a CUDA {cuda_python} driver and {runs} (each "
            f"call fails with cudaErrorInsufficientDriver): run `pip install 'cuda-python>={driver},<{driver + 1}'`"
        )
    if found.tensorrt:
        dist, version = next(iter(found.tensorrt.items()))
        trt_cuda = {"tensorrt-cu13": 13, "tensorrt-cu12": 12}.get(dist)  # None: JetPack's, built for its CUDA
        why = []
        if found.tensorrt_link and found.tensorrt_link.rsplit(".", 1)[1] != version.split(".")[0]:
            why.append(f"ONNX Runtime's TensorRT provider links {found.tensorrt_link}")
        if driver and trt_cuda and trt_cuda > driver:
            why.append(runs)
        extra = cuda_extra("tensorrt", driver or ort)
        fix = (
            _flavour_fix()
            if trt_cuda is None
            else f"pip uninstall -y {' '.join(found.tensorrt)}` then `pip install -e '.[{extra}]'"
        )
        if why:
            problems.append(f"the tensorrt package is TensorRT {version} ({dist}) but {' and '.join(why)}: run `{fix}`")
    return problems


def report() -> list[str]:
    """What this environment has, one fact a line."""
    import cv2
    import onnxruntime as ort

    from ovseg.runtime.io.display import gui_backend, has_gstreamer

    ort_dist = (
        ", ".join(f"{n} {v}" for n, v in installed(ORT_DISTRIBUTIONS).items())
        or f"onnxruntime {ort.__version__} (not from pip)"
    )
    cv_dist = (
        ", ".join(f"{n} {v}" for n, v in installed(OPENCV_DISTRIBUTIONS).items())
        or f"OpenCV {cv2.__version__} (system)"
    )
    lines = [
        f"machine: {platform.machine()}{', Jetson' if is_jetson() else ''}{', NVIDIA GPU' if nvidia_gpu_present() else ''}",
        f"ONNX Runtime: {ort_dist}; providers {', '.join(ort.get_available_providers())}",
        f"OpenCV: {cv_dist}; GUI {gui_backend() or 'none'}; GStreamer {'yes' if has_gstreamer() else 'no'}",
    ]
    gpu = gpu_packages()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        from ovseg.runtime.engines.sessions import provider_problem  # loads pip's CUDA libraries, opens a session

        problem = provider_problem("CUDAExecutionProvider")
        lines.append(
            f"ONNX Runtime's CUDA provider: {'runs here' if problem is None else f'cannot run here: {problem}'}"
        )
    warnings = [gpu_unused_warning(ort.get_available_providers()), *gpu_problems(gpu)]
    return lines + gpu_report(gpu) + [f"warning: {w}" for w in warnings if w]


def main() -> int:
    try:
        check_install()
    except InstallError as e:
        print(f"ovseg: error: {e}", file=sys.stderr)
        return 2
    for line in report():
        print(f"ovseg: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
