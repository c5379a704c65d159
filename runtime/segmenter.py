"""The Segmenter: frames in, named segments out, guidance-free (TAG) or guided (PixelCLIP inference). No torch.

Guidance-free: DINOv2 tokens -> spherical k-means (warm-started in video) -> score maps (K, h, w) ->
CLIP patch embeddings pooled per segment at S x S (the native fused pooling) -> top-k labels from the
vocabulary -> label hysteresis -> segments with one label merge -> label map at the frame's size.
Guided: cosine of the CLIP patch embeddings with the prompt-ensembled class embeddings -> bilinear
upsampling + argmax; refine="segments" votes the mean logits inside each DINOv2 segment.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .. import _native
from .bundle import DEFAULT_BUNDLE, BundleError, Manifest, read_manifest
from .engines import Engines
from .lookup import LOOKUPS, LabelIndex, l2_normalise
from .preprocess import Preprocessor, check_frame, to_bgr8
from .refine import EdgeRefiner
from .result import Result, Segment
from .sessions import SegmenterError
from .vocabulary import GUIDED_TEMPLATES, VocabularyError, load_vocabulary

log = logging.getLogger("ovseg")

MODES = ("auto", "guided", "guidance-free")
REFINES = (None, "segments", "edges")
UNKNOWN = "unknown"
STAGES = ("preprocess", "dinov2", "kmeans", "refine", "clip", "pooling", "lookup", "render", "total")
_warned_random: set[Path] = set()


@dataclass
class SegmenterConfig:
    num_segments: int = 15  # TAG's K
    top_k: int = 3  # labels looked up per segment: the best and top_k - 1 alternatives
    score_threshold: float | None = None  # below it a segment is "unknown"
    refine: str | None = None  # None | "segments" (guided) | "edges" (both modes)
    keyframe_interval: int = 1  # CLIP every N-th frame, segments move with DINOv2 in between (whenever DINOv2 runs)
    hysteresis: int = 3  # frames a new label must win in a row before a segment takes it
    seed: int = 0  # k-means++ seeding of the first frame
    kmeans_iters: int = 10

    def check(self) -> None:
        if self.num_segments < 1 or self.top_k < 1 or self.keyframe_interval < 1 or self.hysteresis < 0:
            raise SegmenterError(
                f"num_segments, top_k and keyframe_interval must be >= 1 and hysteresis >= 0, got {self.num_segments}, "
                f"{self.top_k}, {self.keyframe_interval}, {self.hysteresis}"
            )
        if self.refine not in REFINES:
            raise SegmenterError(f"unknown refine {self.refine!r}: choose None, 'segments' or 'edges'")


class LabelHysteresis:
    """Per segment id, a held label that changes only when a new label wins ``frames`` frames in a row."""

    def __init__(self, size: int, frames: int):
        self.frames = frames
        self.held = np.full(size, -1, np.int64)
        self.candidate = np.full(size, -1, np.int64)
        self.streak = np.zeros(size, np.int64)

    def update(self, ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Feed this frame's best label of each segment in ``ids``; returns their held labels."""
        for i, new in zip(ids.tolist(), labels.tolist()):
            if self.held[i] < 0 or new == self.held[i] or self.frames <= 1:
                self.held[i], self.candidate[i], self.streak[i] = new, -1, 0
                continue
            self.streak[i] = self.streak[i] + 1 if new == self.candidate[i] else 1
            self.candidate[i] = new
            if self.streak[i] >= self.frames:
                self.held[i], self.candidate[i], self.streak[i] = new, -1, 0
        return self.held[ids]


@dataclass
class _Stream:
    """The video state of one thread: what its next frame continues from."""

    shape: tuple[int, int] | None = None
    centres: np.ndarray | None = None  # k-means centres of the previous frame
    clip_grid: np.ndarray | None = None  # CLIP patch embeddings of the last keyframe (gh, gw, D)
    since_keyframe: int = 0
    labels: LabelHysteresis | None = None
    vocab_version: int = -1
    frame_index: int = 0


