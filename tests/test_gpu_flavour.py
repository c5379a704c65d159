"""The GPU flavour as a user installs it, on a machine without a GPU: the real onnxruntime-gpu and cuda-python in
`.venv-gpu` (`make gpu-setup`), and the oldest ONNX Runtime the runtime supports in `.venv-serve`. Each test runs the
runtime in that environment as a child process."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_PYTHON = ROOT / ".venv-gpu" / "bin" / "python"
SERVE_PYTHON = ROOT / ".venv-serve" / "bin" / "python"


def driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


needs_gpu_venv = pytest.mark.skipif(not GPU_PYTHON.exists(), reason="no .venv-gpu: run `make gpu-setup`")
without_a_driver = pytest.mark.skipif(driver_present(), reason="an NVIDIA driver is here: CUDA may run")


def run(python: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=timeout, env=env)


def python_in(python: Path, code: str) -> subprocess.CompletedProcess:
    return run(python, "-c", textwrap.dedent(code))


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("frames") / "frame.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8))
    return path


@needs_gpu_venv
@without_a_driver
def test_auto_runs_on_the_cpu_with_onnxruntime_gpu_and_says_why(tiny_bundle, image):
    out = run(GPU_PYTHON.with_name("ovseg-run"), "--bundle", str(tiny_bundle), "--image", str(image), "--json")
    assert out.returncode == 0, out.stderr
    assert "backend cpu" in out.stderr
    notice = [line for line in out.stderr.splitlines() if "backend auto runs on the CPU" in line]
    assert len(notice) == 1 and "no NVIDIA driver (libcuda.so.1 does not load)" in notice[0], out.stderr
    assert len(json.loads(out.stdout.splitlines()[0])["segments"]) > 0


@needs_gpu_venv
@without_a_driver
@pytest.mark.parametrize("backend", ["cuda", "tensorrt"])
def test_an_explicit_gpu_backend_that_cannot_run_is_one_line(tiny_bundle, image, backend):
    out = run(
        GPU_PYTHON.with_name("ovseg-run"), "--bundle", str(tiny_bundle), "--image", str(image), "--backend", backend
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"backend '{backend}' cannot run here: no NVIDIA driver (libcuda.so.1 does not load)" in lines[0]


@needs_gpu_venv
@without_a_driver
def test_the_cuda_provider_finds_the_libraries_pip_installed():
    """onnxruntime-gpu's providers have no RPATH to the CUDA wheels' folders: loaded first (load_gpu_libraries), all
    they link is found but the driver's libcuda.so.1."""
    out = python_in(
        GPU_PYTHON,
        """
        import ctypes, pathlib, onnxruntime as ort
        from ovseg.runtime.engines import sessions
        provider = str(pathlib.Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so")
        for step in ("before", "after"):
            if step == "after":
                sessions.load_gpu_libraries("CUDAExecutionProvider")
            try:
                ctypes.CDLL(provider)
            except OSError as e:
                print(e)
        """,
    )
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.splitlines()
    assert before.startswith("lib") and not before.startswith("libcuda.so.1:"), before  # a CUDA library
    assert after == "libcuda.so.1: cannot open shared object file: No such file or directory"


@needs_gpu_venv
@without_a_driver
def test_cuda_python_without_a_driver_says_so(tiny_bundle):
    """Every cuda-python call fails with cudaErrorInsufficientDriver where no driver (or an older one) is: a plan's
    device check says which, not the bare error code."""
    out = python_in(
        GPU_PYTHON,
        """
        import sys, types
        sys.modules["tensorrt"] = types.SimpleNamespace(__version__="10.16.1.11")  # its libraries do not install here
        from ovseg.errors import SegmenterError
        from ovseg.runtime.engines import device
        try:
            device.this_device()
        except SegmenterError as e:
            print(e)
        """,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(
        "CUDA cannot read the GPU's properties (cudaErrorInsufficientDriver): no NVIDIA driver"
    )


def oldest_onnxruntime() -> str:
    out = python_in(SERVE_PYTHON, "import onnxruntime; print(onnxruntime.__version__)")
    return out.stdout.strip()


@pytest.mark.skipif(not SERVE_PYTHON.exists(), reason="no .venv-serve: run `make serve-setup`")
def test_onnxruntime_before_1_23_neither_hides_the_first_error_nor_falls_back_in_a_run(tiny_bundle):
    """Before 1.23 ORT's Python wrapper ignores enable_fallback=0: a failed session is retried on the CPU and the
    retry's error raised, from the first; and a run that fails on a provider moves the session to the CPU."""
    version = oldest_onnxruntime()
    assert version.startswith("1.22."), f".venv-serve has onnxruntime {version}, the oldest supported is 1.22"
    out = python_in(
        SERVE_PYTHON,
        f"""
        from ovseg.errors import SegmenterError
        from ovseg.runtime.engines import sessions
        # a provider list ORT's Python wrapper refuses (ValueError), as one that fails to register (RuntimeError)
        plan = sessions.SessionPlan([123], 1, {{sessions.DISABLE_CPU_FALLBACK: "1"}})
        try:
            sessions.OnnxEncoder(sessions.PROBE_MODEL, plan)
        except SegmenterError as e:
            print(e)
        encoder = sessions.OnnxEncoder({str(tiny_bundle / "dinov2.onnx")!r}, ["CPUExecutionProvider"])
        print("falls back in a run:", encoder.session._enable_fallback)
        """,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("ONNX Runtime cannot load probe.onnx on 123: 'providers' values must be either strings")
    assert "Conflicting" not in lines[0]  # what ORT 1.22 raises, from the first error
    assert lines[1] == "falls back in a run: False"
