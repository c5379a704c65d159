"""ovseg's torch-free runtime: ``Segmenter.from_bundle(...)(frame) -> Result``.

The Segmenter (and onnxruntime with it) loads on first use, so ``import ovseg.runtime`` stays cheap; importing it
checks the install (ovseg.environment) and raises InstallError, an ImportError, saying what to run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ovseg.environment import check_install
from ovseg.errors import SegmenterError

from .config import SegmenterConfig
from .result import Result, Segment

check_install()  # two ONNX Runtimes or two OpenCVs overwrite each other: refuse them before anything loads

if TYPE_CHECKING:
    from .segmenter import Segmenter, Stream, VideoStream

__all__ = ["Result", "Segment", "Segmenter", "SegmenterConfig", "SegmenterError", "Stream", "VideoStream"]


def __getattr__(name: str):
    if name in ("Segmenter", "Stream", "VideoStream"):
        from . import segmenter

        return getattr(segmenter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
