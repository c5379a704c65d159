"""Train the synthetic world's tiny CLIP contrastively on generated image-caption pairs, and write the fixture.

    python -m ovseg.benchmarks.synthetic.pretrain [--resume]

The fixture (``tiny_clip/``): the open_clip model config, the weights as fp16 safetensors, and ``training.json`` with
the command, steps, wall time and zero-shot top-1 on held-out single-object images (seen colour-shape combinations
and the combinations training never saw). Rows of the token embedding that no caption of the world uses keep only
their random initialisation; they are zeroed so the file compresses.

Captions that name the same things (in any order) are positives of each other in a batch (multi-positive targets),
not false negatives.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from .scenes import caption, render, sample_layout
from .world import HELD_OUT_OBJECTS, SEEN_OBJECTS, STUFF, colour_shape

FIXTURE = Path(__file__).resolve().parent / "tiny_clip"
CONFIG = FIXTURE / "synthetic-ViT-32.json"
MODEL = CONFIG.stem
WEIGHTS = FIXTURE / "weights.safetensors"
RECORD = FIXTURE / "training.json"
PROMPT = "a photo of a {}."
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
EVAL_SEED = 10_000  # layouts of the zero-shot sets; training uses --seed


def register() -> str:
    """Make open_clip know the tiny CLIP's architecture; returns its model name."""
    open_clip.add_model_config(CONFIG)
    return MODEL


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) normalised as CLIP's preprocessing does."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN) / STD


