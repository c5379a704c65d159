"""The Segmenter: frames in, named segments out, guidance-free (TAG) or guided (PixelCLIP inference). No torch.

One frame goes through stages, each a module of pipeline/ with a typed hand-off (docs/DESIGN.md, "Data flow and
stage modules"):

    preprocess -> segments.py (DINOv2 tokens -> spherical k-means -> SegmentMaps)
               -> features.py (CLIP dense features -> DenseFeatures)
               -> labels.py (guidance-free head: fused pooling -> lookup -> hysteresis -> merge -> label map)
               or guided.py (guided head: class logits per patch or per segment -> label map)

render.py draws results. The Segmenter keeps what outlives a frame: the engines, the vocabulary or classes, and
each thread's video state.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import _native
from ..constants import STAGES, default_bundle
from ..errors import SegmenterError
from ..profiles import FAST
from .bundle.manifest import BundleError, Manifest, read_manifest
from .config import SegmenterConfig
from .pipeline.encoders import Engines, ImageEncoderFactory, run_encoder_batch
from .pipeline.features import CUT_FRACTION, ClipFeatures, DenseFeatures, Keyframe, changed_fraction, unit_rows
from .pipeline.guided import GuidedHead
from .pipeline.labels import GuidanceFreeHead, LabelHysteresis
from .pipeline.lookup import LabelIndex
from .pipeline.preprocess import Preprocessors, check_frame
from .pipeline.refine import EdgeRefiner
from .pipeline.render import draw_legend, label_stats, overlay, segment_palette
from .pipeline.segments import SegmentCandidates, SegmentMaps
from .pipeline.vocabulary import GUIDED_TEMPLATES, VocabularyError, load_vocabulary
from .result import UNKNOWN, Result, StageTimer

__all__ = [
    "Segmenter",
    "SegmenterConfig",
    "SegmenterError",
    "STAGES",
    "Stream",
    "VideoStream",
    "UNKNOWN",
    "LabelHysteresis",
    "draw_legend",
    "label_stats",
    "segment_palette",
]


@dataclass
class VideoStream:
    """The video state of one stream of frames: what its next frame continues from. Each thread has one of its own;
    ``Segmenter.batch`` takes them explicitly (one per camera)."""

    shape: tuple[int, int] | None = None
    centres: np.ndarray | None = None  # k-means centres of the previous frame
    keyframe: Keyframe = field(default_factory=Keyframe)
    labels: LabelHysteresis | None = None
    vocab_version: int = -1
    frame_index: int = 0
    tokens: np.ndarray | None = None  # the previous frame's unit DINOv2 tokens (h * w, Dd)
    change: float | None = None  # the fraction of the picture changed since the previous frame (features.CUT_FRACTION)


class Stream:
    """One camera's frames through a Segmenter (``seg.stream()``): ``stream(frame)`` continues its video state. Callable
    from any thread, one frame at a time per stream (a second caller waits for the first); streams share the
    Segmenter's encoders. ``state`` is the VideoStream that ``Segmenter.batch`` takes."""

    def __init__(self, segmenter: Segmenter):
        self.segmenter = segmenter
        self.state = VideoStream()
        self._lock = threading.Lock()

    def __call__(self, frame_bgr: np.ndarray) -> Result:
        with self._lock:
            return self.segmenter.batch([frame_bgr], [self.state])[0]

    def reset(self) -> None:
        """Forget this stream's video state (a camera cut, a new scene)."""
        with self._lock:
            self.state = VideoStream()


