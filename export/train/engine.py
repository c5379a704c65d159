"""The training loop: AdamW with PixelCLIP's learning rates, warm-up + cosine schedule, gradient clipping, AMP on
CUDA, DDP under torchrun (NCCL on GPUs, gloo on CPUs), checkpoints that resume exactly, a CSV log and a progress bar."""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import open_clip
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ovseg.constants import DEFAULT_CLIP, DEFAULT_DINOV2
from ovseg.export.clip import CLIP_MEAN, CLIP_STD, load_clip
from ovseg.export.dinov2 import load_dinov2
from ovseg.export.errors import ExportError

from .data import Batch, CropConfig, DinoMasker, InfiniteDraws, MaskDataset, collate, find_images
from .losses import cluster_targets, mask_loss, own_targets, pooled_masks
from .model import ClassPrompts, ConvHead, DenseClip, Student, ema_update, make_teacher, set_trainable
from .outputs import write_outputs

CHECKPOINT = "checkpoint.pt"
LOG = "log.csv"
CHECKPOINT_FORMAT = "ovseg-train/1"
WARMUP_START = 0.001  # detectron2's WARMUP_FACTOR default: the first warm-up step runs at lr x 0.001
# Settings a resumed run must share with the checkpoint (the rest, e.g. --iters or --workers, may change).
RESUME_KEYS = ("clip", "finetune", "prompts", "prompt_words", "masks", "batch", "seed", "cluster", "learn_prompts")


@dataclass
class TrainConfig:
    data: Path
    out: Path
    masks: str = "sa1b"  # "sa1b": IMAGE.json beside each image; "dino": DINOv2 k-means masks on the fly
    annotations: Path | None = None  # SA-1B JSONs in a tree mirroring data/ instead of beside the images
    clip: str = DEFAULT_CLIP
    clip_weights: Path | None = None
    random_weights: bool = False
    finetune: str = "attention"  # PixelCLIP's ViT setting; "full" trains the whole image encoder
    prompts: int = 64  # k learnable class prompts
    prompt_words: int = 4  # learnable tokens per prompt
    iters: int = 10_000
    batch: int = 48  # images per step over all processes
    lr: float = 2e-4
    lr_end: float = 1e-4  # cosine from lr down to lr_end
    warmup: int = 0  # PixelCLIP's config sets WARMUP_ITERS 0
    clip_lr_mult: float = 0.01
    prompt_lr_mult: float = 10.0
    weight_decay: float = 1e-4  # none on LayerNorm / GroupNorm parameters (detectron2's WEIGHT_DECAY_NORM 0)
    grad_clip: float = 0.01  # L2 norm over all trained parameters
    ema: float = 0.999  # 0: no momentum teacher (the teacher is the student of the step)
    cluster: bool = True  # False: no semantic clustering (every mask its own target, against its pooled feature)
    learn_prompts: bool = True  # False: the prompts stay as initialised
    logit_scale: float = 100.0  # mask-to-prompt cosine scale before Sinkhorn (PixelCLIP's EPS for ViT)
    sinkhorn_iters: int = 3
    crop: CropConfig = field(default_factory=CropConfig)
    dinov2: str = DEFAULT_DINOV2
    dino_size: int = 448
    dino_clusters: int = 16
    kmeans_iters: int = 10
    workers: int = 4
    seed: int = 0
    amp: bool = True  # CUDA only: bf16 where supported, else fp16 with loss scaling
    save_every: int = 1000
    resume: bool = False
    force: bool = False
    vocab: str | None = "concepts"  # for prompt_names.json; None skips it
    names_top: int = 5

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str, indent=1)


@dataclass
class TrainResult:
    steps: int  # the step count reached
    losses: list[float]  # per step of this run, averaged over processes
    files: dict[str, Path]  # checkpoint, log, and (rank 0) the exported outputs
    student: Student  # the trained module (its dense.visual is the CLIP model's own visual tower)
    teacher: DenseClip


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """detectron2's WarmupCosineLR as PixelCLIP configures it: cosine from 1 to lr_end / lr over iters, linear warm-up."""
    end = cfg.lr_end / cfg.lr
    factor = end + (1 - end) * 0.5 * (1 + math.cos(math.pi * step / cfg.iters))
    if step < cfg.warmup:
        factor *= WARMUP_START + (1 - WARMUP_START) * step / cfg.warmup
    return factor


def param_groups(student: Student, cfg: TrainConfig) -> list[dict]:
    """CLIP at lr x 0.01, prompts at lr x 10, the head at lr; no weight decay on normalisation layers."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for module_name, module in student.named_modules():
        for _, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            role = "clip" if module_name.startswith("dense.") else "prompts" if module_name == "prompts" else "head"
            decay = not isinstance(module, (nn.LayerNorm, nn.GroupNorm))
            groups.setdefault((role, decay), []).append(p)
    mult = {"clip": cfg.clip_lr_mult, "prompts": cfg.prompt_lr_mult, "head": 1.0}
    return [
        {
            "params": ps,
            "name": f"{role}{'' if decay else '_no_decay'}",
            "base_lr": cfg.lr * mult[role],
            "lr": cfg.lr * mult[role],
            "weight_decay": cfg.weight_decay if decay else 0.0,
        }
        for (role, decay), ps in groups.items()
    ]


def _init_distributed() -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, whether this call initialised the process group) from torchrun's variables."""
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1:
        return 0, 1, 0, False
    owns = not dist.is_initialized()
    if owns:
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), local, owns


