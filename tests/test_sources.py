"""Frame sources: live capture (a video file through the same class), video files, images, the sample clip."""

from __future__ import annotations

import functools
import http.server
import logging
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from ovseg.runtime.io.sources import Frame, ImageSource, LatestFrameCapture, SourceError, VideoFileSource, sample_clip

SIZE = (64, 48)


def write_video(path: Path, n: int = 30, fps: float = 15.0, fourcc: str = "mp4v") -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, SIZE)
    assert writer.isOpened()
    for i in range(n):
        image = np.full((SIZE[1], SIZE[0], 3), i * 8, np.uint8)  # brightness encodes the frame number
        writer.write(image)
    writer.release()
    return path


def frame_number(image: np.ndarray) -> int:
    return round(float(image.mean()) / 8)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4")


# --- LatestFrameCapture ------------------------------------------------------------------------------------


def test_live_capture_of_a_video_file_delivers_newest_frames_then_ends(video):
    with LatestFrameCapture(str(video)) as cap:
        assert cap.fps == 15.0
        frames = list(cap)
    assert frames and all(isinstance(f, Frame) for f in frames)
    indices = [f.index for f in frames]
    assert indices == sorted(set(indices))
    assert indices[-1] == 29  # the last frame is delivered before the file ends
    assert frames[0].image.shape == (SIZE[1], SIZE[0], 3)
    assert frames[0].source == f"video {video}"
    assert all(b.timestamp >= a.timestamp for a, b in zip(frames, frames[1:]))
    assert not cap._thread.is_alive()


def test_live_capture_keeps_only_the_newest_frame_and_counts_drops(video):
    with LatestFrameCapture(str(video)) as cap:
        frames = []
        for frame in cap:
            frames.append(frame)
            assert abs(frame_number(frame.image) - frame.index) <= 1  # the image is the frame its index says
            time.sleep(0.2)  # a consumer at 5 FPS against a 15 FPS source
    gaps = sum(b.index - a.index - 1 for a, b in zip(frames, frames[1:]))
    assert cap.dropped >= 10
    assert cap.dropped == gaps
    assert len(frames) < 20


def test_camera_that_cannot_be_opened_is_a_one_line_source_error():
    with pytest.raises(SourceError) as err:
        LatestFrameCapture(99)
    assert str(err.value) == "camera 99 cannot be opened: check the device (ls /dev/video*) or use --video/--image"
    with pytest.raises(SourceError, match="camera 7 cannot be opened"):
        LatestFrameCapture("7")  # a digit string is a camera index


class FlakyCapture:
    """A stream that delivers ``frames`` frames per connection; ``opens`` says which connection attempts succeed."""

    def __init__(self, opened: bool, frames: int = 3):
        self.opened = opened
        self.left = frames
        self.released = False

    def isOpened(self):
        return self.opened

    def read(self):
        time.sleep(0.005)
        if self.left <= 0:
            return False, None
        self.left -= 1
        return True, np.zeros((4, 4, 3), np.uint8)

    def get(self, prop):
        return 0.0

    def set(self, prop, value):
        return True

    def release(self):
        self.released = True


def opener(pattern: list[bool]):
    attempts = iter(pattern)
    captures = []

    def open_capture(uri):
        cap = FlakyCapture(next(attempts, False))
        captures.append(cap)
        return cap

    return open_capture, captures


def test_lost_stream_reconnects_with_backoff_and_warns_once_per_outage(caplog):
    open_capture, captures = opener([True, False, False, True])
    caplog.set_level(logging.WARNING, logger="ovseg")
    with pytest.raises(SourceError, match="did not come back within 0.3 s"):
        with LatestFrameCapture(
            "rtsp://camera/stream", backoff=(0.01, 0.04), max_reconnect_time=0.3, open_capture=open_capture
        ) as cap:
            frames = []
            for frame in cap:
                frames.append(frame)
    assert cap.reconnects == 1
    lost = [r for r in caplog.records if "lost: reconnecting" in r.getMessage()]
    back = [r for r in caplog.records if "back after" in r.getMessage()]
    assert len(lost) == 2 and len(back) == 1  # two outages: the second one never ends
    assert all(c.released for c in captures)
    assert frames and frames[-1].index >= 3  # frames of the second connection came through
    assert lost[0].getMessage().startswith("stream rtsp://camera/stream lost")


def test_close_during_a_reconnect_returns_promptly():
    open_capture, _ = opener([True])
    cap = LatestFrameCapture("rtsp://x", backoff=(5.0, 8.0), max_reconnect_time=60, open_capture=open_capture)
    time.sleep(0.1)  # the stream is lost and the thread waits 5 s before reopening
    t0 = time.monotonic()
    cap.close()
    assert time.monotonic() - t0 < 1.0
    assert not cap._thread.is_alive()


def test_without_reconnect_a_lost_stream_is_an_error():
    open_capture, _ = opener([True])
    with LatestFrameCapture("rtsp://x", reconnect=False, open_capture=open_capture) as cap:
        with pytest.raises(SourceError, match="stopped delivering frames"):
            list(cap)


