"""Label lookup: the vocabulary's text embeddings, searched exactly or with HNSW, and how new names get embedded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hnswlib
import numpy as np

from ovseg.constants import HNSW_PARAMS, LOOKUPS
from ovseg.errors import SegmenterError, one_line

from ..bundle.integrity import BundleError, read_names
from ..bundle.manifest import VocabularyInfo
from ..engines.sessions import OnnxEncoder
from .text import ClipTokenizer
from .vocabulary import prompts_for

EXACT_MAX = 5000  # lookup="auto" searches exactly up to here: docs/DESIGN.md, "Lookup: exact vs HNSW", has the sweep


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


@dataclass
class Matches:
    """The top-k labels of each query, best first."""

    index: np.ndarray  # (Q, k) int64 vocabulary indices
    score: np.ndarray  # (Q, k) float32 cosine similarities


class LabelIndex:
    """Names and their L2-normalised text embeddings, searched by cosine: exact product or an hnswlib index."""

    def __init__(
        self,
        names: list[str],
        embeddings: np.ndarray,
        method: str = "auto",
        hnsw: hnswlib.Index | None = None,
        hnsw_params: dict[str, int] | None = None,
        ef: int | None = None,
    ):
        if method not in LOOKUPS:
            raise SegmenterError(f"unknown lookup {method!r}: choose one of {', '.join(LOOKUPS)}")
        if len(names) == 0 or len(names) != len(embeddings):
            raise SegmenterError(
                f"a vocabulary needs names and one embedding each, got {len(names)} names and {len(embeddings)} embeddings"
            )
        self.names = list(names)
        self.embeddings = np.ascontiguousarray(embeddings, np.float32)
        self.requested = method
        self.method = method if method != "auto" else ("exact" if len(names) <= EXACT_MAX else "hnsw")
        self.params = {**HNSW_PARAMS, **(hnsw_params or {})}
        if ef is not None:
            self.params["ef"] = ef
        self.hnsw = None
        if self.method == "hnsw":
            self.hnsw = hnsw if hnsw is not None else self._build()
            self.hnsw.set_ef(max(1, int(self.params["ef"])))

    @classmethod
    def from_bundle(
        cls, bundle_dir: Path, info: VocabularyInfo, method: str = "auto", ef: int | None = None
    ) -> LabelIndex:
        """The bundle's vocabulary; its files were checked whole by read_manifest, what still fails here is one line."""
        try:
            names = read_names(bundle_dir / info.names, info.size)
            embeddings = np.load(bundle_dir / info.embeddings["fp32"], allow_pickle=False)
            wants_hnsw = method == "hnsw" or (method == "auto" and len(names) > EXACT_MAX)
            index = None
            if wants_hnsw and info.hnsw:
                index = hnswlib.Index(space="cosine", dim=embeddings.shape[1])
                index.load_index(str(bundle_dir / info.hnsw), max_elements=len(names))
        except BundleError as e:
            raise SegmenterError(str(e)) from None
        except (OSError, ValueError, RuntimeError, KeyError, IndexError) as e:  # numpy's and hnswlib's own errors
            raise SegmenterError(
                f"the vocabulary of {bundle_dir} cannot be read ({one_line(e)}): re-export the bundle "
                "with `ovseg-export --force`"
            ) from None
        return cls(names, embeddings, method, index, info.hnsw_params, ef)

    def _build(self) -> hnswlib.Index:
        index = hnswlib.Index(space="cosine", dim=self.embeddings.shape[1])
        index.init_index(
            max_elements=len(self.names),
            ef_construction=self.params["ef_construction"],
            M=self.params["M"],
            random_seed=0,
        )
        index.add_items(self.embeddings, np.arange(len(self.names)))
        return index

    def __len__(self) -> int:
        return len(self.names)

    def search(self, queries: np.ndarray, k: int) -> Matches:
        """Top-``k`` labels of L2-normalised ``queries`` (Q, D); k is capped at the vocabulary size."""
        k = min(k, len(self.names))
        if self.hnsw is not None:  # hnswlib searches with max(ef, k): ef is the index's for every call
            labels, distances = self.hnsw.knn_query(queries, k=k, num_threads=1)
            return Matches(labels.astype(np.int64), (1.0 - distances).astype(np.float32))
        scores = queries @ self.embeddings.T
        top = (
            np.argpartition(-scores, k - 1, axis=1)[:, :k]
            if k < scores.shape[1]
            else np.tile(np.arange(k), (len(scores), 1))
        )
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return Matches(
            np.take_along_axis(top, order, axis=1).astype(np.int64), np.take_along_axis(top_scores, order, axis=1)
        )

    def score(self, queries: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Cosine of each query with one given label each."""
        return np.einsum("qd,qd->q", queries, self.embeddings[labels]).astype(np.float32)


class PromptEmbedder:
    """Class names -> prompt-ensembled text embeddings with the bundle's ONNX text encoder and tokenizer.

    Each prompt's embedding is L2-normalised, the templates of a name averaged, the mean L2-normalised
    (open_clip's zero-shot classifier; the export side's ``embed_names`` gives the same numbers).
    """

    def __init__(self, encoder: OnnxEncoder, tokenizer: ClipTokenizer, batch: int = 256):
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.batch = batch

    def __call__(self, names: list[str], templates: list[str]) -> np.ndarray:
        per_batch = max(1, self.batch // len(templates))
        chunks = []
        for start in range(0, len(names), per_batch):
            chunk = names[start : start + per_batch]
            prompts = [p for name in chunk for p in prompts_for(name, templates)]
            (emb,) = self.encoder.run(self.tokenizer(prompts)).values()
            emb = l2_normalise(emb).reshape(len(chunk), len(templates), -1).mean(axis=1)
            chunks.append(l2_normalise(emb))
        return np.concatenate(chunks)
