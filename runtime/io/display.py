"""The live window of ovseg-run: is there a display, the status line, show a frame, 'q' or Esc to quit."""

from __future__ import annotations

import functools
import os

import cv2
import numpy as np

QUIT_KEYS = (ord("q"), ord("Q"), 27)  # 27 is Esc
FONT = cv2.FONT_HERSHEY_SIMPLEX


@functools.lru_cache
def _build_info(key: str) -> str:
    """The value of ``key`` in OpenCV's build information, "" when it has none."""
    for line in cv2.getBuildInformation().splitlines():
        name, _, value = line.strip().partition(":")
        if name.strip() == key:
            return value.strip()
    return ""


def gui_backend() -> str | None:
    """OpenCV's highgui backend (e.g. "GTK3", "QT5"), or None when it has none (opencv-python-headless)."""
    value = _build_info("GUI")
    return None if value.upper() in ("", "NONE") else value


def has_gstreamer() -> bool:
    """True when this OpenCV can open GStreamer pipelines (JetPack's can; PyPI's wheels cannot)."""
    return _build_info("GStreamer").upper().startswith("YES")


def display_problem() -> str | None:
    """Why no window can open, with the fix; None when one can (an X11 or Wayland display and a GUI build of OpenCV)."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display: DISPLAY and WAYLAND_DISPLAY are unset (a headless machine, or ssh without -X)"
    if gui_backend() is None:
        return (
            "this OpenCV has no GUI (opencv-python-headless): for windows run "
            "`pip uninstall -y opencv-python-headless && pip install opencv-python`, or `make setup OPENCV=gui`"
        )
    return None


def has_display() -> bool:
    """True when a window can open: an X11 or Wayland display is set and OpenCV was built with a GUI."""
    return display_problem() is None


def draw_status(image: np.ndarray, fps: float, timings: dict[str, float]) -> np.ndarray:
    """Draw "12.3 FPS | dinov2 20.1 | clip 31.0 | ... | total 80.2 ms" along the bottom of ``image`` (the legend is at the top), in place."""
    stages = [f"{name} {ms:.1f}" for name, ms in timings.items() if name != "total" and ms > 0]
    total = [f"total {timings['total']:.1f}"] if "total" in timings else []
    pad, thickness = 4, 1
    room = image.shape[1] - 2 * pad
    for text in (
        " | ".join([f"{fps:.1f} FPS", *stages, *total]) + " ms",
        " | ".join([f"{fps:.1f} FPS", *total]) + " ms",
    ):
        # As large as reads well, shrunk until it fits; too long even at the smallest size: FPS and total only.
        scale = min(0.7, max(0.4, image.shape[1] / 1400))
        while scale > 0.3 and cv2.getTextSize(text, FONT, scale, thickness)[0][0] > room:
            scale *= 0.95  # Hershey glyph widths do not scale linearly: shrink step by step
        if cv2.getTextSize(text, FONT, scale, thickness)[0][0] <= room:
            break
    (w, h), base = cv2.getTextSize(text, FONT, scale, thickness)
    band_top = max(0, image.shape[0] - (h + base + 2 * pad))
    band = image[band_top:, : min(image.shape[1], w + 2 * pad)]
    band[...] = (band * 0.4).astype(image.dtype)  # darken behind the text so it reads on any frame
    cv2.putText(image, text, (pad, image.shape[0] - pad - base), FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return image


class Window:
    """One OpenCV window; ``show()`` returns False once the user pressed 'q' or Esc, or closed the window."""

    def __init__(self, title: str = "ovseg"):
        self.title = title
        self._open = False

    def show(self, image: np.ndarray) -> bool:
        if not self._open:
            cv2.namedWindow(self.title, cv2.WINDOW_NORMAL)
            self._open = True
        cv2.imshow(self.title, image)
        if (cv2.waitKey(1) & 0xFF) in QUIT_KEYS:
            return False
        return cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) >= 1

    def close(self) -> None:
        if self._open:
            cv2.destroyWindow(self.title)
            cv2.waitKey(1)
            self._open = False
