"""Faults that lose nothing: a disk that fills up under --save and --save-dir, a local video device that goes away
and comes back, and ovseg-export / ovseg-calib killed (SIGKILL) while they write over a bundle."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

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
    from ovseg.runtime.sinks import DISK_RESERVE, FRAME_ROOM

    with small_disk(tmp_path / "disk", 8) as disk:
        fill(disk, FRAME_ROOM + DISK_RESERVE + (1 << 18))
        argv = ["--bundle", str(tiny_bundle), "--sample", "--no-show", "--save", str(disk / "out.mp4")]
        argv += ["--save-dir", str(disk / "frames")]
        done = subprocess.run(
            [sys.executable, "-m", "ovseg.runtime.cli", *argv], capture_output=True, text=True, timeout=300, env=ENV
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
        assert pngs == jsons and len(pngs) >= frames
        for stem in jsons:
            json.loads((disk / "frames" / f"{stem}.json").read_text())
            assert cv2.imread(str(disk / "frames" / f"{stem}.png"), cv2.IMREAD_UNCHANGED) is not None
        assert not [p for p in disk.rglob("*") if "partial" in p.name]


def test_a_disk_full_from_the_start_fails_before_the_models_load(tmp_path):
    from ovseg.runtime.sinks import DISK_RESERVE, FrameDirSink, SinkError, VideoSink

    with small_disk(tmp_path / "disk", 4) as disk:
        fill(disk, DISK_RESERVE // 2)
        with pytest.raises(SinkError, match="is full"):
            VideoSink(disk / "out.mp4", fps=10)
        with pytest.raises(SinkError, match="is full"):
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
        "from ovseg.runtime.cli import main\n"
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
