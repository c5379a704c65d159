"""Frame sources for ovseg-run: a live camera or stream, a video file, images, and a sample clip.

Every source is an iterator of ``Frame`` with ``close()`` and context-manager support, and counts
what it could not deliver: ``dropped`` (live frames replaced by newer ones before they were
processed) and ``skipped`` (unreadable images or video frames).
"""

from __future__ import annotations

import glob
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ovseg.errors import OvsegError

log = logging.getLogger("ovseg.sources")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm", ".exr", ".hdr")
# A run of this many failed reads means the rest of the file is gone, not one bad frame.
MAX_CONSECUTIVE_BAD_FRAMES = 16
# Network streams: without these a dead stream can block a read for minutes instead of being reconnected.
STREAM_TIMEOUT_MS = 10_000


class SourceError(OvsegError, RuntimeError):
    """A source cannot be opened or stopped delivering frames; the message is one line saying what to do."""


@dataclass
class Frame:
    index: int  # position in the source; gaps in a live source are dropped frames
    timestamp: float  # seconds: wall clock for live sources, position in the file for videos, mtime for images
    image: np.ndarray  # as decoded: BGR uint8 from videos, any depth/channels from images
    source: str  # camera index, URL or file path


class Closeable:
    """close() and ``with``, as sources and sinks have them."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Source(Closeable):
    """What every source has: counters, an optional nominal frame rate, close() and ``with``."""

    name: str = ""  # what the source reads, for messages
    dropped: int = 0
    skipped: int = 0
    fps: float | None = None  # nominal frames per second, when the source knows it
    independent_frames: bool = False  # True when consecutive frames are unrelated (a folder of images)

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError


def evenly_spaced(total: int, n: int) -> list[int]:
    """At most ``n`` indices of ``range(total)``, spread evenly from the first to the last."""
    return sorted({int(i) for i in np.linspace(0, total - 1, min(n, total)).round()})


def is_gstreamer_pipeline(uri: int | str) -> bool:
    """A GStreamer pipeline ending in appsink, e.g. a Jetson CSI camera: "nvarguscamerasrc ! ... ! appsink"."""
    return isinstance(uri, str) and " ! " in uri


def is_local_device(uri: int | str) -> bool:
    """A device node (/dev/video0) or a named pipe that a capture program writes into: local and live, and lost when
    it is unplugged or its writer stops."""
    if not isinstance(uri, str):
        return False
    try:
        mode = os.stat(uri).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def is_live(uri: int | str) -> bool:
    """Cameras, local video devices, network streams and GStreamer pipelines deliver frames in real time: only the
    newest one counts."""
    return isinstance(uri, int) or "://" in uri or is_gstreamer_pipeline(uri) or is_local_device(uri)


def _describe(uri: int | str) -> str:
    if isinstance(uri, int):
        return f"camera {uri}"
    if is_local_device(uri):
        return f"device {uri}"
    if is_gstreamer_pipeline(uri):
        return f"GStreamer pipeline {uri.split(' ! ')[0]} ! ..."
    return f"stream {uri}" if "://" in uri else f"video {uri}"


def open_video_capture(uri: int | str) -> cv2.VideoCapture:
    """cv2.VideoCapture, with open and read timeouts for network streams; GStreamer pipelines through GStreamer."""
    if is_gstreamer_pipeline(uri):
        from .display import has_gstreamer

        if not has_gstreamer():
            raise SourceError(
                "this OpenCV cannot open GStreamer pipelines (PyPI's OpenCV wheels have no GStreamer): use an OpenCV built "
                "with it, e.g. JetPack's (`sudo apt-get install python3-opencv`, venv with --system-site-packages; "
                "`make setup` does this on a Jetson)"
            )
        return cv2.VideoCapture(uri, cv2.CAP_GSTREAMER)
    if isinstance(uri, str) and "://" in uri:
        ms = STREAM_TIMEOUT_MS
        return cv2.VideoCapture(
            uri, cv2.CAP_ANY, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        )
    return cv2.VideoCapture(uri)


_OPEN_FAILURES = {  # what to check when a live source cannot be opened, by the first word of its name
    "camera": "cannot be opened: check the device (ls /dev/video*) or use --video/--image",
    "device": "cannot be opened or delivers no video OpenCV can decode: check what feeds it",
    "GStreamer": "cannot be started: check it with `gst-launch-1.0 <pipeline>` (fakesink for appsink)",
    "stream": "cannot be opened: check the URL and the network, or use --video PATH for a file",
}


def _fps(cap: cv2.VideoCapture) -> float | None:
    fps = cap.get(cv2.CAP_PROP_FPS)
    return fps if fps and math.isfinite(fps) and fps > 0 else None


def _open_failure(path: str) -> SourceError:
    if not os.path.exists(path):
        return SourceError(f"video {path} does not exist")
    return SourceError(f"video {path} cannot be opened: it is not a video OpenCV can decode, or it is truncated")


class LatestFrameCapture(Source):
    """A camera or stream read on a daemon thread that keeps only the newest frame.

    A slow consumer never sees stale frames: a frame replaced before it was taken counts as dropped.
    When the device or stream is lost, the thread reopens it with exponential back-off (one warning
    per outage) and gives up after ``max_reconnect_time`` seconds; iteration then raises SourceError.
    A video file works too (for tests): it is read at its own frame rate, like a camera, and ends at
    its last frame instead of reconnecting.
    """

    def __init__(
        self,
        uri: int | str,
        reconnect: bool = True,
        backoff: tuple[float, float] = (0.5, 8.0),
        max_reconnect_time: float = 30.0,
        open_capture: Callable[[int | str], cv2.VideoCapture] = open_video_capture,
    ):
        self.uri = int(uri) if isinstance(uri, str) and uri.isdigit() else uri
        self.name = _describe(self.uri)
        self.reconnect = reconnect
        self.backoff = backoff
        self.max_reconnect_time = max_reconnect_time
        self.reconnects = 0
        self._open_capture = open_capture
        self._is_file = not is_live(self.uri)
        cap = self._open()
        if cap is None:
            if self._is_file:
                raise _open_failure(str(self.uri))
            raise SourceError(f"{self.name} {_OPEN_FAILURES[self.name.split()[0]]}")
        self._cap: cv2.VideoCapture = cap
        self.fps = _fps(cap)
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._read_count = 0
        self._started_consuming = False
        self._ended = False
        self._error: SourceError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ovseg-capture-{self.uri}", daemon=True)
        self._thread.start()

    def _open(self) -> cv2.VideoCapture | None:
        cap = self._open_capture(self.uri)
        if not cap.isOpened():
            cap.release()
            return None
        if not self._is_file:
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # ask the driver not to queue stale frames; not all honour it
        return cap

    def _run(self) -> None:
        cap: cv2.VideoCapture | None = self._cap
        period = 1.0 / self.fps if self._is_file and self.fps else 0.0
        next_due = time.monotonic()
        try:
            while cap is not None and not self._stop.is_set():
                ok, image = cap.read()
                if not ok:
                    if self._is_file:
                        break  # a file ends
                    if not self.reconnect:
                        self._error = SourceError(f"{self.name} stopped delivering frames (reconnecting is off)")
                        break
                    cap.release()
                    cap = self._reopen()  # None: given up, the loop ends
                    continue
                self._publish(image)
                if period:
                    next_due += period
                    self._stop.wait(max(0.0, next_due - time.monotonic()))
        finally:
            if cap is not None:
                cap.release()
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _publish(self, image: np.ndarray) -> None:
        with self._cond:
            # Frames replaced before the consumer asked for the first one are start-up, not dropped work.
            if self._latest is not None and self._started_consuming:
                self.dropped += 1
            self._latest = Frame(self._read_count, time.time(), image, self.name)
            self._read_count += 1
            self._cond.notify_all()

    def _reopen(self) -> cv2.VideoCapture | None:
        lost_at = time.monotonic()
        delay, max_delay = self.backoff
        log.warning("%s lost: reconnecting (giving up after %g s)", self.name, self.max_reconnect_time)
        while not self._stop.wait(delay):
            cap = self._open()
            if cap is not None:
                self.reconnects += 1
                log.warning("%s back after %.1f s", self.name, time.monotonic() - lost_at)
                return cap
            if time.monotonic() - lost_at >= self.max_reconnect_time:
                self._error = SourceError(
                    f"{self.name} was lost and did not come back within {self.max_reconnect_time:g} s: check the device or network"
                )
                return None
            delay = min(delay * 2, max_delay)
        return None  # closed while waiting

    def __iter__(self) -> Iterator[Frame]:
        while True:
            with self._cond:
                self._started_consuming = True
                while self._latest is None and not self._ended:
                    self._cond.wait()
                frame, self._latest = self._latest, None
                if frame is None:  # ended with nothing new
                    if self._error is not None:
                        raise self._error
                    return
            yield frame

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10.0)  # a network read can block; the thread releases the capture when it returns


class VideoFileSource(Source):
    """Every frame of a video file, in order; unreadable frames are skipped with a warning and counted."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.name = f"video {self.path}"
        self._cap = cv2.VideoCapture(self.path)
        if not self._cap.isOpened():
            self._cap.release()
            raise _open_failure(self.path)
        self.fps = _fps(self._cap)
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self.expected_frames = count if count > 0 else None  # from the container header; a truncated file has fewer

    def __iter__(self) -> Iterator[Frame]:
        if self._cap.get(cv2.CAP_PROP_POS_FRAMES) > 0:  # iterated before (ovseg-run --loop): from the first frame again
            self._cap.release()
            self._cap = cv2.VideoCapture(self.path)
        delivered = bad_run = 0
        while bad_run < MAX_CONSECUTIVE_BAD_FRAMES:
            ok, image = self._cap.read()
            if ok:
                bad_run = 0
                yield Frame(delivered, self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0, image, self.path)
                delivered += 1
                continue
            position = int(self._cap.get(cv2.CAP_PROP_POS_FRAMES))
            if self.expected_frames is None or position >= self.expected_frames:
                break
            if bad_run == 0:
                log.warning("video %s: frame %d cannot be decoded, skipping", self.path, position)
            bad_run += 1
        if self.expected_frames is not None and delivered < self.expected_frames:
            self.skipped = self.expected_frames - delivered
            log.warning(
                "video %s: %d of %d frames could not be read (corrupt or truncated file)",
                self.path,
                self.skipped,
                self.expected_frames,
            )

    def close(self) -> None:
        self._cap.release()


