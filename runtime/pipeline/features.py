"""CLIP dense features: the frame's patch embeddings, or between keyframes those of the last keyframe.

A stream runs CLIP on a keyframe and reuses its features until the policy (``KeyframePolicy``) calls the next one: at
the latest after ``interval`` frames, and, with ``change``, as soon as that fraction of the picture has changed since
the keyframe. In between, the segments keep moving with DINOv2 (warm-started k-means) and are named from the
keyframe's features.

The change is measured on DINOv2's tokens, which every frame computes anyway: the fraction of token cells whose token
has turned away from the same cell's token at the keyframe (cosine under ``CHANGED_COSINE``). It is close to the
fraction of the picture that shows something new: an object that appears, moves or leaves, a cut, a pan
(docs/DESIGN.md, "Keyframes by change").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ovseg.errors import SegmenterError

from ..result import StageTimer

# A token cell has changed when its cosine with the same cell at the keyframe is under this: sensor noise and JPEG
# stay above 0.9, a cell that now shows another object or floor falls below 0.5 (docs/DESIGN.md, "Keyframes by change").
CHANGED_COSINE = 0.7
# A stream starts afresh (no k-means warm start, no label history, a new keyframe) when more than this fraction of the
# picture changed since the previous frame: a cut or a jump (docs/DESIGN.md, "Keyframes by change").
CUT_FRACTION = 0.25


@dataclass
class DenseFeatures:
    grid: np.ndarray  # (gh, gw, D) float32 CLIP patch embeddings as the encoder returns them (not normalised)


@dataclass
class Keyframe:
    """A stream's last CLIP pass: its features, how many frames have used them, and (with a change policy) the
    L2-normalised DINOv2 tokens of that frame."""

    features: DenseFeatures | None = None
    uses: int = 0
    tokens: np.ndarray | None = None  # (h * w, Dd)
    fresh: bool = False  # the current frame ran CLIP
    expired: bool = False  # the picture was cut since: the next frame runs CLIP whatever the policy
    change: float | None = None  # the current frame's changed fraction since the keyframe; None when not measured


@dataclass(frozen=True)
class KeyframePolicy:
    """When CLIP runs: at least every ``interval`` frames and, with ``change``, whenever more than that fraction of the
    picture has changed since the last keyframe. ``interval=1``: every frame (nothing is measured)."""

    interval: int = 1
    change: float | None = None

    def check(self) -> None:
        if self.interval < 1:
            raise SegmenterError(f"keyframe_interval must be >= 1 (CLIP at least every N frames), got {self.interval}")
        if self.change is not None and not 0.0 <= self.change <= 1.0:
            raise SegmenterError(f"keyframe_change must be a fraction of the picture in [0, 1], got {self.change}")
        if self.change is not None and self.interval == 1:
            raise SegmenterError(
                "keyframe_change needs keyframe_interval > 1, the most frames between CLIP passes (e.g. 30): with 1, "
                "CLIP runs on every frame"
            )

    @property
    def measures(self) -> bool:
        return self.change is not None

    def due(self, keyframe: Keyframe, tokens: np.ndarray | None) -> bool:
        """Whether this frame is a keyframe; records the measured change in ``keyframe.change``. ``tokens``: this
        frame's L2-normalised DINOv2 tokens (h * w, Dd), needed when the policy measures change."""
        keyframe.change = None
        if keyframe.features is None or keyframe.uses >= self.interval:
            return True
        if not self.measures:
            return False
        if tokens is None or keyframe.tokens is None or tokens.shape != keyframe.tokens.shape:
            return True
        keyframe.change = changed_fraction(tokens, keyframe.tokens)
        assert self.change is not None  # measures
        return keyframe.change > self.change


def unit_rows(tokens: np.ndarray) -> np.ndarray:
    """(h, w, Dd) or (N, Dd) tokens as (N, Dd) rows of length 1 (zero rows stay zero)."""
    rows = tokens.reshape(-1, tokens.shape[-1])
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def changed_fraction(tokens: np.ndarray, reference: np.ndarray) -> float:
    """The fraction of cells whose unit token in ``tokens`` has a cosine under CHANGED_COSINE with ``reference``'s."""
    cosines = np.einsum("nd,nd->n", tokens, reference)
    return float(np.count_nonzero(cosines < CHANGED_COSINE)) / len(cosines)


class ClipFeatures:
    """Which frames run CLIP (the Segmenter runs them, batched), and the features each frame is named from."""

    def __init__(self, policy: KeyframePolicy):
        self.policy = policy

    def due(
        self, keyframe: Keyframe | None, timer: StageTimer, unit: np.ndarray | None = None
    ) -> tuple[bool, np.ndarray | None]:
        """Whether the frame needs CLIP (always without a ``keyframe``), and the unit DINOv2 token rows the policy
        measured change on (for ``keep``). A frame that reuses the keyframe's features counts as one more use.
        ``unit``: this frame's L2-normalised DINOv2 tokens (h * w, Dd), for a policy that measures change."""
        if keyframe is None:
            return True, None
        measured = unit if self.policy.measures else None
        if measured is not None:
            with timer("keyframe"):
                due = self.policy.due(keyframe, measured)
        else:
            due = self.policy.due(keyframe, None)
        due, keyframe.expired = due or keyframe.expired, False
        keyframe.fresh = due
        if not due:
            keyframe.uses += 1
        return due, measured

    def keep(self, keyframe: Keyframe | None, grid: np.ndarray, unit: np.ndarray | None) -> DenseFeatures:
        """CLIP's ``grid`` (rows, cols, D) of a frame that ``due`` called a keyframe, recorded as the ``keyframe``'s."""
        features = DenseFeatures(grid)
        if keyframe is not None:
            keyframe.features, keyframe.uses, keyframe.tokens = features, 1, unit
        return features
