"""ovseg-train: PixelCLIP fine-tuning from the command line (run it under torchrun for several processes)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import typing

from ovseg.cli import run_cli
from ovseg.errors import OvsegError
from ovseg.export.errors import ExportError

from .data import MASK_SOURCES, CropConfig
from .engine import TrainConfig, train
from .model import FINETUNE

PROG = "ovseg-train"


# Flags named after TrainConfig's (T) and CropConfig's (C) fields (--prompt-words sets prompt_words), in --help's order;
# their defaults and types are the dataclasses' own, and a bool field (default False) is a switch.
T, C = TrainConfig, CropConfig
FLAGS = (
    (T, "data", "folder of images (recursively); SA-1B layout: IMAGE.jpg + IMAGE.json"),
    (T, "out", "output folder: checkpoint.pt, log.csv, config.json, the exported files"),
    (T, "annotations", "SA-1B JSONs under this folder at the images' relative paths (default: beside the images)"),
    (T, "masks", "sa1b: COCO RLE masks from IMAGE.json; dino: DINOv2 k-means masks made on the fly"),
    (T, "clip", "open_clip MODEL[:PRETRAINED] (default %(default)s)"),
    (T, "clip_weights", "local CLIP checkpoint to start from (as ovseg-export takes)"),
    (T, "random_weights", "random CLIP (and DINOv2) weights: a smoke test, not a model"),
    (T, "finetune", "attention: attention weights + position embedding (PixelCLIP ViT); full: the whole image encoder"),
    (T, "prompts", "learnable class prompts k (default %(default)s)"),
    (T, "prompt_words", "learnable tokens per prompt (default %(default)s)"),
    (T, "iters", "optimizer steps (default %(default)s)"),
    (T, "batch", "images per step over all processes (default %(default)s)"),
    (T, "lr", "base learning rate, the head's (default %(default)s); CLIP's and the prompts' are multiples of it"),
    (T, "lr_end", "learning rate at the end of the cosine (default %(default)s)"),
    (T, "warmup", "linear warm-up steps (default %(default)s, as PixelCLIP)"),
    (T, "clip_lr_mult", "CLIP's learning rate as a multiple of --lr (default %(default)s)"),
    (T, "prompt_lr_mult", "the prompts' learning rate as a multiple of --lr (default %(default)s)"),
    (T, "weight_decay", "AdamW weight decay, none on norm layers (default %(default)s)"),
    (T, "grad_clip", "max L2 norm of all gradients (default %(default)s)"),
    (T, "ema", "teacher momentum (default %(default)s)"),
    (C, "short_side", "images resized to this short side before cropping (default %(default)s)"),
    (C, "max_size", "cap on the long side after resizing (default %(default)s)"),
    (C, "crop", "square crop side (default %(default)s)"),
    (C, "clip_size", "CLIP input side for teacher and student (default %(default)s)"),
    (C, "mask_size", "mask and loss resolution (default %(default)s)"),
    (T, "dinov2", "DINOv2 for --masks dino, as ovseg-export takes it (default %(default)s)"),
    (T, "dino_size", "DINOv2 input side for --masks dino (default %(default)s)"),
    (T, "dino_clusters", "k-means clusters per image (default %(default)s)"),
    (T, "workers", "data loader processes per training process (default %(default)s)"),
    (T, "seed", "random seed (default %(default)s)"),
    (T, "save_every", "checkpoint every N steps (default %(default)s)"),
    (T, "resume", "continue OUT/checkpoint.pt"),
    (T, "force", "start over even if OUT/checkpoint.pt exists"),
    (T, "vocab", "vocabulary for the prompts' nearest names (preset or file; default %(default)s)"),
)
CHOICES = {"masks": MASK_SOURCES, "finetune": FINETUNE}


def _add_field(p: argparse.ArgumentParser, config: type, name: str, help: str) -> None:
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    hint = typing.get_type_hints(config)[name]
    flag = "--" + name.replace("_", "-")
    if hint is bool:
        p.add_argument(flag, action="store_true", help=help)
        return
    kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)  # Path | None -> Path
    required = field.default is dataclasses.MISSING
    p.add_argument(
        flag,
        type=kind,
        required=required,
        default=None if required else field.default,
        choices=CHOICES.get(name),
        help=help,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Fine-tune CLIP's image encoder from unlabelled masks (PixelCLIP). Writes OUT/student_visual.safetensors "
        "for `ovseg-export --clip-weights`, OUT/prompts.npy and OUT/prompt_names.json. Several GPUs: torchrun --nproc-per-node N $(which ovseg-train) ...",
    )
    for config, name, help in FLAGS:
        _add_field(p, config, name, help)
    p.add_argument("--no-strong-aug", action="store_true", help="the student sees the teacher's view (ablation)")
    p.add_argument("--no-hue", action="store_true", help="strong augmentation without hue jitter and grayscale")
    p.add_argument("--no-clustering", action="store_true", help="every mask its own target, no prompts (ablation)")
    p.add_argument("--frozen-prompts", action="store_true", help="the class prompts stay as initialised (ablation)")
    p.add_argument("--fp32", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--no-names", action="store_true", help="skip prompt_names.json")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    def given(config: type) -> dict:
        return {name: getattr(args, name) for c, name, _ in FLAGS if c is config}

    crop = CropConfig(**given(CropConfig), strong=not args.no_strong_aug, hue=not args.no_hue)
    return TrainConfig(
        **{**given(TrainConfig), "vocab": None if args.no_names else args.vocab},
        crop=crop,
        amp=not args.fp32,
        cluster=not args.no_clustering,
        learn_prompts=not args.frozen_prompts,
    )


def _one_line(error: Exception) -> str:
    """An error raised in a data-loader worker comes back as the same type wrapped in its traceback; keep the original
    message (the traceback's last line, after the type's name)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    marker = f"{type(error).__name__}: "
    return last.split(marker, 1)[1] if marker in last else last


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(PROG, functools.partial(run, args), aftermath="continue with --resume from the last checkpoint")


def run(args: argparse.Namespace) -> int:
    try:
        result = train(config_from_args(args))
    except OvsegError as e:
        raise ExportError(_one_line(e)) from e
    if "visual" in result.files:
        print(f"{PROG}: {result.steps} steps; export with: ovseg-export --clip-weights {result.files['visual']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
