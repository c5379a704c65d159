"""The encoders a Segmenter runs, opened in one place: CLIP's and DINOv2's image encoders on the chosen backend and
precision, and CLIP's text encoder with its tokenizer for names given at run time.

Segmenters of other settings share one ``Engines`` (``Segmenter.with_config``): sessions are the slow part to open.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from ovseg.constants import RANDOM_WEIGHTS_WARNING
from ovseg.errors import SegmenterError, one_line

from ..bundle.manifest import EncoderInfo, Manifest
from ..engines.engine import BatchEngine, Engine, open_engine
from ..engines.precision import pick_precision
from ..engines.sessions import OnnxEncoder, resolve_backend, session_plan
from .lookup import PromptEmbedder
from .preprocess import Preprocessor
from .text import ClipTokenizer

log = logging.getLogger("ovseg")
ImageEncoderFactory = Callable[[EncoderInfo, str, str], Engine]


@dataclass
class Engines:
    clip: Engine  # pixel_values -> patch_embeddings (1, gh * gw, D)
    dinov2: Engine  # pixel_values -> tokens (1, h * w, Dd)
    embedder: PromptEmbedder  # names -> prompt-ensembled text embeddings
    backend: str  # "cpu", "cuda" or "tensorrt": what the image encoders run on, as ONNX Runtime reports it
    precision: str  # of the image encoders: what "auto" resolved to

    @classmethod
    def open(
        cls,
        bundle_dir: Path,
        manifest: Manifest,
        backend: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        image_encoder: ImageEncoderFactory | None = None,
    ) -> Engines:
        """``threads``: ONNX Runtime's intra-op threads per session (None: every core on the CPU backend, one on a GPU
        backend); nothing process-wide changes. ``image_encoder(info, role, output)`` opens CLIP's and DINOv2's image
        encoders in place of ONNX Runtime sessions (Triton's encoder models; ``backend`` and ``precision`` are then
        what they run on, as given).
        A bundle with random weights is said once per opening (Segmenters sharing these engines do not repeat it)."""
        text_backend = "cpu" if image_encoder is not None else None  # beside served encoders: the text one here
        if image_encoder is None:
            backend = resolve_backend(backend)
            precision = pick_precision(manifest, backend, precision)

            def image_encoder(info: EncoderInfo, role: str, output: str) -> Engine:
                return open_engine(
                    bundle_dir, info, role, backend, precision, threads, outputs=(output,), digests=manifest.sha256
                )

        with contextlib.ExitStack() as opened:  # closes what opened when a later part fails
            clip = image_encoder(manifest.clip, "CLIP image", "patch_embeddings")
            opened.callback(clip.close)
            dinov2 = image_encoder(manifest.dinov2, "DINOv2", "tokens")
            opened.callback(dinov2.close)
            embedder = open_embedder(bundle_dir, manifest, text_backend or backend, threads)
            opened.pop_all()
        if manifest.random_weights:
            log.warning("%s: %s", bundle_dir, RANDOM_WEIGHTS_WARNING)
        return cls(clip, dinov2, embedder, clip.backend, precision)

    def close(self) -> None:
        for engine in (self.clip, self.dinov2, self.embedder.encoder):
            engine.close()


def open_embedder(
    bundle_dir: Path, manifest: Manifest, backend: str = "cpu", threads: int | None = None
) -> PromptEmbedder:
    """The bundle's text encoder, run only when names change: in fp32, next to the exported embeddings; on CUDA
    when the image encoders run on a GPU backend, else on the CPU."""
    path = bundle_dir / manifest.text.tokenizer
    try:
        tokenizer = ClipTokenizer.from_file(path, manifest.text.context_length)
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        raise SegmenterError(
            f"bundle file {path} is not a CLIP tokenizer ({one_line(e)}): re-export the bundle with "
            "`ovseg-export --force`"
        ) from None
    encoder = OnnxEncoder(bundle_dir / manifest.text.files["fp32"], session_plan(backend, threads=threads))
    return PromptEmbedder(encoder, tokenizer)


def run_encoder(engine: Engine, pre: Preprocessor, info: EncoderInfo, output: str, role: str) -> np.ndarray:
    """The frame ``pre`` holds (at ``info.image_size``) through an image encoder: its ``output`` as a (rows, cols, D)
    float32 grid."""
    return run_encoder_batch(engine, pre, [pre.rgb], info, output, role)[0]


def run_encoder_batch(
    engine: Engine, pre: Preprocessor, rgbs: list[np.ndarray], info: EncoderInfo, output: str, role: str
) -> list[np.ndarray]:
    """Frames at ``info.image_size`` (RGB uint8) through an image encoder: each one's ``output`` as a (rows, cols, D)
    float32 grid. One frame goes through the engine's preallocated input; several go in runs of as many frames as the
    engine takes (``max_batch``: any number for ONNX Runtime on the CPU and Triton's encoder models, one for GPU
    sessions and TensorRT plans, whose batch axis is fixed)."""
    if len(rgbs) == 1 or getattr(engine, "max_batch", 1) == 1:
        outputs = []
        for rgb in rgbs:
            pre.normalise(engine.input, info.mean, info.std, rgb)
            outputs.append(_grid(engine.run().get(output), 1, info, output, role)[0])
        return outputs
    size = cast(BatchEngine, engine).max_batch or len(rgbs)
    grids: list[np.ndarray] = []
    for start in range(0, len(rgbs), size):
        chunk = rgbs[start : start + size]
        batch = np.empty((len(chunk), *engine.input.shape[1:]), np.float32)
        for i, rgb in enumerate(chunk):
            pre.normalise(batch[i : i + 1], info.mean, info.std, rgb)
        grids.extend(_grid(cast(BatchEngine, engine).run(batch).get(output), len(chunk), info, output, role))
    return grids


def _grid(x: np.ndarray | None, n: int, info: EncoderInfo, output: str, role: str) -> np.ndarray:
    rows, cols = info.grid
    if x is None or x.ndim != 3 or x.shape[0] != n or x.shape[1] != rows * cols:
        got = None if x is None else x.shape
        raise SegmenterError(
            f"the {role} encoder returned {output} {got}, the manifest says ({n}, {rows * cols}, D): re-export the bundle"
        )
    return np.ascontiguousarray(x, dtype=np.float32).reshape(n, rows, cols, -1)