class _Timer:
    def __init__(self):
        self.ms = dict.fromkeys(STAGES, 0.0)

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self.ms[stage] += (time.perf_counter() - start) * 1000


@dataclass
class _Units:
    """Guided mode's voters for region scores: patches or segments, their class logits, class and weight."""

    logits: np.ndarray  # (U, C)
    weight: np.ndarray  # (U,)
    cls: np.ndarray = field(init=False)

    def __post_init__(self):
        self.cls = self.logits.argmax(axis=1)


class Segmenter:
    """Open-vocabulary segmentation of frames with a bundle's ONNX encoders; see the module docstring.

    Thread safety: calls are serialised by one lock (the encoders and their preallocated inputs are
    shared, and ONNX Runtime already uses every core inside one run). Video state (k-means warm start,
    label hysteresis, keyframe reuse) is kept per thread, so each thread is its own stream and gets
    exactly the results it would get alone; ``reset()`` forgets the calling thread's stream. Changing
    the vocabulary or classes applies to every thread from its next frame.

    Segment areas are counted on the label map at the frame's size; bounding boxes likewise.
    """

    def __init__(self, manifest: Manifest, bundle_dir: Path, engines: Engines, config: SegmenterConfig, index: LabelIndex,
                 classes: list[str] | None = None):
        config.check()
        self.manifest = manifest
        self.bundle_dir = Path(bundle_dir)
        self.engines = engines
        self.config = config
        self._index = index
        size = manifest.image_size
        self._pre = Preprocessor(size)
        self._edges = EdgeRefiner(size)
        self._edges_guided = EdgeRefiner(size, temperature=manifest.text.logit_scale)
        self._lock = threading.RLock()
        self._local = threading.local()
        self._vocab_version = 0
        self._classes: list[str] | None = None
        self._class_embeddings: np.ndarray | None = None
        if classes is not None:
            self.set_classes(classes)
        if manifest.random_weights and self.bundle_dir not in _warned_random:
            _warned_random.add(self.bundle_dir)
            log.warning("bundle %s has random weights: its segments are real, its labels are meaningless", self.bundle_dir)

    @classmethod
    def from_bundle(cls, path: str | Path | None = None, *, backend: str = "auto", precision: str = "auto", mode: str = "auto",
                    classes: list[str] | str | None = None, vocab: list[str] | str | None = None, num_segments: int = 15,
                    top_k: int = 3, score_threshold: float | None = None, refine: str | None = None, lookup: str = "auto",
                    ef: int | None = None, keyframe_interval: int = 1, hysteresis: int = 3, threads: int | None = None,
                    seed: int = 0) -> "Segmenter":
        """Open a bundle (``path=None``: the default bundle) on ``backend``; raises SegmenterError naming what is missing.

        ``threads`` is ONNX Runtime's intra-op threads per session; the native kernels' thread pool is the process's
        (``ovseg._native.set_num_threads``, which ``ovseg-run --threads`` calls) and is left as it is.
        """
        config = SegmenterConfig(num_segments=num_segments, top_k=top_k, score_threshold=score_threshold, refine=refine,
                                 keyframe_interval=keyframe_interval, hysteresis=hysteresis, seed=seed)
        config.check()
        if mode not in MODES:
            raise SegmenterError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        if mode == "guided" and classes is None:
            raise SegmenterError("mode='guided' needs classes: pass classes=[...] or a preset name such as 'voc20'")
        if mode == "guidance-free" and classes is not None:
            raise SegmenterError("mode='guidance-free' takes no classes: drop classes=, or use mode='guided'")
        if lookup not in LOOKUPS:
            raise SegmenterError(f"unknown lookup {lookup!r}: choose one of {', '.join(LOOKUPS)}")
        classes = _names(classes, "classes") if classes is not None else None  # fail before the sessions load
        vocab = _names(vocab, "vocab") if vocab is not None else None
        bundle_dir = Path(path if path is not None else DEFAULT_BUNDLE).expanduser()
        try:
            manifest = read_manifest(bundle_dir)
        except BundleError as e:
            raise SegmenterError(str(e)) from None  # the Segmenter API raises one type
        engines = Engines.open(bundle_dir, manifest, backend, precision, threads)
        try:
            if vocab is None:
                index = LabelIndex.from_bundle(bundle_dir, manifest.vocabulary, lookup, ef)
            else:
                embeddings = engines.embedder(vocab, manifest.text.templates)
                index = LabelIndex(vocab, embeddings, lookup, hnsw_params=manifest.vocabulary.hnsw_params, ef=ef)
            return cls(manifest, bundle_dir, engines, config, index, classes)
        except BaseException:
            engines.close()
            raise

    def with_config(self, config: SegmenterConfig) -> "Segmenter":
        """A Segmenter with ``config`` over this one's engines, vocabulary and classes, with video state of its own.

        Opens no session; the engines are shared, so closing either Segmenter closes them for both.
        """
        return type(self)(self.manifest, self.bundle_dir, self.engines, config, self._index, self._classes)

    # ---- properties and run-time changes -------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return "guided" if self._classes is not None else "guidance-free"

    @property
    def labels(self) -> list[str]:
        """The names labels come from: the classes in guided mode, the vocabulary otherwise."""
        return list(self._classes if self._classes is not None else self._index.names)

    @property
    def index(self) -> LabelIndex:
        """The guidance-free vocabulary's names, embeddings and search (replaced by ``set_vocabulary``)."""
        return self._index

    @property
    def backend(self) -> str:
        return self.engines.backend

    @property
    def precision(self) -> str:
        return self.engines.precision

    @property
    def random_weights(self) -> bool:
        return bool(self.manifest.random_weights)

    def set_vocabulary(self, names: list[str] | str) -> None:
        """Guidance-free vocabulary (names, or a preset / text file), embedded with the bundle's text encoder."""
        names = _names(names, "set_vocabulary")
        with self._lock:
            embeddings = self.engines.embedder(names, self.manifest.text.templates)
            old = self._index
            self._index = LabelIndex(names, embeddings, old.requested, hnsw_params=old.params, ef=old.params.get("ef"))
            self._vocab_version += 1

    def set_classes(self, names: list[str] | str | None) -> None:
        """Guided mode with these classes (names, or a preset / text file); None goes back to guidance-free."""
        if names is None:
            with self._lock:
                self._classes, self._class_embeddings = None, None
                self._vocab_version += 1
            return
        names = _names(names, "set_classes")
        with self._lock:
            self._class_embeddings = self.engines.embedder(names, GUIDED_TEMPLATES)
            self._classes = names
            self._vocab_version += 1

    def reset(self) -> None:
        """Forget the calling thread's video state (warm start, hysteresis, keyframe)."""
        self._local.stream = _Stream()

    def close(self) -> None:
        with self._lock:
            self.engines.close()

    def _stream(self) -> _Stream:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = _Stream()
        return stream

    # ---- per frame ----------------------------------------------------------------------------------------------

    def __call__(self, frame_bgr: np.ndarray) -> Result:
        """Segment one frame (uint8/uint16, gray, BGR or BGRA, any size); the label map comes back at its size."""
        timer = _Timer()
        start = time.perf_counter()
        stream = self._stream()
        with self._lock:
            frame = check_frame(frame_bgr)
            shape = frame.shape[:2]
            if stream.shape != shape or stream.vocab_version != self._vocab_version:
                fresh = _Stream(shape=shape, vocab_version=self._vocab_version, frame_index=stream.frame_index)
                if stream.shape == shape:  # only the vocabulary changed: the segments may continue
                    fresh.centres, fresh.clip_grid, fresh.since_keyframe = stream.centres, stream.clip_grid, stream.since_keyframe
                stream = self._local.stream = fresh
            with timer("preprocess"):
                rgb = self._pre(frame)
            if self._classes is not None:
                label_map, segments = self._guided(rgb, shape, stream, timer)
            else:
                label_map, segments = self._guidance_free(rgb, shape, stream, timer)
        stream.frame_index += 1
        timer.ms["total"] = (time.perf_counter() - start) * 1000
        return Result(label_map, segments, {s.id: s.label for s in segments}, timer.ms, stream.frame_index - 1)

    def candidates(self, frame_bgr: np.ndarray) -> np.ndarray:
        """The un-merged segment candidates (k-means segments, refined as configured) at the frame's size, without video state.

        For evaluation (oracle mIoU) and debugging; the labelled pipeline is ``__call__``.
        """
        frame = check_frame(frame_bgr)
        with self._lock:
            maps = self._segments(self._pre(frame), _Stream(), _Timer())
            return _native.upsample_argmax(maps, frame.shape[0], frame.shape[1])

    def _segments(self, rgb: np.ndarray, stream: _Stream, timer: _Timer) -> np.ndarray:
        """DINOv2 + spherical k-means: the K segment score maps (K, h, w), refined when refine="edges"."""
        info, K = self.manifest.dinov2, self.config.num_segments
        with timer("dinov2"):
            self._pre.normalise(self.engines.dinov2.input, info.mean, info.std)
            tokens = _grid_output(self.engines.dinov2.run(), "tokens", info.grid, "DINOv2")
        with timer("kmeans"):
            x = tokens.reshape(-1, tokens.shape[-1])
            centres, _, scores = _native.spherical_kmeans(x, K, self.config.kmeans_iters, self.config.seed, stream.centres)
            stream.centres = centres
            maps = np.ascontiguousarray(scores.T).reshape(K, *info.grid)
        if self.config.refine == "edges":
            with timer("refine"):
                maps = self._edges(maps, rgb)
        return maps

    def _clip_grid(self, stream: _Stream | None, timer: _Timer) -> np.ndarray:
        """CLIP patch embeddings (gh, gw, D); with a stream, reused for keyframe_interval - 1 frames."""
        if stream is not None and stream.clip_grid is not None and stream.since_keyframe < self.config.keyframe_interval:
            stream.since_keyframe += 1
            return stream.clip_grid
        info = self.manifest.clip
        with timer("clip"):
            self._pre.normalise(self.engines.clip.input, info.mean, info.std)
            grid = _grid_output(self.engines.clip.run(), "patch_embeddings", info.grid, "CLIP")
        if stream is not None:
            stream.clip_grid, stream.since_keyframe = grid, 1
        return grid

    def _guidance_free(self, rgb: np.ndarray, shape: tuple[int, int], stream: _Stream, timer: _Timer):
        cfg, size = self.config, self.manifest.image_size
        maps = self._segments(rgb, stream, timer)
        grid = self._clip_grid(stream, timer)
        with timer("pooling"):
            emb, areas, _ = _native.pool_segments_from_scores(maps, grid, size, size)
        with timer("lookup"):
            ids = np.flatnonzero(areas > 0)
            matches = self._index.search(emb[ids], cfg.top_k)
            if stream.labels is None:
                stream.labels = LabelHysteresis(cfg.num_segments, cfg.hysteresis)
            held = stream.labels.update(ids, matches.index[:, 0])
            held_score = self._index.score(emb[ids], held)
            known = held_score >= cfg.score_threshold if cfg.score_threshold is not None else np.ones(len(ids), bool)
            groups = _merge(ids, held, known)
        with timer("render"):
            raw = _native.upsample_argmax(maps, *shape)
            lut = np.arange(cfg.num_segments, dtype=np.int32)
            for members in groups:
                lut[members] = members[0]
            label_map = lut[raw] if any(len(m) > 1 for m in groups) else raw
            pixel_areas, boxes = label_stats(label_map, cfg.num_segments)
        names = self._index.names
        segments = []
        row_of = {int(i): r for r, i in enumerate(ids)}
        for members in groups:
            root = int(members[0])
            if pixel_areas[root] == 0:
                continue
            rows = [row_of[int(m)] for m in members]
            weights = areas[members]
            score = float(np.average(held_score[rows], weights=weights))
            label = names[held[rows[0]]] if known[rows[0]] else UNKNOWN
            largest = rows[int(np.argmax(weights))]
            alternatives = [(names[j], float(s)) for j, s in zip(matches.index[largest], matches.score[largest]) if names[j] != label]
            segments.append(Segment(root, label, score, int(pixel_areas[root]), boxes[root], alternatives[: cfg.top_k - 1]))
        listed = {s.id for s in segments}
        for i in np.flatnonzero(pixel_areas).tolist():  # empty at S x S, yet a few pixels at the frame's size: no embedding
            if i not in listed:
                segments.append(Segment(i, UNKNOWN, 0.0, int(pixel_areas[i]), boxes[i], []))
        return label_map, _by_area(segments)

    def _guided(self, rgb: np.ndarray, shape: tuple[int, int], stream: _Stream, timer: _Timer):
        cfg, size, text = self.config, self.manifest.image_size, self._class_embeddings
        segmented = cfg.refine == "segments"
        grid = self._clip_grid(stream if segmented else None, timer)
        gh, gw, dim = grid.shape
        with timer("lookup"):
            patches = l2_normalise(grid.reshape(-1, dim))
            logits = patches @ text.T  # (N, C) cosines
        if segmented:
            maps = self._segments(rgb, stream, timer)
            with timer("pooling"):
                emb, areas, _ = _native.pool_segments_from_scores(maps, patches.reshape(gh, gw, dim), size, size)
                units = _Units(emb @ text.T, areas)  # mean logits per segment (up to a positive scale)
            with timer("render"):
                label_map = units.cls.astype(np.int32)[_native.upsample_argmax(maps, *shape)]
        else:
            class_maps = np.ascontiguousarray(logits.T).reshape(-1, gh, gw)
            if cfg.refine == "edges":
                with timer("refine"):
                    class_maps = self._edges_guided(class_maps, rgb)
            units = _Units(logits, np.ones(len(logits), np.float32))
            with timer("render"):
                label_map = _native.upsample_argmax(class_maps, *shape)
        with timer("render"):
            pixel_areas, boxes = label_stats(label_map, len(self._classes))
        segments = []
        for c in np.flatnonzero(pixel_areas):
            mine = units.cls == c
            # a class can win pixels between patches without winning a patch: score it by its best unit then
            row = np.average(units.logits[mine], axis=0, weights=units.weight[mine] + 1e-12) if mine.any() else units.logits[np.argmax(units.logits[:, c])]
            score = float(row[c])
            known = cfg.score_threshold is None or score >= cfg.score_threshold
            label = self._classes[c] if known else UNKNOWN
            order = [int(j) for j in np.argsort(-row, kind="stable") if self._classes[j] != label][: cfg.top_k - 1]
            segments.append(Segment(int(c), label, score, int(pixel_areas[c]), boxes[int(c)], [(self._classes[j], float(row[j])) for j in order]))
        return label_map, _by_area(segments)

    # ---- display ------------------------------------------------------------------------------------------------

    def render(self, frame_bgr: np.ndarray, result: Result, alpha: float = 0.5, legend: bool = True) -> np.ndarray:
        """The frame (uint8 BGR) with each segment tinted in its colour and, with ``legend``, a swatch + label per segment."""
        frame = to_bgr8(frame_bgr)
        if frame.shape[:2] != result.label_map.shape:
            raise SegmenterError(f"the frame is {frame.shape[1]}x{frame.shape[0]}, the result's label map {result.label_map.shape[1]}x{result.label_map.shape[0]}")
        palette = segment_palette(max((s.id for s in result.segments), default=0) + 1)
        overlay = cv2.addWeighted(frame, 1.0 - alpha, palette[result.label_map], alpha, 0.0)
        if legend:
            draw_legend(overlay, result.segments, palette)
        return overlay


