"""ovseg-run: segment a camera, stream, video or images and name every segment from an open vocabulary."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ovseg.cli import (
    add_bundle_argument,
    add_segmenter_arguments,
    by_profile,
    fraction,
    log_lines,
    non_negative_int,
    positive_int,
    run_cli,
    say,
    signals_deferred,
)
from ovseg.constants import REFINES

from ..bundle.signing import add_trusted_key_argument
from ..config import SegmenterConfig
from ..io.display import Window, display_problem, draw_status
from ..io.sinks import FrameDirSink, JsonLinesSink, Sink, VideoSink
from ..io.sources import Frame, ImageSource, LatestFrameCapture, Source, VideoFileSource, is_live, sample_clip
from ..io.web import WebSink, parse_address
from ..pipeline.vocabulary import parse_class_list

PROG = "ovseg-run"
# Live and image sources keep only the frames that were processed, at a rate not known up front.
UNTIMED_VIDEO_FPS = 10.0


def _camera_index(text: str) -> int:
    try:
        return non_negative_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"a camera index is 0 or more, got {text}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    add_bundle_argument(p, "bundle written by ovseg-export")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--camera", type=_camera_index, metavar="N", help="camera index (live: newest frame only)")
    src.add_argument(
        "--video",
        metavar="PATH_OR_URL",
        help="video file (every frame), stream URL such as rtsp:// (live), or a GStreamer pipeline ending in appsink (live; Jetson CSI cameras: docs/install.md)",
    )
    src.add_argument("--image", metavar="PATH_DIR_OR_GLOB", help="an image, a directory of images, or a quoted glob")
    src.add_argument("--sample", action="store_true", help="a 4 s clip across photos, to try ovseg without a camera")
    vocab = p.add_mutually_exclusive_group()
    vocab.add_argument("--classes", metavar="a,b,c", help="guided mode: label every pixel with one of these classes")
    vocab.add_argument(
        "--vocab",
        metavar="PRESET_OR_FILE",
        help="guidance-free mode naming segments from this vocabulary: a preset (voc21, ade150, ...) or a file, one name per line",
    )
    add_segmenter_arguments(p, per="frame")
    p.add_argument("--refine", choices=REFINES, help="sharpen labels by voting inside segments, or along edges")
    p.add_argument("--threshold", type=float, metavar="T", help="label segments scoring under T 'unknown'")
    p.add_argument(
        "--keyframe-interval",
        type=positive_int,
        metavar="N",
        help="run CLIP at least every N-th frame; DINOv2 runs on every frame and the segments carry the last CLIP labels "
        f"(default: the bundle's profile's: {by_profile('keyframe_interval')})",
    )
    p.add_argument(
        "--keyframe-change",
        type=fraction,
        metavar="F",
        help="with a keyframe interval over 1: run CLIP as soon as a fraction F of the picture has changed since the last "
        f"CLIP pass; 1 turns it off (default: the bundle's profile's: {by_profile('keyframe_change')})",
    )
    p.add_argument(
        "--server",
        action="append",
        metavar="grpc://HOST:PORT",
        help="segment on ovseg-serve instead of here (repeat it, or give a comma list, to spread streams over servers)",
    )
    p.add_argument("--save", type=Path, metavar="OUT.mp4", help="write the annotated video here")
    p.add_argument("--save-dir", type=Path, metavar="DIR", help="write per-frame PNG label maps and JSON here")
    p.add_argument("--json", action="store_true", help="print one JSON object per frame on stdout")
    p.add_argument("--no-show", action="store_true", help="do not open a window")
    p.add_argument("--max-frames", type=positive_int, metavar="N", help="stop after N frames")
    add_trusted_key_argument(p, "open the bundle only if one of these Ed25519 public keys signed it; none: any bundle")
    p.add_argument("--loop", action="store_true", help="replay a video file, the images or --sample after the end")
    p.add_argument(
        "--web",
        type=parse_address,
        metavar="[HOST:]PORT",
        help="serve the live overlay, the segments and a box to change the classes to browsers (HOST defaults to "
        "127.0.0.1; 0.0.0.0 opens it to the network; port 0 picks a free one)",
    )
    p.add_argument(
        "--web-token",
        metavar="TOKEN",
        help="what the --web page asks for before it changes the classes (default: a random token, printed at start)",
    )
    p.add_argument(
        "--web-allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name browsers reach this machine by besides its own (e.g. robot7.lab.example.com; repeatable): other "
        "names are refused against DNS rebinding; addresses always pass",
    )
    return p


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.web_token is not None and (args.web is None or not args.web_token.strip()):
        p.error("--web-token needs --web and a token that is not empty")
    if args.web_allow_host and (args.web is None or not all(n.strip() for n in args.web_allow_host)):
        p.error("--web-allow-host needs --web and a name that is not empty")
    if args.loop and (args.camera is not None or (args.video is not None and is_live(args.video))):
        p.error("--loop needs a video file, images or --sample: a camera or stream has no last frame")


def quiet_opencv() -> None:
    # OpenCV and FFmpeg print their own warnings for every failed open or bad packet; ours say what to do.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    import cv2.utils.logging

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


@dataclass
class LatencyStats:
    """Per-stage milliseconds of every processed frame, and the wall time of the loop."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    frames: int = 0
    last_frame_at: float | None = None

    def add(self, timings: dict[str, float]) -> None:
        self.last_frame_at = time.perf_counter()
        self.frames += 1
        for stage, ms in timings.items():
            self.samples.setdefault(stage, []).append(float(ms))

    def fps(self, started: float) -> float:
        elapsed = (self.last_frame_at or started) - started
        return self.frames / elapsed if elapsed > 0 else 0.0

    def table(self, started: float, dropped: int | None, skipped: int) -> str:
        elapsed = (self.last_frame_at or started) - started
        counts = f"{self.frames} frames in {elapsed:.2f} s ({self.fps(started):.2f} FPS)"
        if dropped is not None:
            counts += f", {dropped} dropped"
        counts += f", {skipped} skipped"
        width = max([len(s) for s in self.samples] + [5])
        lines = [counts, f"{'stage':<{width}}  {'mean':>8} {'p50':>8} {'p90':>8} {'p99':>8}  ms"]
        for stage, values in self.samples.items():
            v = np.asarray(values)
            if not v.any():
                continue  # a stage this run never used (e.g. refine without --refine)
            p50, p90, p99 = np.percentile(v, [50, 90, 99])
            lines.append(f"{stage:<{width}}  {v.mean():8.2f} {p50:8.2f} {p90:8.2f} {p99:8.2f}")
        return "\n".join(lines)