def _mean_over_ranks(value: torch.Tensor, world: int) -> float:
    value = value.detach().float().reshape(1).clone()
    if world > 1:
        dist.all_reduce(value)
    return value.item() / world


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _check_out_dir(cfg: TrainConfig) -> Path | None:
    ckpt = cfg.out / CHECKPOINT
    if cfg.resume:
        if not ckpt.is_file():
            raise ExportError(f"--resume: no {ckpt} to resume from")
        return ckpt
    if ckpt.exists() and not cfg.force:
        raise ExportError(f"{ckpt} exists: pass --resume to continue it or --force to start over")
    return None


def _load_resume(path: Path, cfg: TrainConfig) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"--resume: {path} is not a readable ovseg-train checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ExportError(f"--resume: {path} is not an {CHECKPOINT_FORMAT} checkpoint")
    saved = json.loads(state["config"])
    now = json.loads(cfg.to_json())
    # a key the checkpoint lacks was added since it was written: its run had the default
    differ = [k for k in RESUME_KEYS if saved.get(k, getattr(TrainConfig, k, None)) != now.get(k)]
    if differ:
        raise ExportError(
            f"--resume: {path} was trained with other settings: "
            + ", ".join(f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in differ)
        )
    return state


def train(cfg: TrainConfig, clip_model: open_clip.CLIP | None = None, dinov2_model=None) -> TrainResult:
    """Train; models may be injected (tests), otherwise they are loaded as ovseg-export loads them (no hub access
    beyond load_clip / load_dinov2)."""
    cfg.out = Path(cfg.out)
    if cfg.iters < 1 or cfg.prompts < 1 or cfg.batch < 1:
        raise ExportError("--iters, --prompts and --batch must be positive")
    resume_path = _check_out_dir(cfg)
    rank, world, local, owns_group = _init_distributed()
    try:
        return _train(cfg, clip_model, dinov2_model, rank, world, local, resume_path)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _train(cfg, clip_model, dinov2_model, rank: int, world: int, local: int, resume_path: Path | None) -> TrainResult:
    if cfg.batch % world:
        raise ExportError(f"--batch {cfg.batch} does not split over {world} processes")
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # PixelCLIP: float32 matmul precision "high"
    images = find_images(Path(cfg.data), cfg.masks, cfg.annotations and Path(cfg.annotations))
    clip_model, student, teacher = _models(cfg, clip_model, device)
    optimizer = torch.optim.AdamW(param_groups(student, cfg), lr=cfg.lr)
    autocast, scaler = _mixed_precision(cfg.amp and device.type == "cuda", device)
    start = 0 if resume_path is None else _restore(_load_resume(resume_path, cfg), student, teacher, optimizer, scaler)
    if start >= cfg.iters:
        raise ExportError(f"the checkpoint is at step {start}: raise --iters above it to train further")

    loader, masker = _data(cfg, images, rank, world, start, dinov2_model, device)
    model = student
    if world > 1:
        model = DistributedDataParallel(student, device_ids=[local] if device.type == "cuda" else None)
    files = {"checkpoint": cfg.out / CHECKPOINT, "log": cfg.out / LOG}
    if rank == 0:
        _start_files(cfg, files["log"], start)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    losses: list[float] = []
    bar = tqdm(total=cfg.iters, initial=start, desc="ovseg-train", unit="step", disable=rank != 0, dynamic_ncols=True)
    batches = iter(loader)
    for step in range(start, cfg.iters):
        tick = time.perf_counter()
        batch: Batch = next(batches).to(device)
        factor = lr_factor(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        masks = batch.masks if masker is None else masker(batch.dino, batch.keep)

        ema_update(teacher.visual, student.dense.visual, cfg.ema)
        with torch.no_grad(), autocast():
            teacher_features = teacher.dense((batch.teacher.float() / 255 - mean) / std)
        mask_features = None if cfg.cluster else pooled_masks(masks, teacher_features.float())
        with autocast():
            logits, embeddings = model((batch.student.float() / 255 - mean) / std, mask_features)
        if cfg.cluster:
            targets = cluster_targets(
                masks, teacher_features.float(), embeddings.detach().float(), cfg.logit_scale, cfg.sinkhorn_iters
            )
        else:
            targets = own_targets(masks)
        loss = mask_loss(logits.float(), targets.targets)

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)  # the frozen ones have no gradient
        scaler.step(optimizer)
        scaler.update()

        losses.append(_mean_over_ranks(loss, world))
        if rank == 0:  # lr: the base (head) rate; CLIP and prompts scale it
            row = f"{losses[-1]:.6f},{cfg.lr * factor:.3e},{len(targets.assignment)},{targets.clusters_used}"
            with files["log"].open("a") as f:
                f.write(f"{step + 1},{row},{time.perf_counter() - tick:.3f}\n")
            bar.set_postfix(loss=f"{losses[-1]:.4f}", clusters=targets.clusters_used)
            bar.update(1)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.iters:
                _save_atomic(_checkpoint(step + 1, cfg, student, teacher, optimizer, scaler), files["checkpoint"])
    bar.close()

    if rank == 0:
        student.eval()
        with torch.no_grad():
            embeddings = student.prompts()
        files.update(write_outputs(cfg.out, student.dense.visual, embeddings, clip_model, cfg.vocab, cfg.names_top))
    if world > 1:
        dist.barrier()
    return TrainResult(cfg.iters, losses, files, student, teacher)


