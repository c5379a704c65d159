"""Profiles: one name for what a bundle is exported as and how it runs, stated once here.

``ovseg-export --profile NAME`` takes the CLIP model and both encoders' input sizes from the profile and records its
name in the manifest; the Segmenter (``Segmenter.from_bundle``, ``ovseg-run``, ``ovseg-eval``) takes K, the keyframe
policy and the precision from the bundle's profile wherever the caller leaves them unset. ``accurate`` is what ovseg
did before profiles existed (TAG's 448 and K=15, CLIP on every frame), and what a bundle without a recorded profile
runs as. The "Choosing a profile" table of docs/commands.md has the measurements behind the other two.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import DEFAULT_CLIP, NUM_SEGMENTS
from .errors import OvsegError


@dataclass(frozen=True)
class Profile:
    name: str
    clip: str  # open_clip MODEL:PRETRAINED (ovseg-export --clip)
    clip_size: int  # CLIP's square input side (ovseg-export --clip-size)
    dinov2_size: int  # DINOv2's (ovseg-export --dinov2-size)
    num_segments: int  # K (Segmenter num_segments, --segments)
    keyframe_interval: int  # CLIP at least every N-th frame (--keyframe-interval)
    keyframe_change: float | None  # and as soon as this fraction of the picture changed (--keyframe-change)
    # "auto": on a CPU int8 only where ovseg-calib's gate passed and measured a speed-up on this machine (docs/commands.md, INT8)
    precision: str

    def describe(self) -> str:
        """One line for --help: what the profile picks."""
        keyframes = (
            "CLIP on every frame"
            if self.keyframe_interval == 1
            else f"CLIP every {self.keyframe_interval}th frame"
            + (f" or once {self.keyframe_change:g} of the picture changed" if self.keyframe_change is not None else "")
        )
        return (
            f"{self.name}: {self.clip} at {self.clip_size}, DINOv2 at {self.dinov2_size}, K={self.num_segments}, "
            f"{keyframes}, precision {self.precision}"
        )


ACCURATE = Profile(
    name="accurate",
    clip=DEFAULT_CLIP,
    clip_size=448,
    dinov2_size=448,
    num_segments=NUM_SEGMENTS,
    keyframe_interval=1,
    keyframe_change=None,
    precision="auto",
)
# CLIP at the size its ViT-B/16 weights were trained at; DINOv2 at 24x24 tokens. A still camera costs one CLIP pass
# in 10 frames; a tenth of the picture changing calls one at once.
BALANCED = Profile(
    name="balanced",
    clip=DEFAULT_CLIP,
    clip_size=224,
    dinov2_size=336,
    num_segments=NUM_SEGMENTS,
    keyframe_interval=10,
    keyframe_change=0.1,
    precision="auto",
)
# ViT-B/32 at its training size (49 patches against accurate's 784), DINOv2 at 16x16 tokens.
FAST = Profile(
    name="fast",
    clip="ViT-B-32:openai",
    clip_size=224,
    dinov2_size=224,
    num_segments=NUM_SEGMENTS,
    keyframe_interval=30,
    keyframe_change=0.1,
    precision="auto",
)

PROFILES = {p.name: p for p in (ACCURATE, BALANCED, FAST)}
DEFAULT_PROFILE = ACCURATE.name


def get_profile(name: str | None) -> Profile:
    """The profile called ``name`` (None: the default); a one-line OvsegError for any other name."""
    if name is None:
        return PROFILES[DEFAULT_PROFILE]
    try:
        return PROFILES[name]
    except KeyError:
        raise OvsegError(f"unknown profile {name!r}: choose one of {', '.join(PROFILES)}") from None