class Segmenter:
    """Open-vocabulary segmentation of frames with a bundle's ONNX encoders; see the module docstring.

    Thread safety: a Segmenter may be shared; its per-frame work is serialised by one lock (the encoders and their
    preallocated inputs are shared, and ONNX Runtime already uses every core inside one run). Video state (k-means
    warm start, label hysteresis, keyframe reuse) belongs to a stream: ``seg.stream()`` gives one per camera, callable
    from any thread; ``seg(frame)`` uses the calling thread's own stream (``reset()`` forgets it), so under a thread
    pool that hands one camera's frames to several threads, use ``seg.stream()``. ``batch`` takes frames of several
    streams (``VideoStream``) at once and runs each encoder once on them. Changing the vocabulary or classes applies
    to every stream from its next frame.

    Segment areas are counted on the label map at the frame's size; bounding boxes likewise.
    """

    def __init__(
        self,
        manifest: Manifest,
        bundle_dir: Path,
        engines: Engines,
        config: SegmenterConfig,
        index: LabelIndex,
        classes: list[str] | None = None,
    ):
        config = replace(config.resolve(manifest.profile), precision=engines.precision, lookup=index.requested)
        k = config.num_segments
        assert k is not None  # resolved
        self.manifest = manifest
        self.bundle_dir = Path(bundle_dir)
        self.engines = engines
        self.config = config
        self._index = index
        # Each encoder at its own input size; segments are pooled at CLIP's (docs/DESIGN.md, fused pooling).
        clip_size, dino_size, edges = manifest.clip.image_size, manifest.dinov2.image_size, config.refine == "edges"
        self._pre = Preprocessors(manifest.image_sizes)
        self._segment_candidates = SegmentCandidates(
            engines.dinov2,
            manifest.dinov2,
            self._pre["dinov2"],
            k,
            config.kmeans_iters,
            config.seed,
            EdgeRefiner(dino_size) if edges else None,
        )
        self._clip_features = ClipFeatures(config.keyframes)
        self._free_head = GuidanceFreeHead(clip_size, k, config.top_k, config.score_threshold)
        self._guided_head = GuidedHead(
            clip_size,
            config.top_k,
            config.score_threshold,
            EdgeRefiner(clip_size, temperature=manifest.text.logit_scale) if edges else None,
        )
        self._lock = threading.RLock()
        self._local = threading.local()
        self._vocab_version = 0
        self._classes: list[str] | None = None
        self._class_embeddings: np.ndarray | None = None
        if classes is not None:
            self.set_classes(classes)

    @classmethod
    def from_bundle(
        cls,
        path: str | Path | None = None,
        *,
        classes: list[str] | str | None = None,
        vocab: list[str] | str | None = None,
        config: SegmenterConfig | None = None,
        backend: str = "auto",
        threads: int | None = None,
        trusted_keys: Sequence[str | Path] | None = None,
        image_encoder: ImageEncoderFactory | None = None,
    ) -> Segmenter:
        """Open a bundle (``path=None``: the default bundle) on ``backend``; raises SegmenterError naming what is missing.

        ``classes``: guided mode with these (names, a preset such as "voc20", or a text file); None: guidance-free,
        naming from ``vocab`` (the same forms; None: the bundle's vocabulary). ``config``: see SegmenterConfig.
        ``threads`` is ONNX Runtime's intra-op threads per session; the native kernels' thread pool is the process's
        (``ovseg._native.set_num_threads``, which ``ovseg-run --threads`` calls). ``trusted_keys``: public key files,
        one of which must have signed the bundle (None: those configured, ``ovseg.runtime.bundle.signing``; none
        configured: unsigned bundles open). ``image_encoder`` opens the image encoders in place of ONNX Runtime
        sessions (``Engines.open``; ovseg-serve's encoders on Triton).
        """
        config = config or SegmenterConfig()
        config.resolve(FAST.name)  # what was given, before any file is read (FAST: skips keyframes, as a profile may)
        classes = _names(classes, "classes") if classes is not None else None  # fail before the sessions load
        vocab = _names(vocab, "vocab") if vocab is not None else None
        bundle_dir = Path(path if path is not None else default_bundle()).expanduser()
        try:
            manifest = read_manifest(
                bundle_dir, trusted=None if trusted_keys is None else [Path(k) for k in trusted_keys]
            )
        except BundleError as e:
            raise SegmenterError(str(e)) from None  # the Segmenter API raises one type
        config = config.resolve(manifest.profile)
        engines = Engines.open(bundle_dir, manifest, backend, config.precision or "auto", threads, image_encoder)
        try:
            if vocab is None:
                index = LabelIndex.from_bundle(bundle_dir, manifest.vocabulary, config.lookup, config.ef)
            else:
                embeddings = engines.embedder(vocab, manifest.text.templates)
                index = LabelIndex(
                    vocab, embeddings, config.lookup, hnsw_params=manifest.vocabulary.hnsw_params, ef=config.ef
                )
            return cls(manifest, bundle_dir, engines, config, index, classes)
        except BaseException:
            engines.close()
            raise

    def with_config(self, config: SegmenterConfig) -> Segmenter:
        """A Segmenter with ``config`` over this one's engines, vocabulary and classes, with video state of its own
        (the precision and lookup stay this one's: they belong to the engines and the index).

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
        """What the image encoders run on: the provider ONNX Runtime opened their sessions on (checked to be the one
        asked for), or "tensorrt" for native plans."""
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
        names = _names(names, "set_classes") if names is not None else None
        with self._lock:
            self._class_embeddings = self.engines.embedder(names, GUIDED_TEMPLATES) if names is not None else None
            self._classes = names
            self._vocab_version += 1

    def stream(self) -> Stream:
        """A new stream of frames (one camera) with video state of its own."""
        return Stream(self)

    def reset(self) -> None:
        """Forget the calling thread's video state (warm start, hysteresis, keyframe)."""
        self._local.stream = VideoStream()

    def close(self) -> None:
        with self._lock:
            self.engines.close()

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- per frame ----------------------------------------------------------------------------------------------

    def __call__(self, frame_bgr: np.ndarray) -> Result:
        """Segment one frame (uint8/uint16, gray, BGR or BGRA, any size); the label map comes back at its size."""
        return self.batch([frame_bgr], [self._stream()])[0]

    def batch(self, frames: list[np.ndarray], streams: list[VideoStream]) -> list[Result]:
        """One frame of each of several streams, each continuing its ``VideoStream``: the encoders run once on the
        frames that need them (one batch each). Every result is the one that stream's frame gets alone: labels and
        label maps exactly, scores to float rounding (a batched matrix product may sum in another order). A frame's
        timings count the batch's encoder runs in full (the time it waited for them)."""
        if len(frames) != len(streams) or not frames:
            raise SegmenterError(f"batch takes one stream per frame, got {len(frames)} frames, {len(streams)} streams")
        if len({id(s) for s in streams}) != len(streams):
            raise SegmenterError(
                "a batch holds at most one frame per stream: send a stream's next frame in a later batch"
            )
        timers = [StageTimer() for _ in frames]
        start = time.perf_counter()
        with self._lock:
            checked = [check_frame(f) for f in frames]
            shapes = [f.shape[:2] for f in checked]
            for stream, shape in zip(streams, shapes):
                self._continue(stream, shape)
            rgbs = self._preprocess(checked, timers)
            guided = self._classes is not None
            maps: list[SegmentMaps | None] = [None] * len(frames)
            if not guided or self.config.refine == "segments":
                maps = self._warm_segments(rgbs, streams, timers)
            keyframes = [s.keyframe if m is not None else None for s, m in zip(streams, maps)]
            features = self._features(rgbs, keyframes, maps, timers)
            results = []
            for i, (stream, shape, timer) in enumerate(zip(streams, shapes, timers)):
                votes = maps[i]
                if not guided:
                    assert votes is not None  # guidance-free always segments
                    label_map, segments = self._free_head(
                        votes, features[i], self._index, self._hysteresis(stream), shape, timer
                    )
                else:  # per patch (CLIP on every frame), or voted inside the segments (keyframes as guidance-free)
                    assert self._classes is not None and self._class_embeddings is not None  # set together
                    label_map, segments = self._guided_head(
                        rgbs[i]["clip"], features[i], votes, self._classes, self._class_embeddings, shape, timer
                    )
                results.append((label_map, segments))
        out = []
        total = (time.perf_counter() - start) * 1000
        for (label_map, segments), stream, timer, keyframe in zip(results, streams, timers, keyframes):
            stream.frame_index += 1
            timer.ms["total"] = total
            fresh, change = (keyframe.fresh, keyframe.change) if keyframe is not None else (True, None)
            labels = {s.id: s.label for s in segments}
            out.append(Result(label_map, segments, labels, timer.ms, stream.frame_index - 1, fresh, change))
        return out

    def candidates(self, frame_bgr: np.ndarray) -> np.ndarray:
        """The un-merged segment candidates (k-means segments, refined as configured) at the frame's size, without video state.

        For evaluation (oracle mIoU) and debugging; the labelled pipeline is ``__call__``.
        """
        frame = check_frame(frame_bgr)
        with self._lock:
            maps = self._segment_candidates(self._pre["dinov2"](frame), None, StageTimer())
            return _native.upsample_argmax(maps.scores, frame.shape[0], frame.shape[1])

    def render(self, frame_bgr: np.ndarray, result: Result, alpha: float = 0.5, legend: bool = True) -> np.ndarray:
        """The frame (uint8 BGR) with each segment tinted in its colour and, with ``legend``, a swatch + label per segment."""
        return overlay(frame_bgr, result, alpha, legend)

    # ---- video state --------------------------------------------------------------------------------------------

    def _stream(self) -> VideoStream:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = VideoStream()
        return stream

    def _continue(self, stream: VideoStream, shape: tuple[int, int]) -> None:
        """Make ``stream`` ready for a frame of ``shape``: started afresh when the size or the vocabulary changed."""
        if stream.shape == shape and stream.vocab_version == self._vocab_version:
            return
        keep = stream.shape == shape  # only the vocabulary changed: the segments may continue
        centres, keyframe = (stream.centres, stream.keyframe) if keep else (None, Keyframe())
        stream.shape, stream.vocab_version, stream.labels = shape, self._vocab_version, None
        stream.centres, stream.keyframe = centres, keyframe

    def _preprocess(self, frames: list[np.ndarray], timers: list[StageTimer]) -> list[dict[str, np.ndarray]]:
        """Each frame at each encoder's input size (RGB); one frame stays in the Preprocessors' buffers."""
        rgbs = []
        for frame, timer in zip(frames, timers):
            with timer("preprocess"):
                self._pre(frame)
                rgbs.append({e: p.rgb if len(frames) == 1 else p.rgb.copy() for e, p in self._pre.encoders.items()})
        return rgbs

    def _warm_segments(
        self, rgbs: list[dict[str, np.ndarray]], streams: list[VideoStream], timers: list[StageTimer]
    ) -> list[SegmentMaps | None]:
        dino = [r["dinov2"] for r in rgbs]
        with _shared(timers, "dinov2"):
            tokens = run_encoder_batch(
                self.engines.dinov2, self._pre["dinov2"], dino, self.manifest.dinov2, "tokens", "DINOv2"
            )
        maps: list[SegmentMaps | None] = []
        for grid, rgb, stream, timer in zip(tokens, dino, streams, timers):
            with timer("kmeans"):
                unit = self._follow(stream, grid)
            m = self._segment_candidates.from_tokens(grid, rgb, stream.centres, timer)
            m.unit, stream.centres = unit, m.centres
            maps.append(m)
        return maps

    @staticmethod
    def _follow(stream: VideoStream, grid: np.ndarray) -> np.ndarray:
        """The frame's unit DINOv2 token rows; where more than CUT_FRACTION of the picture changed since the previous
        frame (a cut, a jump), the stream starts afresh: no warm start, no label history, CLIP on this frame."""
        unit = unit_rows(grid)
        previous, stream.tokens = stream.tokens, unit
        stream.change = (
            changed_fraction(unit, previous) if previous is not None and previous.shape == unit.shape else None
        )
        if stream.change is not None and stream.change > CUT_FRACTION:
            stream.centres, stream.labels, stream.keyframe.expired = None, None, True
        return unit

    def _features(
        self,
        rgbs: list[dict[str, np.ndarray]],
        keyframes: list[Keyframe | None],
        maps: list[SegmentMaps | None],
        timers: list[StageTimer],
    ) -> list[DenseFeatures]:
        """CLIP's features of each frame: the keyframe's where the policy reuses them, else one CLIP run on the rest."""
        plans = [
            self._clip_features.due(k, t, m.unit if m is not None else None) for k, m, t in zip(keyframes, maps, timers)
        ]
        due = [i for i, (d, _) in enumerate(plans) if d]
        grids: dict[int, np.ndarray] = {}
        if due:
            clip = [rgbs[i]["clip"] for i in due]
            with _shared([timers[i] for i in due], "clip"):
                ran = run_encoder_batch(
                    self.engines.clip, self._pre["clip"], clip, self.manifest.clip, "patch_embeddings", "CLIP"
                )
            grids = dict(zip(due, ran))
        features = []
        for i, (keyframe, (_, unit)) in enumerate(zip(keyframes, plans)):
            if i in grids:
                features.append(self._clip_features.keep(keyframe, grids[i], unit))
            else:
                assert keyframe is not None and keyframe.features is not None  # reused only when there is one
                features.append(keyframe.features)
        return features

    def _hysteresis(self, stream: VideoStream) -> LabelHysteresis:
        if stream.labels is None:
            stream.labels = LabelHysteresis(self._free_head.num_segments, self.config.hysteresis)
        return stream.labels


@contextlib.contextmanager
def _shared(timers: list[StageTimer], stage: str) -> Iterator[None]:
    """Time one run that several frames share: each frame's ``stage`` counts all of it."""
    start = time.perf_counter()
    yield
    ms = (time.perf_counter() - start) * 1000
    for timer in timers:
        timer.ms[stage] += ms


def _names(names: list[str] | str, what: str) -> list[str]:
    try:
        listed = load_vocabulary(names) if isinstance(names, str) else list(names)
    except VocabularyError as e:
        raise SegmenterError(str(e)) from None
    clean = list(dict.fromkeys(n.strip() for n in listed if isinstance(n, str) and n.strip()))
    if not clean:
        raise SegmenterError(f"{what} got no class names ({names!r}); give at least one, e.g. ['person', 'chair']")
    return clean