def _names(names: list[str] | str, what: str) -> list[str]:
    try:
        listed = load_vocabulary(names) if isinstance(names, str) else list(names)
    except VocabularyError as e:
        raise SegmenterError(str(e)) from None
    clean = list(dict.fromkeys(n.strip() for n in listed if isinstance(n, str) and n.strip()))
    if not clean:
        raise SegmenterError(f"{what} got no class names ({names!r}); give at least one, e.g. ['person', 'chair']")
    return clean


def _grid_output(outputs: dict[str, np.ndarray], name: str, grid: tuple[int, int], role: str) -> np.ndarray:
    x = outputs.get(name)
    if x is None or x.ndim != 3 or x.shape[0] != 1 or x.shape[1] != grid[0] * grid[1]:
        got = None if x is None else x.shape
        raise SegmenterError(f"the {role} encoder returned {name} {got}, the manifest says (1, {grid[0] * grid[1]}, D): re-export the bundle")
    return np.ascontiguousarray(x[0], dtype=np.float32).reshape(grid[0], grid[1], -1)


def _merge(ids: np.ndarray, held: np.ndarray, known: np.ndarray) -> list[np.ndarray]:
    """Segment ids grouped by held label (unknown ones stay alone), each group sorted: its first id names it."""
    groups: dict[int, list[int]] = {}
    alone = []
    for i, label, ok in zip(ids.tolist(), held.tolist(), known.tolist()):
        (groups.setdefault(label, []) if ok else alone).append(i)
    return sorted((np.array(sorted(g)) for g in [*groups.values(), *([a] for a in alone)]), key=lambda g: g[0])


