"""TensorRT INT8 plans: not built by ovseg-calib.

TensorRT 11 removed implicit INT8 calibration (``IInt8*Calibrator``, ``BuilderFlag.INT8``; deprecated in 10): its
INT8 plans come from explicitly quantised models (Q/DQ) with symmetric int8 activations. The int8 model ovseg-calib
writes is ONNX Runtime's CPU model (asymmetric uint8 activations), so no plan is built from it; where tensorrt is
installed this is said, and TensorRT runs the fp16 plans of ``ovseg-build --fp16``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np

INT8_PLANS_MISSING = (
    "no TensorRT int8 plans: TensorRT needs a model with symmetric int8 activations, the int8 model written here is "
    "for the CPU (uint8 activations); on the GPU build fp16 plans with `ovseg-build --fp16`"
)


def build_int8_plans(
    d: Path,
    files: dict[str, dict[str, str]],
    frames: dict[str, np.ndarray],
    image_size: int,
    reuse_cache: dict[str, bool],
    say: Callable[[str], None],
) -> dict[str, str]:
    """Role -> TensorRT INT8 plan: none (module docstring); said where tensorrt is installed."""
    if importlib.util.find_spec("tensorrt") is not None:
        say(INT8_PLANS_MISSING)
    return {}
