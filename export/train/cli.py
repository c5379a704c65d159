"""ovseg-train: PixelCLIP fine-tuning from the command line (run it under torchrun for several processes)."""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from ovseg.cli import run_cli
from ovseg.errors import OvsegError
from ovseg.export.clip import DEFAULT_CLIP

from .data import MASK_SOURCES, CropConfig, TrainError
from .engine import TrainConfig, train
from .model import FINETUNE

PROG = "ovseg-train"


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(data=Path("."), out=Path("."))
    c = CropConfig()
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Fine-tune CLIP's image encoder from unlabelled masks (PixelCLIP). Writes OUT/student_visual.safetensors "
        "for `ovseg-export --clip-weights`, OUT/prompts.npy and OUT/prompt_names.json. Several GPUs: torchrun --nproc-per-node N $(which ovseg-train) ...",
    )
    p.add_argument("--data", type=Path, required=True, help="folder of images (recursively); SA-1B layout: IMAGE.jpg + IMAGE.json")
    p.add_argument("--out", type=Path, required=True, help="output folder: checkpoint.pt, log.csv, config.json, the exported files")
    p.add_argument("--annotations", type=Path, help="SA-1B JSONs under this folder at the images' relative paths (default: beside the images)")
    p.add_argument("--masks", choices=MASK_SOURCES, default=d.masks, help="sa1b: COCO RLE masks from IMAGE.json; dino: DINOv2 k-means masks made on the fly")
    p.add_argument("--clip", default=DEFAULT_CLIP, help=f"open_clip MODEL[:PRETRAINED] (default {DEFAULT_CLIP})")
    p.add_argument("--clip-weights", type=Path, help="local CLIP checkpoint to start from (as ovseg-export takes)")
    p.add_argument("--random-weights", action="store_true", help="random CLIP (and DINOv2) weights: a smoke test, not a model")
    p.add_argument("--finetune", choices=FINETUNE, default=d.finetune, help="attention: attention weights + position embedding (PixelCLIP ViT); full: the whole image encoder")
    p.add_argument("--prompts", type=int, default=d.prompts, help="learnable class prompts k (default %(default)s)")
    p.add_argument("--prompt-words", type=int, default=d.prompt_words, help="learnable tokens per prompt (default %(default)s)")
    p.add_argument("--iters", type=int, default=d.iters, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch", type=int, default=d.batch, help="images per step over all processes (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="base learning rate (head); CLIP x%s, prompts x%s" % (d.clip_lr_mult, d.prompt_lr_mult))
    p.add_argument("--lr-end", type=float, default=d.lr_end, help="learning rate at the end of the cosine (default %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps (default %(default)s, as PixelCLIP)")
    p.add_argument("--clip-lr-mult", type=float, default=d.clip_lr_mult)
    p.add_argument("--prompt-lr-mult", type=float, default=d.prompt_lr_mult)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max L2 norm of all gradients (default %(default)s)")
    p.add_argument("--ema", type=float, default=d.ema, help="teacher momentum (default %(default)s)")
    p.add_argument("--short-side", type=int, default=c.short_side, help="images resized to this short side before cropping (default %(default)s)")
    p.add_argument("--max-size", type=int, default=c.max_size, help="cap on the long side after resizing (default %(default)s)")
    p.add_argument("--crop", type=int, default=c.crop, help="square crop side (default %(default)s)")
    p.add_argument("--clip-size", type=int, default=c.clip_size, help="CLIP input side for teacher and student (default %(default)s)")
    p.add_argument("--mask-size", type=int, default=c.mask_size, help="mask and loss resolution (default %(default)s)")
    p.add_argument("--no-strong-aug", action="store_true", help="the student sees the teacher's view (ablation)")
    p.add_argument("--dinov2", default=d.dinov2, help="DINOv2 for --masks dino, as ovseg-export takes it (default %(default)s)")
    p.add_argument("--dino-size", type=int, default=d.dino_size, help="DINOv2 input side for --masks dino (default %(default)s)")
    p.add_argument("--dino-clusters", type=int, default=d.dino_clusters, help="k-means clusters per image (default %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="data loader processes per training process (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--fp32", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt")
    p.add_argument("--force", action="store_true", help="start over even if OUT/checkpoint.pt exists")
    p.add_argument("--vocab", default=d.vocab, help="vocabulary for the prompts' nearest names (preset or file; default %(default)s)")
    p.add_argument("--no-names", action="store_true", help="skip prompt_names.json")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    crop = CropConfig(
        short_side=args.short_side, max_size=args.max_size, crop=args.crop, clip_size=args.clip_size,
        mask_size=args.mask_size, strong=not args.no_strong_aug,
    )
    return TrainConfig(
        data=args.data, out=args.out, annotations=args.annotations, masks=args.masks, clip=args.clip, clip_weights=args.clip_weights,
        random_weights=args.random_weights, finetune=args.finetune, prompts=args.prompts, prompt_words=args.prompt_words,
        iters=args.iters, batch=args.batch, lr=args.lr, lr_end=args.lr_end, warmup=args.warmup,
        clip_lr_mult=args.clip_lr_mult, prompt_lr_mult=args.prompt_lr_mult, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, ema=args.ema, crop=crop, dinov2=args.dinov2, dino_size=args.dino_size,
        dino_clusters=args.dino_clusters, workers=args.workers, seed=args.seed, amp=not args.fp32,
        save_every=args.save_every, resume=args.resume, force=args.force, vocab=None if args.no_names else args.vocab,
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
        raise TrainError(_one_line(e)) from e
    if "visual" in result.files:
        print(f"{PROG}: {result.steps} steps; export with: ovseg-export --clip-weights {result.files['visual']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
