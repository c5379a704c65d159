"""Faults that lose nothing: a disk that fills up under --save and --save-dir, a local video device that goes away
and comes back, and ovseg-export / ovseg-calib killed (SIGKILL) while they write over a bundle."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from ovseg.runtime.bundle.manifest import read_manifest

ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}


@contextlib.contextmanager
def small_disk(where: Path, mib: int):
    """A tmpfs of ``mib`` MiB mounted at ``where`` (root only); skips saying why where it cannot be mounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root); the disk-space guard is untested here")
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): no privileges in this container")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Take all but ``leave`` bytes of the disk."""
    st = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def video_frames(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), f"{path} cannot be opened"
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def test_a_full_disk_stops_the_run_in_one_line_and_every_output_is_whole(tiny_bundle, tmp_path):
    from ovseg.runtime.io.sinks import DISK_RESERVE, FRAME_ROOM

    with small_disk(tmp_path / "disk", 8) as disk:
        fill(disk, FRAME_ROOM + DISK_RESERVE + (1 << 18))
        argv = ["--bundle", str(tiny_bundle), "--sample", "--no-show", "--save", str(disk / "out.mp4")]
        argv += ["--save-dir", str(disk / "frames")]
        done = subprocess.run(
            [sys.executable, "-m", "ovseg.runtime.tools.run", *argv],
            capture_output=True,
            text=True,
            timeout=300,
            env=ENV,
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        errors = [line for line in done.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and "is full" in errors[0] and "free some space" in errors[0], done.stderr
        wrote = re.search(r"wrote .*out\.mp4 \((\d+) frames\)", done.stderr)
        assert wrote, done.stderr
        frames = int(wrote.group(1))
        assert 0 < frames < 60  # stopped by the disk, before the sample clip's end
        assert video_frames(disk / "out.mp4") == frames
        pngs = sorted(p.stem for p in (disk / "frames").glob("frame_*.png"))
        jsons = sorted(p.stem for p in (disk / "frames").glob("frame_*.json"))
        assert pngs == jsons and len(pngs) == frames  # every output holds the same frames
        for stem in jsons:
            json.loads((disk / "frames" / f"{stem}.json").read_text())
            assert cv2.imread(str(disk / "frames" / f"{stem}.png"), cv2.IMREAD_UNCHANGED) is not None
        assert not [p for p in disk.rglob("*") if "partial" in p.name]


def test_a_disk_full_from_the_start_fails_before_the_models_load(tmp_path):
    from ovseg.errors import OvsegError
    from ovseg.runtime.io.sinks import DISK_RESERVE, FrameDirSink, VideoSink

    with small_disk(tmp_path / "disk", 4) as disk:
        fill(disk, DISK_RESERVE // 2)
        with pytest.raises(OvsegError, match="is full"):
            VideoSink(disk / "out.mp4", fps=10)
        with pytest.raises(OvsegError, match="is full"):
            FrameDirSink(disk / "frames")


def test_a_file_size_limit_is_one_line_and_leaves_whole_frames(tiny_bundle, tmp_path):
    """No mount needed: RLIMIT_FSIZE makes a write past the limit fail with EFBIG (SIGXFSZ ignored), the same
    write-failure path as a full disk."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))\n"
        "from ovseg.runtime.tools.run import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "frames"
    argv = ["--bundle", str(tiny_bundle), "--image", str(images), "--no-show", "--save-dir", str(out)]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert re.search(r"error: cannot write .*frame_000000\.\w+: File too large", done.stderr), done.stderr
    assert not list(out.glob("*partial*"))
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(p.stem for p in out.glob("*.json"))


# --- SIGKILL while a bundle is being replaced ------------------------------------------------------------------------

EXPORT = """
import sys
import threading
import time
from pathlib import Path
sys.path.insert(0, {tests!r})
from conftest import _export
_export(Path({out!r}), image_size=112, vocab="voc21", fp16=True)
"""
CALIB = """
from ovseg.calib.bundle import CalibOptions, calibrate_bundle
calibrate_bundle({out!r}, CalibOptions(source={photos!r}, frames=6, timing_runs=1))
"""


def kill_when(code: str, bundle: Path, written: str) -> None:
    """Run ``code`` in a child and SIGKILL it as soon as a file matching ``written`` appears in its temporary bundle."""
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    try:
        deadline = time.monotonic() + 600
        while not list(bundle.parent.glob(f".{bundle.name}.tmp-{child.pid}-*/{written}")):
            assert child.poll() is None, f"the child ended before writing {written}: {child.stderr.read().decode()}"
            assert time.monotonic() < deadline, f"no {written} within 600 s"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()


def snapshot(bundle: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(bundle.iterdir())}


def assert_replaced_cleanly_later(bundle: Path) -> None:
    """The killed writer's temporary directory is removed by the next writer, which replaces the bundle whole."""
    from ovseg.runtime.bundle.manifest import atomic_bundle_dir, link_tree, write_manifest

    assert list(bundle.parent.glob(f".{bundle.name}.tmp-*"))
    manifest = read_manifest(bundle)
    with atomic_bundle_dir(bundle, force=True) as tmp:
        link_tree(bundle, tmp)
        manifest.profile = "fast"
        write_manifest(tmp, manifest)
    assert not list(bundle.parent.glob(f".{bundle.name}.*"))
    assert read_manifest(bundle).profile == "fast"


def test_ovseg_export_killed_mid_write_leaves_the_previous_bundle(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    before = snapshot(bundle)
    code = EXPORT.format(tests=str(Path(__file__).parent), out=str(bundle))
    kill_when(code, bundle, "clip_text.onnx")  # the image encoders are written, the text side is under way
    assert snapshot(bundle) == before
    read_manifest(bundle)
    assert_replaced_cleanly_later(bundle)


def test_ovseg_calib_killed_mid_write_leaves_the_previous_bundle(tiny_bundle, tmp_path):
    from skimage import data

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, rgb in enumerate([data.astronaut(), data.coffee(), data.chelsea(), data.rocket()] * 2):
        cv2.imwrite(str(photos / f"{i}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    before = snapshot(bundle)
    kill_when(CALIB.format(out=str(bundle), photos=str(photos)), bundle, "*.int8.onnx")
    assert snapshot(bundle) == before
    read_manifest(bundle)
    assert_replaced_cleanly_later(bundle)


def test_the_old_and_new_bundle_trade_places_in_one_step(tmp_path):
    from ovseg.runtime.bundle.manifest import exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("new")
    (b / "f").write_text("old")
    if not exchange(a, b):
        pytest.skip("this kernel or file system has no renameat2 RENAME_EXCHANGE: two renames are used instead")
    assert (b / "f").read_text() == "new" and (a / "f").read_text() == "old"


# --- a local video device that goes away ------------------------------------------------------------------------------

RED, BLUE = (0, 0, 255), (255, 0, 0)


def y4m(color: tuple[int, int, int], frames: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """An uncompressed YUV4MPEG2 stream of one colour, as a capture program writes into a pipe."""
    w, h = size
    yuv = cv2.cvtColor(np.full((h, w, 3), color, np.uint8), cv2.COLOR_BGR2YUV_I420).tobytes()
    return f"YUV4MPEG2 W{w} H{h} F15:1 Ip A1:1 C420jpeg\n".encode() + (b"FRAME\n" + yuv) * frames


def test_a_local_device_that_goes_away_is_reopened_and_reported(tmp_path, caplog):
    """A named pipe stands in for /dev/video0: its writer (the camera) stops, and a new one starts later."""
    import logging

    from ovseg.runtime.io.sources import LatestFrameCapture, is_live

    fifo = tmp_path / "camera"
    os.mkfifo(fifo)
    assert is_live(str(fifo))
    second_open = threading.Event()
    release_second = threading.Event()

    def camera() -> None:
        with open(fifo, "wb") as f:
            f.write(y4m(RED, 8))
        deadline = time.monotonic() + 120
        while not any("lost: reconnecting" in r.getMessage() for r in caplog.records):
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        with open(fifo, "wb") as f:  # the camera is plugged in again
            second_open.set()
            f.write(y4m(BLUE, 8))
            release_second.wait(120)

    writer = threading.Thread(target=camera, daemon=True)
    writer.start()
    colours = []
    with caplog.at_level(logging.WARNING, "ovseg"):
        cap = LatestFrameCapture(str(fifo), backoff=(0.5, 0.5), max_reconnect_time=120)
        try:
            for frame in cap:
                colours.append("blue" if frame.image[0, 0, 0] > 128 else "red")
                if colours[-1] == "blue":
                    break
        finally:
            release_second.set()  # the camera goes away for good; the capture is closed within its back-off
            cap.close()
    writer.join(30)
    assert second_open.is_set()
    assert colours[0] == "red" and colours[-1] == "blue"
    assert cap.reconnects == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"device {fifo} lost: reconnecting") for m in messages)
    assert any(m.startswith(f"device {fifo} back after") for m in messages)