class ImageSource(Source):
    """Images from a file, a directory (sorted, not recursive) or a glob pattern.

    Images are read unchanged (16-bit, RGBA and grayscale reach the segmenter, which converts them);
    unreadable ones are skipped with a warning and counted in ``skipped``.
    """

    independent_frames = True

    def __init__(self, path_dir_or_glob: str | Path):
        self.spec = str(path_dir_or_glob)
        self.paths = self._list(self.spec)
        self.name = f"{len(self.paths)} image(s) from {self.spec}"

    @staticmethod
    def _list(spec: str) -> list[Path]:
        path = Path(spec).expanduser()
        if path.is_file():
            return [path]
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            none = f"no images in directory {spec} (looked for {', '.join(IMAGE_SUFFIXES)})"
        elif any(c in spec for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec)) if os.path.isfile(p))
            none = f"no files match {spec}"
        else:
            none = f"{spec} does not exist: give an image file, a directory of images or a glob like 'dir/*.png'"
            found = []
        if not found:
            raise SourceError(none)
        return found

    def __iter__(self) -> Iterator[Frame]:
        delivered = 0
        for path in self.paths:
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if image is None or image.size == 0:
                self.skipped += 1
                log.warning("image %s cannot be read, skipping", path)
                continue
            yield Frame(delivered, path.stat().st_mtime, image, str(path))
            delivered += 1
        if delivered == 0:
            raise SourceError(f"none of the {len(self.paths)} image(s) at {self.spec} could be read")


