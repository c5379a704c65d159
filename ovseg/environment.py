"""Is this install right for this machine? One ONNX Runtime and one OpenCV, the GPU one where a GPU is, a GUI build
where windows are wanted. Each problem is one line with the command that fixes it.

``python -m ovseg.environment`` prints what was found (``make setup`` runs it) and exits 2 on a problem.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import sys
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
        return "pip install onnxruntime-gpu from NVIDIA's Jetson index (README: Jetson)"
    return (
        "pip install -e '.[gpu]'"
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
    gpu = _flavour_fix().replace("[cpu]", "[gpu]")
    return f"run `pip uninstall -y {' '.join(installed(ORT_DISTRIBUTIONS)) or 'onnxruntime'}` then `{gpu}`"


def gpu_unused_warning(available_providers: list[str]) -> str | None:
    """A line for an NVIDIA GPU that ONNX Runtime cannot use (the CPU build is installed), else None."""
    if not nvidia_gpu_present() or "CUDAExecutionProvider" in available_providers:
        return None
    return f"an NVIDIA GPU is present but this ONNX Runtime has no CUDA provider, so everything runs on the CPU: {gpu_onnxruntime_fix()}"


def report() -> list[str]:
    """What this environment has, one fact a line."""
    import cv2
    import onnxruntime as ort

    from ovseg.runtime.display import gui_backend, has_gstreamer

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
    warning = gpu_unused_warning(ort.get_available_providers())
    return lines + ([f"warning: {warning}"] if warning else [])


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
