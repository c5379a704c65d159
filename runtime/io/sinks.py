"""Where ovseg-run writes results: an annotated video, per-frame label maps + JSON, JSON lines on stdout.

Every sink has ``write(frame, result, overlay)`` and ``close()``. Files appear whole or not at all:
each is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

import cv2
import numpy as np

from ovseg.errors import OvsegError

from ..result import Result
from .sources import Closeable, Frame

VIDEO_FOURCC = "mp4v"
# Room kept free on an output's disk: a video finalises (buffered frames, then its index) into it when a full disk
# stops the run, so every sink stops writing frames before the disk is this full.
DISK_RESERVE = 2 << 20
INDEX_BYTES_PER_FRAME = 64  # an mp4 index entry per frame (sample size, offset, time), with room to spare
FRAME_ROOM = 1 << 20  # what one frame may add to every output together (a video frame, a PNG, a JSON): check_room()


def frame_record(frame: Frame, result: Result) -> dict:
    """The JSON object of one frame: the source's frame index and timestamp, segments, timings."""
    return result.to_json_dict(frame.timestamp) | {"frame": frame.index, "source": frame.source}


def to_json(record: dict, **kwargs) -> str:
    """json.dumps that takes numpy scalars and arrays too."""
    return json.dumps(record, default=lambda value: value.tolist(), **kwargs)


def _temp_name(path: Path) -> Path:
    # Keep the suffix: OpenCV picks the container (and imwrite the format) from it.
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


def atomic_write(path: Path, data: bytes) -> None:
    tmp = _temp_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OvsegError(f"cannot write {path}: {e.strerror or e}") from None


def check_space(directory: Path, reserve: int, what: str, frames: int) -> None:
    """An OvsegError when the disk holding ``directory`` has less than ``reserve`` bytes left for an unprivileged
    writer: the run stops there, and what was written so far is finalised in the room kept."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < reserve:
        raise OvsegError(
            f"the disk holding {what} is full ({free / 2**20:.1f} MiB left, {reserve / 2**20:.1f} MiB kept to finalise "
            f"the outputs): stopped after {frames} frames, each output written so far is whole; free some space"
        )


class Sink(Closeable):
    needs_overlay = False  # True when write() uses the rendered overlay

    def check_room(self, frame_room: int = FRAME_ROOM) -> None:
        """Raise an OvsegError when the disk lacks the room kept to finalise plus ``frame_room`` for the next frame.
        ovseg-run asks every sink before writing a frame to any; write() asks again with no frame room."""

    def write(self, frame: Frame, result: Result, overlay: np.ndarray | None) -> None:
        raise NotImplementedError


class VideoSink(Sink):
    """The annotated frames as a video (mp4v). Written to a temporary name and renamed on close(),
    so a run stopped by Ctrl-C or an error still leaves a finalised, playable file when close() runs."""

    needs_overlay = True

    def __init__(self, path: str | Path, fps: float):
        self.path = Path(path).expanduser()
        self.fps = float(fps)
        self.frames = 0
        self._tmp = _temp_name(self.path)
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OvsegError(f"cannot write video {self.path}: {e.strerror or e}") from None
        # Open a writer once now, so a bad path or a missing encoder fails before any model is loaded.
        self._open((16, 16)).release()
        self._tmp.unlink(missing_ok=True)
        self.check_room()

    def _open(self, size: tuple[int, int]) -> cv2.VideoWriter:
        writer = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter.fourcc(*VIDEO_FOURCC), self.fps, size)
        if not writer.isOpened():
            writer.release()
            self._tmp.unlink(missing_ok=True)
            if not os.access(self.path.parent, os.W_OK):
                raise OvsegError(f"cannot write video {self.path}: {self.path.parent} is not writable")
            raise OvsegError(
                f"cannot write video {self.path}: OpenCV has no {VIDEO_FOURCC} writer for {self.path.suffix or 'files without a suffix'} (use .mp4)"
            )
        return writer

    def write(self, frame: Frame, result: Result, overlay: np.ndarray | None) -> None:
        assert overlay is not None  # needs_overlay
        self.check_room(frame_room=0)
        if self._writer is None:
            self._size = (overlay.shape[1], overlay.shape[0])
            self._writer = self._open(self._size)
        if (overlay.shape[1], overlay.shape[0]) != self._size:  # images of mixed sizes: the video keeps the first size
            overlay = cv2.resize(overlay, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(overlay)
        self.frames += 1

    def check_room(self, frame_room: int = FRAME_ROOM) -> None:
        reserve = DISK_RESERVE + INDEX_BYTES_PER_FRAME * self.frames + frame_room
        check_space(self.path.parent, reserve, f"--save {self.path}", self.frames)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
            os.replace(self._tmp, self.path)


class FrameDirSink(Sink):
    """Per frame: ``frame_NNNNNN.png``, the label map (uint8, or uint16 when an id exceeds 255), and
    ``frame_NNNNNN.json`` with the labels, segments and timings."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory).expanduser()
        self.frames = 0
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OvsegError(f"cannot create --save-dir {self.dir}: {e.strerror or e}") from None
        if not os.access(self.dir, os.W_OK):
            raise OvsegError(f"--save-dir {self.dir} is not writable")
        self.check_room()

    def check_room(self, frame_room: int = FRAME_ROOM) -> None:
        check_space(self.dir, DISK_RESERVE + frame_room, f"--save-dir {self.dir}", self.frames)

    def write(self, frame: Frame, result: Result, overlay: np.ndarray | None) -> None:
        self.check_room(frame_room=0)
        stem = f"frame_{frame.index:06d}"
        label_map = result.label_map
        low, high = (int(label_map.min()), int(label_map.max())) if label_map.size else (0, 0)
        if low < 0 or high > np.iinfo(np.uint16).max:
            raise OvsegError(f"label map of frame {frame.index} has ids {low}..{high}: a PNG label map holds 0..65535")
        dtype = np.uint8 if high <= np.iinfo(np.uint8).max else np.uint16
        atomic_write(self.dir / f"{stem}.png", cv2.imencode(".png", label_map.astype(dtype))[1].tobytes())
        labels = {str(k): v for k, v in result.labels.items()}
        record = frame_record(frame, result) | {"label_map": f"{stem}.png", "labels": labels}
        try:
            atomic_write(self.dir / f"{stem}.json", (to_json(record, indent=1) + "\n").encode())
        except OvsegError:
            (self.dir / f"{stem}.png").unlink(missing_ok=True)  # a frame is its label map and its JSON, or neither
            raise
        self.frames += 1


class JsonLinesSink(Sink):
    """One JSON object per frame and line (frame, timestamp, source, segments, timings), flushed per line."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, frame: Frame, result: Result, overlay: np.ndarray | None) -> None:
        self.stream.write(to_json(frame_record(frame, result)) + "\n")
        self.stream.flush()
