"""SegmenterConfig: how a Segmenter runs, one object, checked once (``resolve``) against a profile. No onnxruntime:
ovseg-run builds one before it knows whether the Segmenter is local or on a server."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..constants import LOOKUPS, PRECISIONS, REFINES
from ..errors import OvsegError, SegmenterError
from ..profiles import get_profile
from .pipeline.features import KeyframePolicy


@dataclass
class SegmenterConfig:
    """How a Segmenter runs. ``precision``, ``num_segments`` and the keyframe policy left as None come from ``profile``
    (``ovseg.profiles``; None: the one the bundle was exported as); ``seg.config`` holds what was chosen."""

    profile: str | None = None
    precision: str | None = None  # "auto" | "fp32" | "fp16" | "int8" (ovseg.runtime.engines.precision)
    num_segments: int | None = None  # K, segment candidates per frame
    keyframe_interval: int | None = None  # CLIP at least every N-th frame; the segments move with DINOv2 in between
    keyframe_change: float | None = None  # and as soon as this fraction of the picture changed since the keyframe
    top_k: int = 3  # labels looked up per segment: the best and top_k - 1 alternatives
    score_threshold: float | None = None  # below it a segment is "unknown"
    refine: str | None = None  # None | "segments" (guided) | "edges" (both modes)
    hysteresis: int = 3  # frames a new label must win in a row before a segment takes it
    lookup: str = "auto"  # vocabulary search: "auto" | "exact" | "hnsw" (pipeline/lookup.py)
    ef: int | None = None  # HNSW search breadth (None: the bundle's)
    seed: int = 0  # k-means++ seeding of the first frame
    kmeans_iters: int = 10

    def resolve(self, bundle_profile: str) -> SegmenterConfig:
        """This config with what it leaves to the profile filled in from it, checked; SegmenterError (one line) for
        what cannot run. The profile's keyframe change applies only where the interval lets keyframes be skipped (a
        given ``keyframe_interval=1`` means CLIP on every frame)."""
        try:
            profile = get_profile(self.profile or bundle_profile)
        except OvsegError as e:
            raise SegmenterError(str(e)) from None
        k = self.num_segments if self.num_segments is not None else profile.num_segments
        interval = self.keyframe_interval if self.keyframe_interval is not None else profile.keyframe_interval
        change = self.keyframe_change
        if change is None and interval > 1:
            change = profile.keyframe_change
        precision = self.precision or profile.precision
        if precision not in PRECISIONS:
            raise SegmenterError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        if k < 1 or self.top_k < 1 or self.hysteresis < 0:
            raise SegmenterError(
                f"num_segments and top_k must be >= 1 and hysteresis >= 0, got {k}, {self.top_k}, {self.hysteresis}"
            )
        if self.refine is not None and self.refine not in REFINES:
            raise SegmenterError(f"unknown refine {self.refine!r}: choose None, 'segments' or 'edges'")
        if self.lookup not in LOOKUPS:
            raise SegmenterError(f"unknown lookup {self.lookup!r}: choose one of {', '.join(LOOKUPS)}")
        KeyframePolicy(interval, change).check()
        return replace(
            self,
            profile=profile.name,
            precision=precision,
            num_segments=k,
            keyframe_interval=interval,
            keyframe_change=change,
        )

    @property
    def keyframes(self) -> KeyframePolicy:
        return KeyframePolicy(self.keyframe_interval or 1, self.keyframe_change)
