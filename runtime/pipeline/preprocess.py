"""Frames in, encoder inputs out: any supported frame -> the S x S RGB image -> normalised NCHW float32.

Frames are resized *before* any colour or bit-depth conversion, so the work per frame is at S x S
whatever the frame's size, and every buffer is allocated once per input kind. Each image encoder has its own S
(``Preprocessors``): a frame is resized once per distinct size.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np

from ovseg.errors import SegmenterError

# cv2 colour conversions to RGB, by channel count; 1 channel is grayscale, 4 is BGRA.
_TO_RGB = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}
_MAX = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
# Linear interpolation aliases when it shrinks by more than about 2x; area averaging does not.
AREA_BELOW = 0.5


def check_frame(frame: object) -> np.ndarray:
    """The frame as an (H, W, C) view, C in 1/3/4, uint8 or uint16; anything else is a one-line SegmenterError."""
    if not isinstance(frame, np.ndarray):
        raise SegmenterError(
            f"a frame must be a numpy array (H, W[, C]) of uint8 or uint16, got {type(frame).__name__}"
        )
    if frame.dtype not in _MAX:
        raise SegmenterError(
            f"frames must be uint8 or uint16 (8-/16-bit images), got {frame.dtype}; convert with frame.astype(np.uint8)"
        )
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.ndim != 3 or frame.shape[2] not in _TO_RGB:
        raise SegmenterError(f"a frame must be HxW (gray), HxWx3 (BGR) or HxWx4 (BGRA), got shape {frame.shape}")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise SegmenterError(f"the frame is empty (shape {frame.shape})")
    return frame


def to_bgr8(frame: np.ndarray) -> np.ndarray:
    """Any supported frame at its own size as uint8 BGR (for display; allocates when it has to convert)."""
    frame = check_frame(frame)
    if frame.dtype == np.uint16:
        frame = cv2.convertScaleAbs(frame, alpha=255.0 / 65535.0)
    channels = frame.shape[2] if frame.ndim == 3 else 1
    if channels == 1:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if channels == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    return np.ascontiguousarray(frame)


class Preprocessor:
    """Resizes frames to S x S and normalises them into an encoder's preallocated input."""

    def __init__(self, size: int):
        self.size = size
        self.rgb = np.zeros((size, size, 3), np.uint8)  # the last frame at S x S, RGB; also the guide of refine="edges"
        self._resized: dict[tuple, np.ndarray] = {}
        self._scale = 1.0 / 255.0

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """Resize ``frame`` into ``self.rgb`` (returned). Raises SegmenterError for frames it cannot read."""
        frame = check_frame(frame)
        if not frame.flags.c_contiguous:
            frame = np.ascontiguousarray(frame)
        h, w, c = frame.shape
        s = self.size
        interpolation = cv2.INTER_AREA if max(s / h, s / w) < AREA_BELOW else cv2.INTER_LINEAR
        key = (frame.dtype, c)
        small = self._resized.get(key)
        if small is None:
            small = self._resized[key] = np.zeros((s, s) if c == 1 else (s, s, c), frame.dtype)
        src = frame[:, :, 0] if c == 1 else frame
        cv2.resize(src, (s, s), dst=small, interpolation=interpolation)
        if frame.dtype == np.uint16:
            small8 = self._resized.setdefault(("u8", c), np.zeros(small.shape, np.uint8))
            cv2.convertScaleAbs(small, dst=small8, alpha=255.0 / 65535.0)
            small = small8
        cv2.cvtColor(small, _TO_RGB[c], dst=self.rgb)
        return self.rgb

    def normalise(
        self, out: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], rgb: np.ndarray | None = None
    ) -> np.ndarray:
        """(rgb / 255 - mean) / std into ``out`` (1, 3, S, S) float32, channel by channel, without temporaries.
        ``rgb``: an S x S RGB frame, by default the last one resized (``self.rgb``)."""
        rgb = self.rgb if rgb is None else rgb
        for c in range(3):
            plane = out[0, c]
            np.multiply(rgb[:, :, c], np.float32(self._scale / std[c]), out=plane)
            np.subtract(plane, np.float32(mean[c] / std[c]), out=plane)
        return out


class Preprocessors:
    """The image encoders' Preprocessors, one per distinct input size: encoders of one size share it."""

    def __init__(self, sizes: Mapping[str, int]):
        by_size = {s: Preprocessor(s) for s in dict.fromkeys(sizes.values())}
        self.encoders = {e: by_size[s] for e, s in sizes.items()}
        self.distinct = list(by_size.values())

    def __getitem__(self, encoder: str) -> Preprocessor:
        return self.encoders[encoder]

    def __call__(self, frame: np.ndarray) -> None:
        """Resize ``frame`` once per size, into each Preprocessor's ``rgb``. Raises SegmenterError as Preprocessor does."""
        for pre in self.distinct:
            pre(frame)
