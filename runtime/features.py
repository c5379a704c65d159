"""CLIP dense features: the frame's patch embeddings, or between keyframes those of the last keyframe.

With keyframe_interval=N a stream runs CLIP on every N-th frame; in between the segments keep moving with DINOv2
and are named from the keyframe's features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bundle import EncoderInfo
from .engines import run_encoder
from .preprocess import Preprocessor
from .result import StageTimer
from .sessions import Engine


@dataclass
class DenseFeatures:
    grid: np.ndarray  # (gh, gw, D) float32 CLIP patch embeddings as the encoder returns them (not normalised)


@dataclass
class Keyframe:
    """A stream's last CLIP pass and how many frames have used it."""

    features: DenseFeatures | None = None
    uses: int = 0


class ClipFeatures:
    def __init__(self, clip: Engine, info: EncoderInfo, pre: Preprocessor, keyframe_interval: int):
        self.clip, self.info, self.pre = clip, info, pre
        self.keyframe_interval = keyframe_interval

    def __call__(self, keyframe: Keyframe | None, timer: StageTimer) -> DenseFeatures:
        """The preprocessed frame's features; with a ``keyframe``, its features until keyframe_interval frames used them."""
        if keyframe is not None and keyframe.features is not None and keyframe.uses < self.keyframe_interval:
            keyframe.uses += 1
            return keyframe.features
        with timer("clip"):
            features = DenseFeatures(run_encoder(self.clip, self.pre, self.info, "patch_embeddings", "CLIP"))
        if keyframe is not None:
            keyframe.features, keyframe.uses = features, 1
        return features