def _open_source(args: argparse.Namespace, stack: contextlib.ExitStack) -> Source:
    if args.camera is not None:
        return LatestFrameCapture(args.camera)
    if args.video is not None:
        return LatestFrameCapture(args.video) if is_live(args.video) else VideoFileSource(args.video)
    if args.image is not None:
        return ImageSource(args.image)
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ovseg-sample-")))
    say(PROG, "--sample: a 4 s clip panning across scikit-image's astronaut, coffee and cat photos")
    return VideoFileSource(sample_clip(tmp / "sample.mp4"))


def _open_sinks(args: argparse.Namespace, source: Source) -> list[Sink]:
    sinks: list[Sink] = []
    if args.save is not None:
        every_frame = isinstance(source, VideoFileSource) and source.fps
        sinks.append(VideoSink(args.save, source.fps if every_frame and source.fps else UNTIMED_VIDEO_FPS))
    if args.save_dir is not None:
        sinks.append(FrameDirSink(args.save_dir))
    if args.json:
        sinks.append(JsonLinesSink(sys.stdout))
    if args.web is not None:  # last: it binds a port, which a sink failing after it would leave bound
        classes = parse_class_list(args.classes) if args.classes is not None else None
        web = WebSink(args.web, args.web_token, classes, tuple(args.web_allow_host))
        sinks.append(web)
        say(
            PROG,
            f"watch at {web.url}; changing the classes there needs the token {web.token} ({web.url}#token={web.token})",
        )
    return sinks


