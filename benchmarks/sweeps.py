"""Sweeps that need more than the main bundle: vocabulary size (exact vs HNSW) and input size (one bundle per size).

Both cache what is slow to build in the directory they are given (ovseg-bench: ``--cache``, default
``$OVSEG_HOME/bench``): the phrase embeddings and HNSW indexes of the vocabulary sweep, and random-weights bundles of
the main bundle's architectures at each input size. Delete the directory to rebuild.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hnswlib
import numpy as np

from ovseg.constants import HNSW_PARAMS
from ovseg.runtime.bundle.manifest import ENCODER_NAMES, BundleError, Manifest, describe_sizes, read_manifest
from ovseg.runtime.pipeline.lookup import LabelIndex, l2_normalise

from .phrases import MODEL, QUERY_TEMPLATE, PhraseEmbedder, phrases, to_clip_width
from .timing import Budget, Stats, repeat

DIM = 512  # CLIP ViT-B text embedding width
QUERIES_PER_FRAME = 15  # TAG's K segments
TOP_K = 3  # the Segmenter's default top_k
RECALL_QUERIES = 300  # recall@1 is a mean over these
LARGE = 100_000  # from this size on the index is built with LARGE_HNSW (2 cores: the defaults take too long at 1M)
LARGE_HNSW = {"M": 16, "ef_construction": 100}


# ---- vocabulary size -------------------------------------------------------------------------------------------


@dataclass
class VocabPoint:
    """Lookup of one frame's segments in a vocabulary of ``size`` phrase embeddings (benchmarks.phrases)."""

    size: int
    hnsw_params: dict[str, int]  # M, ef_construction the index was built with
    build_s: float | None  # None: loaded from the cache
    exact: Stats  # ms per frame (QUERIES_PER_FRAME queries, top-TOP_K)
    hnsw: dict[int, Stats]  # ef -> ms per frame
    recall: dict[int, float]  # ef -> recall@1 against exact, queries "a photo of a <entry>." of random entries


@dataclass
class VocabSweep:
    dim: int
    queries_per_frame: int
    top_k: int
    default_ef: int
    points: list[VocabPoint]
    crossover: float | None  # vocabulary size where HNSW (default ef) becomes faster than exact, by median times
    crossover_note: str
    crossover_fastest: float | None  # the same by the fastest run of each (least distorted on a busy machine)
    crossover_fastest_note: str
    notes: list[str] = field(default_factory=list)


def exact_top1(vocab: np.ndarray, queries: np.ndarray, chunk: int = 200_000) -> np.ndarray:
    best = np.full(len(queries), -np.inf, np.float32)
    arg = np.zeros(len(queries), np.int64)
    for start in range(0, len(vocab), chunk):
        scores = queries @ vocab[start : start + chunk].T
        j = scores.argmax(axis=1)
        s = scores[np.arange(len(queries)), j]
        better = s > best
        best[better], arg[better] = s[better], j[better] + start
    return arg


def cached_hnsw(
    vocab: np.ndarray, params: dict[str, int], source: str, cache: Path, threads: int, say
) -> tuple[hnswlib.Index, float | None]:
    """The hnswlib index of ``vocab`` (the first len(vocab) of ``source``): loaded from ``cache``, or built and cached there."""
    path = cache / f"hnsw-{source}-v{len(vocab)}-d{vocab.shape[1]}-M{params['M']}-efc{params['ef_construction']}.bin"
    index = hnswlib.Index(space="cosine", dim=vocab.shape[1])
    if path.is_file():
        try:
            index.load_index(str(path), max_elements=len(vocab))
            if index.get_current_count() == len(vocab):
                return index, None
        except RuntimeError:
            pass
        index = hnswlib.Index(space="cosine", dim=vocab.shape[1])
    say(
        f"building an HNSW index of {len(vocab):,} vectors (M={params['M']}, ef_construction={params['ef_construction']}); "
        f"cached in {path.parent}"
    )
    start = time.perf_counter()
    index.init_index(max_elements=len(vocab), M=params["M"], ef_construction=params["ef_construction"], random_seed=0)
    index.add_items(vocab, np.arange(len(vocab)), num_threads=threads)
    built = time.perf_counter() - start
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    index.save_index(str(tmp))
    os.replace(tmp, path)
    return index, built


