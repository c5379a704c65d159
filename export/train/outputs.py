"""What training leaves for ovseg-export and for people: the student's visual weights in open_clip's key names,
the learned prompts' text embeddings, and each prompt's nearest class names in a vocabulary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ovseg.export.bundle import embed_names
from ovseg.export.clip import ClipTextEncoder
from ovseg.export.tokenizer import build_clip_tokenizer
from ovseg.runtime.pipeline.text import ClipTokenizer
from ovseg.runtime.pipeline.vocabulary import CONCEPT_TEMPLATES, DEFAULT_CONCEPTS, GUIDED_TEMPLATES, load_vocabulary

VISUAL_WEIGHTS = "student_visual.safetensors"
PROMPTS = "prompts.npy"
PROMPT_NAMES = "prompt_names.json"


def save_visual(visual: torch.nn.Module, path: Path) -> Path:
    """The visual tower as ``visual.*`` keys: ``ovseg-export --clip-weights PATH`` loads it (text tower from --clip)."""
    state = {f"visual.{k}": v.detach().float().cpu().contiguous() for k, v in visual.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "source": "ovseg-train"})
    os.chmod(tmp, 0o644)  # safetensors creates files readable by the owner only
    os.replace(tmp, path)
    return path


def nearest_names(clip: open_clip.CLIP, prompts: np.ndarray, vocab: str, top: int = 5, batch: int = 256) -> list[dict]:
    """For each learned prompt, the ``top`` closest names of ``vocab`` (embedded as ovseg-export does) with cosines."""
    names = load_vocabulary(vocab)
    templates = CONCEPT_TEMPLATES if vocab == DEFAULT_CONCEPTS else GUIDED_TEMPLATES
    tokenizer = ClipTokenizer(build_clip_tokenizer(), clip.context_length)
    table = embed_names(ClipTextEncoder(clip).eval(), tokenizer, names, templates, batch)
    cosines = prompts @ table.T
    best = np.argsort(-cosines, axis=1)[:, :top]
    return [
        {"prompt": i, "nearest": [{"name": names[j], "cosine": round(float(cosines[i, j]), 4)} for j in row]}
        for i, row in enumerate(best)
    ]


def write_outputs(
    out: Path, visual: torch.nn.Module, embeddings: torch.Tensor, clip: open_clip.CLIP, vocab: str | None, top: int
) -> dict[str, Path]:
    paths = {"visual": save_visual(visual, out / VISUAL_WEIGHTS), "prompts": out / PROMPTS}
    prompts = F.normalize(embeddings.detach().float().cpu(), dim=-1).numpy()  # (k, D) float32, no pickle
    np.save(paths["prompts"], prompts, allow_pickle=False)
    if vocab:
        paths["names"] = out / PROMPT_NAMES
        table = {"vocabulary": vocab, "prompts": nearest_names(clip, prompts, vocab, top)}
        paths["names"].write_text(json.dumps(table, indent=1) + "\n")
    return paths