def _by_area(segments: list[Segment]) -> list[Segment]:
    return sorted(segments, key=lambda s: (-s.area, s.id))


def label_stats(label_map: np.ndarray, n: int, chunk: int = 1 << 20) -> tuple[np.ndarray, dict[int, tuple[int, int, int, int]]]:
    """Pixels per id (n,) and the bounding box (x0, y0, x1, y1), exclusive, of every id present; bounded temporaries."""
    h, w = label_map.shape
    rows = max(1, chunk // w)
    areas = np.zeros(n, np.int64)
    for y in range(0, h, rows):
        areas += np.bincount(label_map[y : y + rows].ravel(), minlength=n)[:n]
    mask = np.empty((h, w), bool)
    boxes = {}
    for i in np.flatnonzero(areas).tolist():
        np.equal(label_map, i, out=mask)
        x, y, bw, bh = cv2.boundingRect(mask.view(np.uint8))
        boxes[i] = (x, y, x + bw, y + bh)
    return areas, boxes


def segment_palette(n: int) -> np.ndarray:
    """BGR colours of ids 0..n-1: the VOC colour map without its black."""
    return _native.default_palette(n + 1)[1:]


def draw_legend(image: np.ndarray, segments: list[Segment], palette: np.ndarray, max_rows: int = 20) -> list[tuple[int, int, int, int]]:
    """A colour swatch and ``label score`` per segment (largest first), top-left, in place; returns the boxes drawn
    (x0, y0, x1, y1), exclusive.

    The text is white on a darkened band, not outlined: a thicker Hershey outline has wider glyph advances than the
    text it outlines and smears into ghost characters.
    """
    scale = max(0.4, min(image.shape[:2]) / 900)
    line = int(22 * scale / 0.5)
    h, w = image.shape[:2]
    boxes = []
    for row, seg in enumerate(segments[:max_rows]):
        y = 6 + row * line
        if y + line > h:
            break
        colour = tuple(int(v) for v in palette[seg.id])
        cv2.rectangle(image, (6, y), (6 + line - 4, y + line - 4), colour, -1)
        boxes.append((6, y, min(w, 6 + line - 3), min(h, y + line - 3)))
        text = f"{seg.label} {seg.score:.2f}"
        origin = (10 + line, y + line - 8)
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        x0, y0, x1, y1 = origin[0] - 2, max(0, origin[1] - th - 3), min(w, origin[0] + tw + 2), min(h, origin[1] + base + 1)
        if x1 > x0 and y1 > y0:
            band = image[y0:y1, x0:x1]
            band[...] = (band * 0.4).astype(image.dtype)
            boxes.append((x0, y0, x1, y1))
        cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return boxes
