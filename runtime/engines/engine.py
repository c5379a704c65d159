"""Inference engines: what every engine offers (``Engine``), and which one an image encoder gets: its native
TensorRT plan (engines.tensorrt) when there is one for this device and TensorRT imports, else an ONNX Runtime session
(engines.sessions).

Every engine is created once and owns its input buffer: the preprocessor writes the next frame into
``engine.input`` and ``engine.run()`` returns the outputs by name (arrays the caller may keep).
What is asked for and not available (a provider, a precision file) is a one-line SegmenterError, and so is a session
that ONNX Runtime opened on another provider than the one asked for: nothing falls back silently. ``engine.backend``
is the backend the engine runs on, as ONNX Runtime reports it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ovseg.environment import tensorrt_fix
from ovseg.errors import SegmenterError

from ..bundle.manifest import EncoderInfo, sha256_file
from .device import this_device
from .precision import refuse_cuda_int8
from .sessions import OnnxEncoder, open_trt_cache, session_plan, stdout_to_stderr, trt_cache_dir
from .tensorrt import TensorRTEngine, tensorrt_importable

log = logging.getLogger("ovseg")


class Engine(Protocol):
    input: np.ndarray  # preallocated (1, 3, S, S) float32, written by the preprocessor
    backend: str  # what it runs on

    def run(self) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class BatchEngine(Engine, Protocol):
    """An Engine whose ``run(x)`` also takes a batch of inputs (N, 3, S, S) of at most ``max_batch`` frames (None:
    any number)."""

    max_batch: int | None

    def run(self, x: np.ndarray | None = None) -> dict[str, np.ndarray]: ...


def open_engine(
    bundle_dir: Path,
    info: EncoderInfo,
    role: str,
    backend: str,
    precision: str,
    threads: int | None,
    *,
    outputs: Sequence[str] | None = None,
    digests: Mapping[str, str] | None = None,
) -> OnnxEncoder | TensorRTEngine:
    """The engine for one image encoder at its input size: a native TensorRT plan when there is one and TensorRT
    imports, else ONNX Runtime.

    ``outputs``: the outputs the caller reads (None: all); ``digests``: the manifest's sha256 per file, for the
    TensorRT provider's cache key (else the file is hashed here)."""
    image_size = info.image_size
    shape = (1, 3, image_size, image_size)
    refuse_cuda_int8(backend, precision)
    plan = info.files.get(f"trt_{precision}")
    if backend == "tensorrt" and plan and tensorrt_importable():
        record = info.plans.get(f"trt_{precision}")  # where the plan was built: a plan without a record is tried
        if record is None or record.fits(this_device()):
            with stdout_to_stderr():
                return TensorRTEngine(bundle_dir / plan, shape, outputs)
        log.warning(
            "%s was built for %s; this is %s: skipped, so TensorRT's execution provider runs instead; `ovseg-build` "
            "here builds one",
            plan,
            record.device,
            this_device(),
        )
        plan = None
    if backend == "tensorrt" and precision == "int8":  # the EP cannot take the CPU's uint8 Q/DQ model, nor calibrate
        raise SegmenterError(
            f"int8 on TensorRT runs the {role} encoder's int8 plan, and "
            + (
                "the bundle has none for this device: `ovseg-calib --tensorrt` makes their model, `ovseg-build --int8` "
                "here builds them; or use precision='fp16'"
                if not plan
                else f"the tensorrt package does not import here: {tensorrt_fix()}"
            )
        )
    # the TensorRT EP builds its own fp16 engine from the fp32 graph
    onnx_file = info.files.get("fp32" if backend == "tensorrt" else precision)
    if onnx_file is None:
        raise SegmenterError(
            f"the bundle has only {', '.join(sorted(info.files))} for the {role} encoder, not an ONNX {precision} file: "
            f"re-export with `ovseg-export --{precision}`"
        )
    path = bundle_dir / onnx_file
    cache = None
    if backend == "tensorrt":
        cache = trt_cache_dir((digests or {}).get(onnx_file) or sha256_file(path), precision)
        open_trt_cache(cache, f"the {role} encoder ({precision})")
    return OnnxEncoder(path, session_plan(backend, precision, threads, image_size, cache), shape, outputs=outputs)