def _run(args: argparse.Namespace, open_segmenter: Callable) -> int:
    classes = parse_class_list(args.classes) if args.classes is not None else None
    stats = LatencyStats()
    started = time.perf_counter()
    source: Source | None = None
    sinks: list[Sink] = []
    try:
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(_open_source(args, stack))
            sinks = [stack.enter_context(s) for s in _open_sinks(args, source)]
            if args.threads:  # this process is ovseg-run's: the native kernels take --threads too
                from ovseg import _native

                _native.set_num_threads(args.threads)
            seg = open_segmenter(
                args.bundle,
                classes=classes,
                vocab=args.vocab,
                config=SegmenterConfig(
                    precision=args.precision,
                    num_segments=args.segments,
                    keyframe_interval=args.keyframe_interval,
                    keyframe_change=args.keyframe_change,
                    score_threshold=args.threshold,
                    refine=args.refine,
                ),
                backend=args.backend,
                threads=args.threads,
                trusted_keys=args.trusted_key,
            )
            stack.callback(seg.close)
            window = None
            if not args.no_show:
                problem = display_problem()
                if problem is None:
                    window = Window(PROG)
                    stack.callback(window.close)
                else:
                    say(PROG, f"{problem}; running headless")
            if window is None and not sinks:
                say(PROG, "nothing is shown or saved: add --save OUT.mp4, --save-dir DIR or --json to keep the results")
            say(PROG, f"{seg.mode} mode, backend {seg.backend}, {seg.precision}; reading {source.name}")
            started = time.perf_counter()
            _loop(args, source, seg, sinks, window, stats, started)
    finally:
        if stats.frames:
            dropped = source.dropped if isinstance(source, LatestFrameCapture) else None
            print(stats.table(started, dropped, source.skipped if source else 0), file=sys.stderr, flush=True)
        for sink in sinks:
            if isinstance(sink, VideoSink) and sink.frames:
                say(PROG, f"wrote {sink.path} ({sink.frames} frames)")
            elif isinstance(sink, FrameDirSink) and sink.frames:
                say(PROG, f"wrote {sink.frames} label maps + JSON to {sink.dir}")
    return 0


def _loop(
    args, source: Source, seg, sinks: list[Sink], window: Window | None, stats: LatencyStats, started: float
) -> None:
    need_overlay = window is not None or any(s.needs_overlay for s in sinks)
    steered = [s for s in sinks if isinstance(s, WebSink)]
    for frame in _frames(source, args.loop):
        for web in steered:
            web.before_frame(seg)  # changes asked for on the page, applied on this thread between frames
        if source.independent_frames:
            seg.reset()  # unrelated images: no warm start from the previous one
        result = seg(frame.image)
        timings = dict(result.timings)
        overlay = None
        if need_overlay:
            t0 = time.perf_counter()
            overlay = seg.render(frame.image, result)
            draw_status(overlay, stats.fps(started) if stats.frames else 0.0, result.timings)
            timings["overlay"] = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        with signals_deferred():  # a frame reaches every sink and the frame count, or none of them
            for sink in sinks:
                sink.check_room()
            for sink in sinks:
                sink.write(frame, result, overlay)
            keep_going = window.show(overlay) if window is not None and overlay is not None else True
            timings["output"] = (time.perf_counter() - t0) * 1000
            stats.add(timings)
        if not keep_going or (args.max_frames and stats.frames >= args.max_frames):
            break


def _frames(source: Source, loop: bool) -> Iterator[Frame]:
    """The source's frames; with ``loop`` again from the first after the last, until a pass yields none."""
    while True:
        count = 0
        for frame in source:
            count += 1
            yield frame
        if not loop or not count:
            return


def main(argv: list[str] | None = None) -> int:
    """Run ovseg-run."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    quiet_opencv()

    def body() -> int:
        opener: Callable
        if args.server:
            from ..triton.client import parse_servers, remote_opener

            opener = remote_opener(parse_servers(args.server))
        else:
            from ..segmenter import Segmenter  # onnxruntime loads here, after --help and argument errors

            opener = Segmenter.from_bundle
        with log_lines(PROG):
            return _run(args, opener)

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
