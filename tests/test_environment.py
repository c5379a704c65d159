"""Install checks: one ONNX Runtime and one OpenCV, the GPU one where a GPU is, and messages that say what to run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ovseg import environment
from ovseg.environment import InstallError
from ovseg.runtime.io import display, sources
from ovseg.runtime.io.sources import SourceError


def _pretend_installed(monkeypatch, versions: dict[str, str]) -> None:
    monkeypatch.setattr(environment, "installed", lambda names: {n: v for n, v in versions.items() if n in names})


def test_both_onnxruntimes_are_refused_with_the_command_that_fixes_it(monkeypatch):
    _pretend_installed(
        monkeypatch, {"onnxruntime": "1.31.1", "onnxruntime-gpu": "1.31.1", "opencv-python-headless": "5"}
    )
    monkeypatch.setattr(environment, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(environment, "driver_cuda", lambda: "13.0")  # [gpu]: a CUDA 13 driver
    monkeypatch.setattr(environment.platform, "machine", lambda: "x86_64")
    with pytest.raises(InstallError) as e:
        environment.check_install()
    message = str(e.value)
    assert "\n" not in message
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in message
    assert "pip install -e '.[gpu]'" in message  # a GPU is present: the GPU flavour
    assert isinstance(e.value, ImportError)


def test_two_opencvs_are_refused(monkeypatch):
    _pretend_installed(monkeypatch, {"onnxruntime": "1.31.1", "opencv-python": "5", "opencv-python-headless": "5"})
    with pytest.raises(
        InstallError, match=r"pip uninstall -y opencv-python opencv-python-headless` then `pip install opencv-python`"
    ):
        environment.check_install()


def test_missing_onnxruntime_names_the_extra(monkeypatch):
    _pretend_installed(monkeypatch, {})
    monkeypatch.setattr(environment, "nvidia_gpu_present", lambda: False)
    real_find_spec = environment.importlib.util.find_spec
    monkeypatch.setattr(
        environment.importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real_find_spec(name)
    )
    with pytest.raises(InstallError, match=r"ONNX Runtime is not installed: run `pip install -e '.\[cpu\]'`"):
        environment.check_onnxruntime()


def test_a_gpu_that_onnxruntime_cannot_use_is_reported(monkeypatch):
    _pretend_installed(monkeypatch, {"onnxruntime": "1.31.1"})
    monkeypatch.setattr(environment, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(environment, "driver_cuda", lambda: "13.0")  # [gpu]: a CUDA 13 driver
    monkeypatch.setattr(environment.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(environment, "is_jetson", lambda: False)
    warning = environment.gpu_unused_warning(["CPUExecutionProvider"])
    assert warning is not None and "pip uninstall -y onnxruntime` then `pip install -e '.[gpu]'`" in warning
    assert environment.gpu_unused_warning(["CUDAExecutionProvider", "CPUExecutionProvider"]) is None
    monkeypatch.setattr(environment, "nvidia_gpu_present", lambda: False)
    assert environment.gpu_unused_warning(["CPUExecutionProvider"]) is None


def test_this_environment_passes_and_reports_itself():
    out = subprocess.run([sys.executable, "-m", "ovseg.environment"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ONNX Runtime:" in out.stdout and "OpenCV:" in out.stdout


def test_display_problem_names_the_cause(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert display.display_problem().startswith("no display: DISPLAY and WAYLAND_DISPLAY are unset")
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(display, "gui_backend", lambda: None)
    assert (
        "opencv-python-headless" in display.display_problem()
        and "pip install opencv-python" in display.display_problem()
    )
    monkeypatch.setattr(display, "gui_backend", lambda: "GTK3")
    assert display.display_problem() is None and display.has_display()


def test_gstreamer_pipelines_are_live_and_refused_without_gstreamer(monkeypatch):
    pipeline = "videotestsrc num-buffers=5 ! videoconvert ! video/x-raw,format=BGR ! appsink"
    assert sources.is_gstreamer_pipeline(pipeline) and sources.is_live(pipeline)
    assert not sources.is_live("clip.mp4") and sources.is_live("rtsp://cam/1") and sources.is_live(0)
    monkeypatch.setattr(display, "has_gstreamer", lambda: False)
    with pytest.raises(SourceError, match="cannot open GStreamer pipelines") as e:
        sources.LatestFrameCapture(pipeline)
    assert "\n" not in str(e.value)


def test_console_scripts_turn_an_install_problem_at_import_into_one_line(monkeypatch, capsys):
    from ovseg import cli

    def broken_import(name):
        raise InstallError("both onnxruntime 1 and onnxruntime-gpu 1 are installed: run `pip uninstall -y ...`")

    monkeypatch.setattr(cli.importlib, "import_module", broken_import)
    with pytest.raises(SystemExit) as e:
        cli.ovseg_run()
    assert e.value.code == 2
    assert (
        capsys.readouterr().err
        == "ovseg-run: error: both onnxruntime 1 and onnxruntime-gpu 1 are installed: run `pip uninstall -y ...`\n"
    )


def test_console_scripts_run_their_command():
    out = subprocess.run([f"{sys.prefix}/bin/ovseg-run", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--camera" in out.stdout


def test_auto_backend_warns_when_a_gpu_is_present_without_a_cuda_provider(monkeypatch, caplog):
    from ovseg.errors import SegmenterError
    from ovseg.runtime.engines.sessions import resolve_backend

    _pretend_installed(monkeypatch, {"onnxruntime": "1.31.1"})
    monkeypatch.setattr(environment, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(environment, "driver_cuda", lambda: "13.0")  # [gpu]: a CUDA 13 driver
    monkeypatch.setattr(environment, "is_jetson", lambda: False)
    monkeypatch.setattr(environment.platform, "machine", lambda: "x86_64")
    with caplog.at_level("WARNING", logger="ovseg"):
        assert resolve_backend("auto", ["CPUExecutionProvider"]) == "cpu"
    assert any("no CUDA provider" in r.getMessage() and "'.[gpu]'" in r.getMessage() for r in caplog.records)
    with pytest.raises(
        SegmenterError, match=r"pip uninstall -y onnxruntime` then `pip install -e '.\[gpu\]'`, or use backend='cpu'"
    ):
        resolve_backend("cuda", ["CPUExecutionProvider"])


# The GPU packages: one CUDA major the driver runs, and the TensorRT that ONNX Runtime's TensorRT provider links.

REPO = Path(__file__).resolve().parents[1]
GPU_CAPI = [*REPO.glob(".venv-gpu/lib/python3*/site-packages/onnxruntime/capi")]  # `make gpu-setup`: onnxruntime-gpu
NEEDS_GPU_VENV = pytest.mark.skipif(not GPU_CAPI, reason=".venv-gpu is absent: `make gpu-setup` builds it")

# nvidia-smi's header as drivers print it (560 runs CUDA 12.6, 580 runs 13.0), and its answer without a driver.
SMI_560 = """Sat Dec  7 01:23:45 2024
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 560.35.03              Driver Version: 560.35.03      CUDA Version: 12.6     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
"""
SMI_580 = "| NVIDIA-SMI 580.65.06              Driver Version: 580.65.06      CUDA Version: 13.0     |\n"
SMI_NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n"
)


def _gpu(**found) -> environment.GpuPackages:
    """A CUDA 13 set on a CUDA 13 driver, with what the test changes."""
    consistent = dict(
        driver_cuda="13.0",
        onnxruntime="1.31.1",
        onnxruntime_cuda="13.0",
        cuda_python="13.4.4",
        tensorrt={"tensorrt-cu13": "10.16.1.11"},
        tensorrt_link="libnvinfer.so.10",
    )
    return environment.GpuPackages(**{**consistent, **found})


def test_the_drivers_cuda_is_read_from_nvidia_smis_header():
    assert environment.parse_driver_cuda(SMI_560) == "12.6"
    assert environment.parse_driver_cuda(SMI_580) == "13.0"
    assert environment.parse_driver_cuda(SMI_NO_DRIVER) is None
    assert environment.cuda_extra("gpu", 12) == "gpu-cu12" and environment.cuda_extra("tensorrt", 13) == "tensorrt"


def test_a_cuda_13_set_on_a_cuda_12_driver_is_flagged_with_the_cuda_12_commands(monkeypatch):
    monkeypatch.setattr(environment, "driver_cuda", lambda: "12.6")
    monkeypatch.setattr(environment, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(environment, "is_jetson", lambda: False)
    monkeypatch.setattr(environment.platform, "machine", lambda: "x86_64")
    problems = environment.gpu_problems(_gpu(driver_cuda="12.6", tensorrt={"tensorrt-cu13": "10.16.1.11"}))
    assert len(problems) == 3 and not any("\n" in p for p in problems)
    ort, cuda_python, tensorrt = problems
    assert "onnxruntime-gpu 1.31.1 is a CUDA 13 build and this driver runs CUDA 12.6 at most" in ort
    assert ort.endswith("run `pip install -e '.[gpu-cu12]'`")
    assert "cudaErrorInsufficientDriver" in cuda_python and cuda_python.endswith("`pip install 'cuda-python>=12,<13'`")
    assert tensorrt.endswith("run `pip uninstall -y tensorrt-cu13` then `pip install -e '.[tensorrt-cu12]'`")


def test_a_tensorrt_of_another_major_than_the_provider_links_is_flagged():
    # `tensorrt` (the metapackage) is TensorRT 11 for CUDA 13, while ORT 1.31's provider links libnvinfer.so.10
    found = _gpu(tensorrt={"tensorrt-cu13": "11.4.0.106", "tensorrt": "11.4.0.106"})
    assert environment.gpu_problems(found) == [
        "the tensorrt package is TensorRT 11.4.0.106 (tensorrt-cu13) but ONNX Runtime's TensorRT provider links "
        "libnvinfer.so.10: run `pip uninstall -y tensorrt-cu13 tensorrt` then `pip install -e '.[tensorrt]'`"
    ]


def test_a_consistent_set_and_no_gpu_packages_say_nothing_more():
    assert environment.gpu_problems(_gpu()) == []
    # no driver (CI): a CUDA 13 set with an older cuda-python still runs wherever a driver runs CUDA 13
    assert environment.gpu_problems(_gpu(driver_cuda=None, cuda_python="12.9.10")) == []
    nothing = environment.GpuPackages(None, None, None, None, {}, None)
    assert environment.gpu_report(nothing) == [] and environment.gpu_problems(nothing) == []


@NEEDS_GPU_VENV
def test_the_tensorrt_extra_is_the_major_onnxruntime_gpus_provider_links():
    tomllib = pytest.importorskip("tomllib")
    out = subprocess.run(
        [str(REPO / ".venv-gpu/bin/python"), "-c", "from ovseg import environment; print(environment.tensorrt_link())"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    link = out.stdout.strip()
    assert link == "libnvinfer.so.10", out.stderr
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, cuda in (("tensorrt", "13"), ("tensorrt-cu12", "12")):
        (requirement,) = [r for r in extras[extra] if r.startswith("tensorrt")]
        major = int(link.rsplit(".", 1)[1])
        assert requirement.startswith(f"tensorrt-cu{cuda}>=") and requirement.endswith(f",<{major + 1}"), requirement


@NEEDS_GPU_VENV
def test_the_gpu_flavour_environment_reports_its_cuda_and_tensorrt():
    python = REPO / ".venv-gpu/bin/python"
    out = subprocess.run([str(python), "-m", "ovseg.environment"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    cuda = next(line for line in lines if line.startswith("ovseg: CUDA: "))
    assert "ONNX Runtime built for CUDA 13.0" in cuda and "cuda-python 13." in cuda
    if environment.driver_cuda() is None:
        assert "driver none" in cuda
    assert "ovseg: TensorRT: not installed; ONNX Runtime's TensorRT provider links libnvinfer.so.10" in lines
    assert not [line for line in lines if "warning:" in line], out.stdout
    provider = next(line for line in lines if line.startswith("ovseg: ONNX Runtime's CUDA provider: "))
    if environment.driver_cuda() is None:  # the CUDA and cuDNN wheels are there: only the driver is missing
        assert provider.endswith(
            "cannot run here: no NVIDIA driver (libcuda.so.1 does not load): install the driver, check it with nvidia-smi"
        )
