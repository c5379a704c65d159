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

from .result import Result
from .sources import Closeable, Frame

VIDEO_FOURCC = "mp4v"


class SinkError(OvsegError, RuntimeError):
    """An output cannot be written; the message is one line saying which and why."""


def frame_record(frame: Frame, result: Result) -> dict:
    """The JSON object of one frame: the source's frame index and timestamp, segments, timings."""
    record = result.to_json_dict(frame.timestamp)
    record["frame"] = frame.index
    record["source"] = frame.source
    return record


def _plain(value):
    """json.dumps fallback for numpy scalars and arrays."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def to_json(record: dict, **kwargs) -> str:
    return json.dumps(record, default=_plain, **kwargs)


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
        raise SinkError(f"cannot write {path}: {e.strerror or e}") from None


class Sink(Closeable):
    needs_overlay = False  # True when write() uses the rendered overlay

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
            raise SinkError(f"cannot write video {self.path}: {e.strerror or e}") from None
        # Open a writer once now, so a bad path or a missing encoder fails before any model is loaded.
        self._open((16, 16)).release()
        self._tmp.unlink(missing_ok=True)

    def _open(self, size: tuple[int, int]) -> cv2.VideoWriter:
        writer = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter.fourcc(*VIDEO_FOURCC), self.fps, size)
        if not writer.isOpened():
            writer.release()
            self._tmp.unlink(missing_ok=True)
            if not os.access(self.path.parent, os.W_OK):
                raise SinkError(f"cannot write video {self.path}: {self.path.parent} is not writable")
            raise SinkError(
                f"cannot write video {self.path}: OpenCV has no {VIDEO_FOURCC} writer for {self.path.suffix or 'files without a suffix'} (use .mp4)"
            )
        return writer

    def write(self, frame: Frame, result: Result, overlay: np.ndarray | None) -> None:
        if overlay is None:
            raise SinkError("VideoSink needs the rendered overlay")
        if self._writer is None:
            self._size = (overlay.shape[1], overlay.shape[0])
            self._writer = self._open(self._size)
        if (overlay.shape[1], overlay.shape[0]) != self._size:  # images of mixed sizes: the video keeps the first size
            overlay = cv2.resize(overlay, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(overlay)
        self.frames += 1

    def close(self) -> None:
        if self._writer is None:
            return
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
            raise SinkError(f"cannot create --save-dir {self.dir}: {e.strerror or e}") from None
        if not os.access(self.dir, os.W_OK):
            raise SinkError(f"--save-dir {self.dir} is not writable")

    def write(self, frame: Frame, result: Result, overlay: np.ndarray | None) -> None:
        stem = f"frame_{frame.index:06d}"
        label_map = result.label_map
        low, high = (int(label_map.min()), int(label_map.max())) if label_map.size else (0, 0)
        if low < 0 or high > np.iinfo(np.uint16).max:
            raise SinkError(f"label map of frame {frame.index} has ids {low}..{high}: a PNG label map holds 0..65535")
        dtype = np.uint8 if high <= np.iinfo(np.uint8).max else np.uint16
        ok, png = cv2.imencode(".png", label_map.astype(dtype))
        if not ok:
            raise SinkError(f"cannot encode the label map of frame {frame.index} as PNG")
        atomic_write(self.dir / f"{stem}.png", png.tobytes())
        record = frame_record(frame, result)
        record["label_map"] = f"{stem}.png"
        record["labels"] = {str(k): v for k, v in result.labels.items()}
        atomic_write(self.dir / f"{stem}.json", (to_json(record, indent=1) + "\n").encode())
        self.frames += 1


class JsonLinesSink(Sink):
    """One JSON object per frame and line (frame, timestamp, source, segments, timings), flushed per line."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.frames = 0

    def write(self, frame: Frame, result: Result, overlay: np.ndarray | None) -> None:
        self.stream.write(to_json(frame_record(frame, result)) + "\n")
        self.stream.flush()
        self.frames += 1
