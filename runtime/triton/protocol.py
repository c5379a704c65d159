"""The wire format of ovseg's Triton model, shared by the model and the client.

One request is one frame of one camera stream (the sequence's correlation id). The frame comes as an encoded image
(IMAGE: JPEG/PNG bytes) or as raw pixels (FRAME: uint8 H x W x C, BGR). OPTIONS, a JSON object, is read on every
request; a stream whose options change starts its labels afresh:

    {"classes": ["person", "forklift"] | "voc21" | null,   # guided mode with these classes; null: guidance-free
     "vocabulary": ["pallet", ...] | "PRESET" | null,        # guidance-free vocabulary; null: the bundle's
     "top_k": 3, "threshold": 0.2}

The answer: LABEL_MAP (int32 H x W, segment ids at the frame's size) and SEGMENTS (JSON: the fields of
``ovseg-run --json``: frame, keyframe, change, segments, timings_ms).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ovseg.errors import SegmenterError

MODEL = "ovseg"
IMAGE, FRAME, OPTIONS = "IMAGE", "FRAME", "OPTIONS"
START, END, CORRID = "START", "END", "CORRID"
LABEL_MAP, SEGMENTS = "LABEL_MAP", "SEGMENTS"
MAX_OPTIONS_BYTES = 1 << 20
# With the encoders on Triton's backends: their models, by the role Engines.open opens them as, and their input.
ENCODER_MODELS = {"CLIP image": f"{MODEL}_clip", "DINOv2": f"{MODEL}_dinov2"}
ENCODER_INPUT = "pixel_values"


class ServingError(SegmenterError):
    """A request or a server that cannot be served; the message says what to change."""


def _names(v: object) -> bool:
    return isinstance(v, str) or isinstance(v, list) and all(isinstance(n, str) for n in v)


# Each option's check of a value that is not null, and what the check wants.
_CHECKS = {
    "classes": (_names, "a list of names, a preset name or null"),
    "vocabulary": (_names, "a list of names, a preset name or null"),
    "top_k": (lambda v: type(v) is int, "an integer"),
    "threshold": (lambda v: type(v) in (int, float), "a number"),
}


@dataclass(frozen=True)
class RequestOptions:
    classes: list[str] | str | None = None  # names, or a preset / file name, as Segmenter.set_classes takes them
    vocabulary: list[str] | str | None = None  # as Segmenter.set_vocabulary takes them
    top_k: int | None = None
    threshold: float | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: bytes | str) -> RequestOptions:
        if len(text) > MAX_OPTIONS_BYTES:
            raise ServingError(f"OPTIONS is {len(text)} bytes, the most is {MAX_OPTIONS_BYTES}: send fewer names")
        try:
            raw = json.loads(text) if text else {}
        except (ValueError, UnicodeDecodeError) as e:
            raise ServingError(f'OPTIONS is not JSON ({e}): send an object such as {{"classes": ["person"]}}') from None
        if not isinstance(raw, dict):
            raise ServingError(f"OPTIONS must be a JSON object, got {type(raw).__name__}")
        if set(raw) - set(_CHECKS):
            raise ServingError(f"OPTIONS has unknown keys {sorted(set(raw) - set(_CHECKS))}: use {sorted(_CHECKS)}")
        for key, value in raw.items():
            ok, wanted = _CHECKS[key]
            if value is not None and not ok(value):
                raise ServingError(f"OPTIONS {key} must be {wanted}, got {value!r}"[:300])
        return cls(**raw)