@pytest.fixture()
def http_server(video):
    """The test video served over HTTP, a real network stream for LatestFrameCapture."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(video.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/{video.name}"
    server.shutdown()
    server.server_close()


def test_network_stream_reconnects_at_its_end_and_gives_up_when_the_server_is_gone(http_server, caplog):
    server, url = http_server
    caplog.set_level(logging.WARNING, logger="ovseg")
    frames = []
    with pytest.raises(SourceError, match="did not come back"):
        with LatestFrameCapture(url, backoff=(0.05, 0.1), max_reconnect_time=0.5) as cap:
            for frame in cap:
                frames.append(frame)
                if cap.reconnects >= 1 and server is not None:
                    server.shutdown()  # the stream came back once; now it is gone for good
                    server.server_close()
                    server = None
    assert cap.reconnects >= 1
    assert frames[0].source == f"stream {url}"
    assert any("lost: reconnecting" in r.getMessage() for r in caplog.records)


# --- VideoFileSource ---------------------------------------------------------------------------------------


def test_video_file_source_reads_every_frame_in_order_with_timestamps(video):
    with VideoFileSource(video) as source:
        frames = list(source)
    assert [f.index for f in frames] == list(range(30))
    assert [frame_number(f.image) for f in frames] == list(range(30))
    assert frames[0].timestamp == 0.0
    assert frames[15].timestamp == pytest.approx(1.0, abs=1e-3)
    assert source.fps == 15.0 and source.skipped == 0


def test_truncated_video_skips_the_missing_frames_with_a_warning(tmp_path, caplog):
    full = write_video(tmp_path / "full.avi", fourcc="MJPG")
    data = full.read_bytes()
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(data[: len(data) * 6 // 10])
    caplog.set_level(logging.WARNING, logger="ovseg")
    with VideoFileSource(truncated) as source:
        frames = list(source)
    assert 0 < len(frames) < 30
    assert source.skipped == 30 - len(frames)
    assert any("could not be read" in r.getMessage() for r in caplog.records)


def test_a_corrupt_frame_in_the_middle_is_skipped_and_reading_goes_on(tmp_path, caplog):
    data = bytearray(write_video(tmp_path / "v.avi", fourcc="MJPG").read_bytes())
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]  # JPEG start markers
    data[starts[12] + 20 : starts[12] + 200] = bytes(180)  # frame 12's Huffman tables and scan, zeroed
    corrupt = tmp_path / "corrupt.avi"
    corrupt.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING, logger="ovseg")
    with VideoFileSource(corrupt) as source:
        frames = list(source)
    assert len(frames) == 29 and source.skipped == 1
    assert frame_number(frames[-1].image) == 29
    assert any("cannot be decoded, skipping" in r.getMessage() for r in caplog.records)


def test_video_that_cannot_be_opened(tmp_path, video):
    with pytest.raises(SourceError, match="does not exist"):
        VideoFileSource(tmp_path / "missing.mp4")
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("not a video")
    with pytest.raises(SourceError, match="cannot be opened"):
        VideoFileSource(not_video)
    cut = tmp_path / "cut.mp4"  # an mp4 keeps its index at the end: cut short, it cannot be opened at all
    cut.write_bytes(video.read_bytes()[:2000])
    with pytest.raises(SourceError, match="truncated"):
        VideoFileSource(cut)


# --- ImageSource -------------------------------------------------------------------------------------------


@pytest.fixture()
def image_dir(tmp_path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    cv2.imwrite(str(d / "a_colour.jpg"), np.full((40, 50, 3), 100, np.uint8))
    cv2.imwrite(str(d / "b_depth16.png"), np.full((30, 20), 40000, np.uint16))
    cv2.imwrite(str(d / "c_rgba.png"), np.full((24, 24, 4), 200, np.uint8))
    cv2.imwrite(str(d / "d_gray.png"), np.full((16, 16), 7, np.uint8))
    (d / "e_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (d / "notes.txt").write_text("not an image")
    return d


def test_image_directory_sorted_unchanged_and_corrupt_files_skipped(image_dir, caplog):
    caplog.set_level(logging.WARNING, logger="ovseg")
    with ImageSource(image_dir) as source:
        frames = list(source)
    assert [Path(f.source).name for f in frames] == ["a_colour.jpg", "b_depth16.png", "c_rgba.png", "d_gray.png"]
    assert [f.index for f in frames] == [0, 1, 2, 3]
    assert frames[1].image.dtype == np.uint16 and frames[1].image.shape == (30, 20)
    assert frames[2].image.shape == (24, 24, 4)
    assert frames[3].image.ndim == 2
    assert source.skipped == 1
    assert any("e_corrupt.png cannot be read" in r.getMessage() for r in caplog.records)
    assert source.independent_frames


def test_image_glob_and_single_file(image_dir):
    assert [Path(f.source).name for f in ImageSource(str(image_dir / "*.png"))] == [
        "b_depth16.png",
        "c_rgba.png",
        "d_gray.png",
    ]
    (frame,) = list(ImageSource(image_dir / "a_colour.jpg"))
    assert frame.image.shape == (40, 50, 3)


def test_no_images_is_a_source_error(tmp_path, image_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no images in directory"):
        ImageSource(empty)
    with pytest.raises(SourceError, match="no files match"):
        ImageSource(str(tmp_path / "*.jpg"))
    with pytest.raises(SourceError, match="does not exist"):
        ImageSource(tmp_path / "nope")
    with pytest.raises(SourceError, match="none of the 1 image"):
        list(ImageSource(image_dir / "e_corrupt.png"))


# --- sample clip -------------------------------------------------------------------------------------------


def test_sample_clip_pans_across_real_photos(tmp_path):
    path = sample_clip(tmp_path / "out" / "sample.mp4", seconds=1, fps=6, size=(160, 120))
    frames = list(VideoFileSource(path))
    assert len(frames) == 6
    assert frames[0].image.shape == (120, 160, 3)
    assert frames[0].image.std() > 20  # a photo, not a flat colour
    assert np.abs(frames[0].image.astype(int) - frames[-1].image.astype(int)).mean() > 10  # it moves


def test_sample_clip_without_scikit_image_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(SourceError, match="pip install scikit-image"):
        sample_clip(tmp_path / "s.mp4")
