"""Facts that several parts of ovseg state: one place each, importable without torch, onnxruntime or numpy."""

from __future__ import annotations

import os
from pathlib import Path

# Per-frame stages the Segmenter times, in pipeline order; "refine" runs only with refine=, "keyframe" (the picture's
# change since the last keyframe) only with keyframe_change, "total" is the whole call.
STAGES = ("preprocess", "dinov2", "kmeans", "refine", "keyframe", "clip", "pooling", "lookup", "render", "total")

# hnswlib parameters of a bundle's vocabulary index (cosine space); the lookup section of docs/DESIGN.md has the sweep.
HNSW_PARAMS = {"M": 32, "ef_construction": 200, "ef": 64}

# What the Segmenter runs on and at: "auto" picks (runtime.engines.sessions.resolve_backend,
# runtime.engines.precision.pick_precision).
BACKENDS = ("auto", "cpu", "cuda", "tensorrt")
PRECISIONS = ("auto", "fp32", "fp16", "int8")
NUM_SEGMENTS = 15  # TAG's K: DINOv2 segment candidates per frame
LOOKUPS = ("auto", "exact", "hnsw")  # vocabulary search (runtime/pipeline/lookup.py)
REFINES = ("segments", "edges")  # vote guided logits inside segments; edge-aware upsampling of the score maps

# What a lower precision or another backend must keep against CPU fp32 (ovseg-calib's gate, ovseg-check): the worst
# per-token cosine of every encoder output, and the fraction of segments labelled alike.
DEFAULT_COSINE = 0.98
DEFAULT_AGREEMENT = 0.95

# An image encoder's files key (and file infix: dinov2.int8_symmetric.onnx) of the int8 model TensorRT builds its int8
# plans from (ovseg-calib --tensorrt, then ovseg-build --int8): symmetric int8 activations, explicit Q/DQ. "int8" is
# the CPU's model (uint8 activations), which TensorRT cannot take.
INT8_SYMMETRIC = "int8_symmetric"

# What ovseg-export builds by default (here so that its --help loads no torch).
DEFAULT_CLIP = "ViT-B-16:openai"
DEFAULT_DINOV2 = "facebook/dinov2-small"
DENSE_METHODS = ("pixelclip", "gem", "maskclip")

RANDOM_WEIGHTS_WARNING = (
    "this bundle has random weights: its segments are real, its labels are meaningless (export real weights with "
    "ovseg-export)"
)


def ovseg_home() -> Path:
    """$OVSEG_HOME, else ~/.cache/ovseg: bundles, benchmark caches and engine caches live under it (read per call)."""
    return Path(os.environ.get("OVSEG_HOME") or Path.home() / ".cache" / "ovseg").expanduser()


def default_bundle() -> Path:
    return ovseg_home() / "bundles" / "default"