def sample_clip(path: str | Path, seconds: float = 4, fps: int = 15, size: tuple[int, int] = (640, 480)) -> Path:
    """Write a clip that pans across real photos shipped with scikit-image (astronaut, coffee, cat): the demo's camera stand-in."""
    try:
        from skimage import data
    except ImportError:
        raise SourceError(
            "the sample clip needs scikit-image: pip install scikit-image, or pass --video PATH"
        ) from None
    width, height = size
    strip_height = int(height * 1.25)  # taller than the frame, so the pan also drifts vertically
    photos = [data.astronaut(), data.coffee(), data.chelsea()]
    resized = [
        cv2.resize(p, (round(p.shape[1] * strip_height / p.shape[0]), strip_height), interpolation=cv2.INTER_AREA)
        for p in photos
    ]
    strip = cv2.cvtColor(np.concatenate(resized, axis=1), cv2.COLOR_RGB2BGR)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise SourceError(
            f"cannot write the sample clip to {path}: this OpenCV has no mp4v encoder or the path is not writable"
        )
    n = max(1, round(seconds * fps))
    span_x = strip.shape[1] - width
    span_y = strip_height - height
    try:
        for i in range(n):
            t = i / max(1, n - 1)
            x = round(t * span_x)
            y = round((0.5 - 0.5 * math.cos(2 * math.pi * t)) * span_y)
            writer.write(np.ascontiguousarray(strip[y : y + height, x : x + width]))
    finally:
        writer.release()
    return path