def _mixed_precision(amp: bool, device: torch.device) -> tuple[Callable, torch.amp.GradScaler]:
    """The autocast of each forward and the gradient scaler: bf16 where CUDA has it, else fp16 with loss scaling."""
    dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    autocast = functools.partial(torch.autocast, device.type, dtype, enabled=amp)
    return autocast, torch.amp.GradScaler("cuda", enabled=amp and dtype == torch.float16)


def _start_files(cfg: TrainConfig, log: Path, start: int) -> None:
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "config.json").write_text(cfg.to_json() + "\n")
    if start == 0:
        log.write_text("step,loss,lr,masks,clusters,seconds\n")


def _models(cfg: TrainConfig, clip_model: open_clip.CLIP | None, device: torch.device):
    """CLIP (loaded unless given) frozen but for the trained part of its image tower, the student and its teacher."""
    if clip_model is None:
        clip_model, _ = load_clip(cfg.clip, cfg.clip_weights, cfg.random_weights)
    set_trainable(clip_model.requires_grad_(False).visual, cfg.finetune)
    torch.manual_seed(cfg.seed)
    dense = DenseClip(clip_model.visual, cfg.crop.clip_size, "pixelclip")
    teacher = make_teacher(dense)
    prompts = ClassPrompts(clip_model, cfg.prompts, cfg.prompt_words, cfg.seed)
    prompts.tokens.requires_grad_(cfg.learn_prompts and cfg.cluster)
    student = Student(dense, prompts, ConvHead(), cfg.crop.mask_size)
    return clip_model, student.to(device).train(), teacher.to(device)


def _data(
    cfg: TrainConfig, items, rank: int, world: int, start: int, dinov2_model, device: torch.device
) -> tuple[DataLoader, DinoMasker | None]:
    """This rank's endless loader, resumed after ``start`` steps, and the DINOv2 masker when masks are made on the fly."""
    masker, crop = None, cfg.crop
    if cfg.masks == "dino":
        crop = CropConfig(**{**asdict(cfg.crop), "dino_size": cfg.dino_size})
        if dinov2_model is None:
            dinov2_model, _ = load_dinov2(cfg.dinov2, cfg.random_weights)
        masker = DinoMasker(
            dinov2_model, cfg.dino_size, cfg.dino_clusters, cfg.crop.mask_size, cfg.kmeans_iters, cfg.seed
        ).to(device)
    per_rank = cfg.batch // world
    dataset = MaskDataset(items, cfg.masks, crop, cfg.seed)
    loader = DataLoader(
        dataset,
        batch_size=per_rank,
        sampler=InfiniteDraws(len(dataset), rank, world, cfg.seed, skip=start * per_rank),
        num_workers=cfg.workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
    )
    return loader, masker


def _checkpoint(step: int, cfg: TrainConfig, student: Student, teacher: DenseClip, optimizer, scaler) -> dict:
    """Tensors and plain values only (torch.load(weights_only=True) reads it); "student" holds open_clip's
    ``visual.*`` keys, so ovseg-export --clip-weights also takes this file."""

    def visual(v):
        return {f"visual.{k}": t.detach().cpu() for k, t in v.state_dict().items()}

    return {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "config": cfg.to_json(),
        "student": visual(student.dense.visual),
        "teacher": visual(teacher.visual),
        "prompt_tokens": student.prompts.tokens.detach().cpu(),
        "head": {k: t.detach().cpu() for k, t in student.head.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
    }


def _restore(state: dict, student: Student, teacher: DenseClip, optimizer, scaler) -> int:
    """Load a checkpoint's state into the run; returns its step."""

    def strip(d):
        return {k.removeprefix("visual."): v for k, v in d.items()}

    try:
        student.dense.visual.load_state_dict(strip(state["student"]))
        teacher.visual.load_state_dict(strip(state["teacher"]))
        with torch.no_grad():
            student.prompts.tokens.copy_(state["prompt_tokens"])
        student.head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        return int(state["step"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise ExportError(
            f"--resume: the checkpoint does not fit this model ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        ) from None
