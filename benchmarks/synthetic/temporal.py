"""Labels over time in the synthetic world: clips of held-out scenes (cuts, a still camera, slow and fast pans, an
object entering and leaving, all with sensor noise) through one stream each, every frame also run alone (a fresh
stream) as the reference of what the frame by itself gives.

    python -m ovseg.benchmarks.synthetic.temporal --out results/temporal

Per profile and mode (guided, guidance-free):
- flicker: the share of pixels whose label changes from one frame to the next while their ground truth does not;
  ``still`` is its mean and max on the still clips' steady frames (from SETTLE frames after the start);
- stale: frames naming a class that is absent from the frame's ground truth, that the frame alone does not name, and
  that the stream named between the two last cuts or changes (carried over), and how many frames after it they came;
  ``held``: frames naming such a class that the stream named only since (held by hysteresis within the scene);
- lag: frames from a change (a cut, an object entering or leaving) to the right labels: no stale class, and every
  class of the ground truth that the frame alone names is named;
- mIoU over all clips' frames with the video state, and of the same frames run alone.

Results go to OUT/temporal.json and OUT/temporal.md; ``--bundle`` reuses an exported world bundle.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ovseg.runtime.segmenter import Segmenter

from .dataset import split_layouts
from .quality import IMAGE_SIZE, export_world_bundle, open_world, score
from .scenes import Layout, render
from .world import CLASSES

NOISE = 3.0  # sensor noise (sigma, 8-bit levels) on every frame
SETTLE = 4  # a still clip's steady state starts this many frames after its start
KINDS = ("cuts", "still", "pan slow", "pan fast", "enter/leave")
PAN_SPEED = {"pan slow": 2, "pan fast": 8}  # pixels per frame at 224
MODES = ("guided", "free")
PROFILES = ("accurate", "balanced", "fast")
NONE = 255  # class_map's "no class"


@dataclass
class Frame:
    image: np.ndarray  # (H, W, 3) uint8 BGR, noisy
    labels: np.ndarray  # (H, W) uint8 indices into CLASSES


@dataclass
class Clip:
    kind: str
    frames: list[Frame]
    events: list[int]  # frames where the picture changed: the start, a cut, an object entering or leaving


def noisy(image_rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = image_rgb.astype(np.float32) + rng.normal(0, NOISE, image_rgb.shape)
    return np.ascontiguousarray(out.clip(0, 255).astype(np.uint8)[..., ::-1])


def frame_of(layout: Layout, rng: np.random.Generator, window: slice | None = None) -> Frame:
    scene = render(layout)
    image, labels = scene.image, scene.labels
    if window is not None:
        image, labels = image[:, window], labels[:, window]
    return Frame(noisy(image, rng), np.ascontiguousarray(labels))


def make_clips(scenes: int = 6, frames: int = 12, seed: int = 0) -> list[Clip]:
    """The benchmark's clips from held-out layouts: one cut sequence (``scenes`` scenes of ``frames // 2`` frames), and
    per kind ``scenes // 2`` clips of ``frames`` frames."""
    rng = np.random.default_rng(4_000_000 + seed)
    size = (IMAGE_SIZE, IMAGE_SIZE)
    each = max(1, scenes // 2)
    clips = []
    per = max(2, frames // 2)
    cut = [frame_of(layout, rng) for layout in split_layouts("val", scenes, seed + 10, size) for _ in range(per)]
    clips.append(Clip("cuts", cut, list(range(0, len(cut), per))))
    for layout in split_layouts("val", each, seed + 11, size):
        clips.append(Clip("still", [frame_of(layout, rng) for _ in range(frames)], [0]))
    for kind, speed in PAN_SPEED.items():
        wide = (IMAGE_SIZE, IMAGE_SIZE + speed * (frames - 1))
        for layout in split_layouts("val", each, seed + 12 + speed, wide):
            scene = [frame_of(layout, rng, slice(speed * t, speed * t + IMAGE_SIZE)) for t in range(frames)]
            clips.append(Clip(kind, scene, [0]))
    third = max(1, frames // 3)
    for layout in split_layouts("val", each, seed + 13, size):  # 2-5 objects: the front one enters, then leaves
        without = Layout(layout.floor, layout.objects[:-1], layout.size, layout.seed)
        steps = [without] * third + [layout] * third + [without] * (frames - 2 * third)
        clips.append(Clip("enter/leave", [frame_of(s, rng) for s in steps], [0, third, 2 * third]))
    return clips


def named(class_map: np.ndarray) -> set[int]:
    return set(np.unique(class_map).tolist()) - {NONE}


@dataclass
class Run:
    """One clip through one stream, and each of its frames alone."""

    kind: str
    flicker: list[float]  # per frame from the second
    stale: list[int]  # per frame: how many stale classes the stream named before the last event (carried over)
    held: list[int]  # per frame: how many other stale classes (held by the state within the scene)
    since: list[int]  # per frame: frames since the last event
    lags: list[int]  # per event
    pairs: list[tuple[np.ndarray, np.ndarray]] = field(repr=False)  # (ground truth, prediction) with state
    alone: list[tuple[np.ndarray, np.ndarray]] = field(repr=False)  # and frame by frame


def run_clip(seg: Segmenter, clip: Clip) -> Run:
    stream, fresh = seg.stream(), seg.stream()
    state_maps, alone_maps = [], []
    for frame in clip.frames:
        result = stream(frame.image)
        state_maps.append(result.class_map(CLASSES))
        fresh.reset()
        alone_maps.append(fresh(frame.image).class_map(CLASSES))
    flicker = [
        float(np.mean((state_maps[t] != state_maps[t - 1]) & (clip.frames[t].labels == clip.frames[t - 1].labels)))
        for t in range(1, len(clip.frames))
    ]
    stale, held, wrong, since = [], [], [], []
    before: set[int] = set()  # what the stream named between the two last events
    seen: set[int] = set()
    for t, (frame, p, a) in enumerate(zip(clip.frames, state_maps, alone_maps)):
        if t in clip.events:
            before, seen = seen, set()
        seen |= named(p)
        truth = named(frame.labels)
        bad = (named(p) - truth) - named(a)
        missed = (named(a) & truth) - named(p)
        stale.append(len(bad & before))
        held.append(len(bad - before))
        wrong.append(bool(bad or missed))
        since.append(t - max(e for e in clip.events if e <= t))
    lags = []
    for i, e in enumerate(clip.events):
        end = clip.events[i + 1] if i + 1 < len(clip.events) else len(clip.frames)
        lags.append(next((t - e for t in range(e, end) if not wrong[t]), end - e))
    truths = [f.labels for f in clip.frames]
    return Run(
        clip.kind,
        flicker,
        stale,
        held,
        since,
        lags,
        list(zip(truths, state_maps)),
        list(zip(truths, alone_maps)),
    )


def summarise(runs: list[Run]) -> dict:
    """The table's row of one profile and mode, and the same per clip kind."""

    def pct(values: list[float]) -> float:
        return round(100 * float(np.mean(values)), 2) if values else 0.0

    def row(rs: list[Run]) -> dict:
        stale_since = [s for r in rs for n, s in zip(r.stale, r.since) if n]
        steady = [f for r in rs for t, f in enumerate(r.flicker, start=1) if t >= SETTLE]
        lags = [lag for r in rs for lag in r.lags]
        return {
            "frames": sum(len(r.stale) for r in rs),
            "flicker_pct": pct([f for r in rs for f in r.flicker]),
            "steady_flicker_pct": pct(steady),
            "steady_flicker_max_pct": round(100 * max(steady), 2) if steady else 0.0,
            "stale_frames": len(stale_since),
            "stale_frames_after_event": sorted(stale_since),
            "held_frames": sum(1 for r in rs for n in r.held if n),
            "lag_mean": round(float(np.mean(lags)), 2) if lags else 0.0,
            "lag_max": max(lags) if lags else 0,
            "miou_state": score([p for r in rs for p in r.pairs], "state").miou,
            "miou_alone": score([p for r in rs for p in r.alone], "alone").miou,
        }

    out = row(runs)
    out["kinds"] = {k: row([r for r in runs if r.kind == k]) for k in KINDS if any(r.kind == k for r in runs)}
    return out


def measure(bundle: Path, clips: list[Clip], profiles: tuple[str, ...], modes: tuple[str, ...]) -> list[dict]:
    rows = []
    for profile in profiles:
        for mode in modes:
            with open_world(bundle, mode, profile=profile, precision="fp32") as seg:
                runs = [run_clip(seg, c) for c in tqdm(clips, desc=f"{profile} {mode}", leave=False)]
            rows.append({"profile": profile, "mode": mode, **summarise(runs)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| profile | mode | still flicker % (mean / max) | flicker % (all clips) | stale frames after a cut | "
        "stale frames (all clips) | held frames (all clips) | frames to the right labels (mean / max) | mIoU with state | mIoU frame by frame |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cuts, still = r["kinds"].get("cuts", {}), r["kinds"].get("still", {})
        lines.append(
            f"| {r['profile']} | {r['mode']} | {still.get('steady_flicker_pct', 0):.2f} / "
            f"{still.get('steady_flicker_max_pct', 0):.2f} | {r['flicker_pct']:.2f} | "
            f"{cuts.get('stale_frames', 0)} of {cuts.get('frames', 0)} | {r['stale_frames']} of {r['frames']} | {r['held_frames']} | "
            f"{r['lag_mean']:.2f} / {r['lag_max']} | {r['miou_state']:.2f} | {r['miou_alone']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ovseg.benchmarks.synthetic.temporal", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, required=True, help="the bundle (unless --bundle) and results go here")
    p.add_argument("--bundle", type=Path, help="an exported world bundle (default: export one to OUT/bundle-gem)")
    p.add_argument("--scenes", type=int, default=6, help="scenes of the cut sequence; half as many clips per kind")
    p.add_argument("--frames", type=int, default=12, help="frames per clip (default 12)")
    p.add_argument("--profiles", choices=PROFILES, nargs="+", default=list(PROFILES))
    p.add_argument("--modes", choices=MODES, nargs="+", default=list(MODES))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or export_world_bundle(args.out / "bundle-gem", "gem")
    rows = measure(bundle, make_clips(args.scenes, args.frames), tuple(args.profiles), tuple(args.modes))
    (args.out / "temporal.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "temporal.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
