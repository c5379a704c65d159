"""Install checks: one ONNX Runtime and one OpenCV, the GPU one where a GPU is, and messages that say what to run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ovseg import environment
from ovseg.environment import InstallError
from ovseg.runtime import display, sources
from ovseg.runtime.sources import SourceError


def _pretend_installed(monkeypatch, versions: dict[str, str]) -> None:
    monkeypatch.setattr(environment, "installed", lambda names: {n: v for n, v in versions.items() if n in names})


def test_both_onnxruntimes_are_refused_with_the_command_that_fixes_it(monkeypatch):
    _pretend_installed(
        monkeypatch, {"onnxruntime": "1.31.1", "onnxruntime-gpu": "1.31.1", "opencv-python-headless": "5"}
    )
    monkeypatch.setattr(environment, "nvidia_gpu_present", lambda: True)
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
    from ovseg.runtime.sessions import SegmenterError, resolve_backend

    _pretend_installed(monkeypatch, {"onnxruntime": "1.31.1"})
    monkeypatch.setattr(environment, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(environment, "is_jetson", lambda: False)
    monkeypatch.setattr(environment.platform, "machine", lambda: "x86_64")
    with caplog.at_level("WARNING", logger="ovseg"):
        assert resolve_backend("auto", ["CPUExecutionProvider"]) == "cpu"
    assert any("no CUDA provider" in r.getMessage() and "'.[gpu]'" in r.getMessage() for r in caplog.records)
    with pytest.raises(
        SegmenterError, match=r"pip uninstall -y onnxruntime` then `pip install -e '.\[gpu\]'`, or use backend='cpu'"
    ):
        resolve_backend("cuda", ["CPUExecutionProvider"])