def sweep_vocabulary(
    sizes: list[int], efs: list[int], budget: Budget, threads: int, cache: Path, say, seed: int = 0
) -> VocabSweep:
    default_ef = HNSW_PARAMS["ef"]
    efs = sorted(set(efs) | {default_ef})
    embedder = PhraseEmbedder(cache)
    all_names = phrases(max(sizes))  # every size is a prefix of the largest
    largest = l2_normalise(to_clip_width(embedder.vocabulary(all_names, say), DIM))
    points = []
    for size in sizes:
        vocab, names = largest[:size], all_names[:size]
        picked = np.random.default_rng(seed + size).choice(size, RECALL_QUERIES, replace=size < RECALL_QUERIES)
        queries = l2_normalise(to_clip_width(embedder([QUERY_TEMPLATE.format(names[i]) for i in picked]), DIM))
        truth = exact_top1(vocab, queries)
        params = dict(LARGE_HNSW) if size >= LARGE else {k: HNSW_PARAMS[k] for k in ("M", "ef_construction")}
        index, build_s = cached_hnsw(vocab, params, embedder.cache.name, cache, threads, say)
        exact = LabelIndex(names, vocab, "exact")
        approx = LabelIndex(names, vocab, "hnsw", hnsw=index, hnsw_params=params, ef=default_ef)
        frames = [queries[i : i + QUERIES_PER_FRAME] for i in range(0, RECALL_QUERIES, QUERIES_PER_FRAME)]
        searches = {"exact": functools.partial(exact.search, k=TOP_K)} | {ef: _at_ef(approx, ef) for ef in efs}
        timed = _time_interleaved(searches, frames, budget)
        exact_ms, hnsw_ms = timed.pop("exact"), timed
        recall = {}
        for ef in efs:
            approx.hnsw.set_ef(ef)
            recall[ef] = float(np.mean(approx.search(queries, TOP_K).index[:, 0] == truth))
        points.append(
            VocabPoint(size, params, None if build_s is None else round(build_s, 1), exact_ms, hnsw_ms, recall)
        )
        say(
            f"vocabulary {size:>9,}: exact {exact_ms.p50:.3f} ms, HNSW(ef={default_ef}) {hnsw_ms[default_ef].p50:.3f} ms, "
            f"recall@1 {recall[default_ef]:.3f}"
        )
        del vocab, index, exact, approx
    crossover, note = _crossover(points, default_ef)
    fastest, fastest_note = _crossover(points, default_ef, "min")
    notes = [
        f"vocabulary: {MODEL} embeddings of the concept list's names, then of '<attribute> <concept>' phrases, mapped "
        f"isometrically to D={DIM} (benchmarks/phrases.py); queries: '{QUERY_TEMPLATE.format('<entry>')}' for "
        f"{RECALL_QUERIES} random entries, {QUERIES_PER_FRAME} per frame, top-{TOP_K}, one search thread (as the runtime); "
        "exact and every ef run on each frame in turn",
        f"indexes below {LARGE:,} use the runtime's defaults (M={HNSW_PARAMS['M']}, ef_construction="
        f"{HNSW_PARAMS['ef_construction']}); from {LARGE:,} on M={LARGE_HNSW['M']}, ef_construction="
        f"{LARGE_HNSW['ef_construction']} (building the defaults at 1M takes too long on this machine)",
        "recall@1 is HNSW's top entry against the exact one; these queries are text, so they sit closer to their "
        "entries than CLIP segment embeddings do to their labels",
    ]
    return VocabSweep(DIM, QUERIES_PER_FRAME, TOP_K, default_ef, points, crossover, note, fastest, fastest_note, notes)


def _at_ef(index: LabelIndex, ef: int):
    def search(q: np.ndarray):
        index.hnsw.set_ef(ef)
        return index.search(q, TOP_K)

    return search


def _time_interleaved(searches: dict, frames: list[np.ndarray], budget: Budget) -> dict:
    """ms per frame of each search, all run on every frame in turn so that they share the machine's load alike."""
    samples: dict = {key: [] for key in searches}

    def call(i: int) -> None:
        q = frames[i % len(frames)]
        for key, search in searches.items():
            start = time.perf_counter()
            search(q)
            if i >= budget.warmup:
                samples[key].append((time.perf_counter() - start) * 1000)

    repeat(call, budget)
    return {key: Stats.of(v) for key, v in samples.items()}