class CaptionedScenes(IterableDataset):
    """Endless batches of fresh scenes: images, captions, and a key per image, equal for captions naming the same
    things. The single-object part of a batch (``single``) comes in groups of one colour in every shape it is seen in:
    hard negatives, without which colour and floor alone tell most captions apart and shape is never learned. Half of
    those captions name the shape alone ("a photo of a circle on gravel."), as captions often leave attributes out:
    colour cannot match them, so the image tower must see shape (with colour-and-shape captions only, 1,000 steps
    learned colour perfectly and shape not at all)."""

    def __init__(self, batch: int, seed: int, single: float = 0.5, shape_only: float = 0.5):
        self.batch, self.seed, self.single, self.shape_only = batch, seed, single, shape_only

    def __iter__(self):
        torch.set_num_threads(1)
        rng = np.random.default_rng(self.seed)
        colours = sorted({colour_shape(n)[0] for n in SEEN_OBJECTS})
        count = int(self.batch * self.single)
        while True:
            singles: list[str] = []
            while len(singles) < count:
                colour = colours[int(rng.integers(len(colours)))]
                singles += [n for n in SEEN_OBJECTS if colour_shape(n)[0] == colour]
            layouts = [sample_layout(rng, objects=(1, 1), allowed=(n,)) for n in singles[:count]]
            layouts += [sample_layout(rng, objects=(2, 3), allowed=SEEN_OBJECTS) for _ in range(self.batch - count)]
            scenes = [render(layout, rng) for layout in layouts]
            captions = [s.caption for s in scenes]
            named = [tuple(sorted(s.names)) for s in scenes]
            for i, scene in enumerate(scenes[:count]):
                if rng.random() < self.shape_only:
                    shape = colour_shape(scene.names[0])[1]
                    captions[i] = caption([shape], scene.names[1])
                    named[i] = (shape, scene.names[1])
            yield to_tensor(np.stack([s.image for s in scenes])), captions, torch.tensor([hash(n) for n in named])


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    same = (keys[:, None] == keys[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def single_object_set(names: tuple[str, ...], count: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``count`` single-object images spread evenly over ``names``, on random floors; (images, class indices)."""
    rng, targets = np.random.default_rng(seed), np.arange(count) % len(names)
    images = [render(sample_layout(rng, objects=(1, 1), allowed=(names[k],))).image for k in targets]
    return to_tensor(np.stack(images)), targets


@torch.no_grad()
def zero_shot(model, tokenizer, images: torch.Tensor, targets: np.ndarray, names: tuple[str, ...]) -> float:
    """Top-1 of ``images`` over the prompts of ``names``."""
    model.eval()
    text = F.normalize(model.encode_text(tokenizer([PROMPT.format(n) for n in names])), dim=-1)
    image = F.normalize(torch.cat([model.encode_image(b) for b in images.split(64)]), dim=-1)
    model.train()
    return float(((image @ text.T).argmax(dim=1).numpy() == targets).mean())


@dataclass
class Record:
    command: str
    steps: int  # over every run (--resume continues the fixture)
    batch: int
    seed: int
    wall_seconds: float  # over every run
    seen_top1: float  # over the 20 seen colour-shape combinations
    held_out_top1: float  # over all 24 objects, images of the 4 combinations training never saw
    torch_threads: int
    runs: list[dict] = field(default_factory=list)  # each run's command, steps and wall seconds, oldest first


def previous_runs() -> list[dict]:
    """The runs that made the fixture (for --resume)."""
    record = json.loads(RECORD.read_text())
    return record.get("runs") or [{k: record[k] for k in ("command", "steps", "wall_seconds")}]


def used_token_rows(tokenizer) -> torch.Tensor:
    """Token ids of every caption and prompt the world can write."""
    words = {w.strip(".,") for n in (*SEEN_OBJECTS, *HELD_OUT_OBJECTS, *STUFF) for w in n.split()}
    words |= set("a photo of on and".split())
    ids = tokenizer([" ".join(sorted(words)) + ", ."])
    return torch.unique(ids)


def save_fixture(model, tokenizer, record: Record) -> None:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    embedding = state["token_embedding.weight"]
    keep = torch.zeros(embedding.shape[0], dtype=torch.bool)
    keep[used_token_rows(tokenizer)] = True
    embedding[~keep] = 0
    state = {k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}
    record_text = json.dumps(asdict(record), indent=2) + "\n"
    for path, write in ((WEIGHTS, lambda f: save_file(state, str(f))), (RECORD, lambda f: f.write_text(record_text))):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # each file whole or not replaced
        write(tmp)
        tmp.chmod(0o644)
        os.replace(tmp, path)


def load_fixture() -> open_clip.CLIP:
    """The tiny CLIP from the fixture, fp32, eval mode."""
    model = open_clip.create_model(register(), pretrained=None)
    model.load_state_dict({k: v.float() for k, v in load_file(str(WEIGHTS)).items()})
    return model.eval()


def train(steps: int, batch: int, seed: int, lr: float, eval_every: int, target: float, resume: bool = False) -> Record:
    """Up to ``steps`` steps; stops at the first evaluation whose zero-shot top-1 on seen objects reaches ``target``.
    ``resume``: start from the fixture's weights (a fresh warm-up and schedule; new scenes) and add to its record."""
    runs = previous_runs() if resume else []
    done = sum(r["steps"] for r in runs)
    torch.manual_seed(seed + done)
    name = register()
    model = load_fixture().train() if resume else open_clip.create_model(name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(name)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr)
    warmup = min(200, steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    seen = single_object_set(SEEN_OBJECTS, 240, EVAL_SEED)
    held = single_object_set(HELD_OUT_OBJECTS, 96, EVAL_SEED + 1)
    loader = DataLoader(CaptionedScenes(batch, seed + done), batch_size=None, num_workers=1)
    command = shlex.join(["python", "-m", "ovseg.benchmarks.synthetic.pretrain", *sys.argv[1:]])
    start = time.perf_counter()
    record = Record(command, 0, batch, seed, 0.0, 0.0, 0.0, torch.get_num_threads())
    before = sum(r["wall_seconds"] for r in runs)
    bar = tqdm(total=steps, desc="tiny CLIP", unit="step")
    model.train()
    for step, (images, captions, keys) in enumerate(loader):
        if step == steps:
            break
        image, text, scale = model(images, tokenizer(captions))[:3]
        loss = contrastive_loss(image, text, scale, keys)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            wall = round(time.perf_counter() - start, 1)
            record.steps, record.wall_seconds = done + step + 1, round(before + wall, 1)
            record.runs = [*runs, {"command": command, "steps": step + 1, "wall_seconds": wall}]
            record.seen_top1 = zero_shot(model, tokenizer, *seen, SEEN_OBJECTS)
            held_out = SEEN_OBJECTS + HELD_OUT_OBJECTS  # named among all 24
            record.held_out_top1 = zero_shot(model, tokenizer, held[0], held[1] + len(SEEN_OBJECTS), held_out)
            save_fixture(model, tokenizer, record)
            bar.write(
                f"step {step + 1}: zero-shot seen {record.seen_top1:.3f}, held-out combos {record.held_out_top1:.3f}"
            )
            if record.seen_top1 >= target:
                break
    bar.close()
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ovseg.benchmarks.synthetic.pretrain", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--target", type=float, default=0.95, help="stop once zero-shot top-1 on seen objects reaches it")
    p.add_argument("--resume", action="store_true", help="continue from the fixture's weights, adding to its record")
    args = p.parse_args(argv)
    record = train(args.steps, args.batch, args.seed, args.lr, args.eval_every, args.target, args.resume)
    print(json.dumps(asdict(record), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