def _crossover(points: list[VocabPoint], ef: int, stat: str = "p50") -> tuple[float | None, str]:
    """Where log(exact / hnsw) of ``stat`` times crosses zero, interpolated linearly in log(size) between measured sizes."""
    logs = [(np.log(p.size), np.log(getattr(p.exact, stat) / getattr(p.hnsw[ef], stat))) for p in points]
    by = "median" if stat == "p50" else "fastest"
    for (x0, y0), (x1, y1) in zip(logs, logs[1:]):
        if y0 <= 0 < y1:
            at = float(np.exp(x0 - y0 * (x1 - x0) / (y1 - y0)))
            return at, (
                f"by {by} times, HNSW (ef={ef}) overtakes exact at about {at:,.0f} entries "
                f"(between {np.exp(x0):,.0f} and {np.exp(x1):,.0f})"
            )
    if logs and logs[0][1] > 0:
        return (
            None,
            f"by {by} times, HNSW (ef={ef}) is already faster at the smallest size measured ({points[0].size:,})",
        )
    return (
        None,
        f"by {by} times, exact stays faster up to the largest size measured ({points[-1].size:,})"
        if points
        else "not measured",
    )


# ---- input size ------------------------------------------------------------------------------------------------


@dataclass
class SizeBundle:
    sizes: dict[str, int]  # encoder -> its square input side
    bundle: Path | None
    skipped: str = ""
    export_s: float | None = None  # seconds spent exporting it now (None: it existed)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def same_size(size: int) -> dict[str, int]:
    """Both encoders at ``size``: a point of the input-size sweep."""
    return {"clip": size, "dinov2": size}


def bundle_for_size(
    main: Path, manifest: Manifest, sizes: dict[str, int], cache: Path, say, own: bool = True, export: bool = True
) -> SizeBundle:
    """The main bundle where its encoders are at ``sizes`` (encoder -> input side) and ``own``; otherwise a
    random-weights bundle of the same architectures at ``sizes`` with fp16 variants, cached under ``cache``, exported
    if absent and ``export``."""
    if own and sizes == manifest.image_sizes:
        return SizeBundle(sizes, main)
    at = describe_sizes(sizes)
    for role, name in ENCODER_NAMES.items():
        patch = getattr(manifest, role).patch_size
        if sizes[role] % patch:
            return SizeBundle(sizes, None, f"{sizes[role]} is not a multiple of {name}'s patch size {patch}")
    if "injected" in (manifest.clip.weights, manifest.dinov2.weights):
        return SizeBundle(
            sizes, None, "the main bundle's models were injected by a script: the CLI cannot export them at other sizes"
        )
    side = "-".join(map(str, dict.fromkeys((sizes["clip"], sizes["dinov2"]))))  # "448", or CLIP's-DINOv2's
    out = (
        cache
        / "bundles"
        / f"{slug(manifest.clip.model)}__{slug(manifest.dinov2.model)}__{manifest.dense_method}__{side}__fp16"
    )
    try:
        read_manifest(out, verify=False)
        return SizeBundle(sizes, out)
    except BundleError:
        pass
    if not export:
        return SizeBundle(sizes, None, f"no cached random-weights bundle at {at} (--quick does not export one)")
    cmd = [
        sys.executable,
        "-m",
        "ovseg.export.cli",
        "--out",
        str(out),
        "--random-weights",
        "--force",
        "--clip",
        manifest.clip.model,
        "--dinov2",
        manifest.dinov2.model,
        "--dense",
        manifest.dense_method,
        "--clip-size",
        str(sizes["clip"]),
        "--dinov2-size",
        str(sizes["dinov2"]),
        "--vocab",
        "voc21",
        "--fp16",
    ]
    say(f"exporting a random-weights bundle at {at} into {out} (once; reused from the cache afterwards)")
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return SizeBundle(sizes, None, f"export failed: {lines[-1] if lines else f'exit {done.returncode}'}")
    return SizeBundle(sizes, out, export_s=round(time.perf_counter() - start, 1))
