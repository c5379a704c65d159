"""A bundle -> a Triton model repository: ``<repository>/ovseg/config.pbtxt`` and ``<repository>/ovseg/1/model.py``.

With ``encoders="onnxruntime"`` (GPU nodes) the two image encoders are models of their own on Triton's ONNX Runtime
backend (``ovseg_clip``, ``ovseg_dinov2``), batched by Triton's dynamic batcher, and the Python model calls them
(business logic scripting) and keeps k-means, pooling and lookup. That variant needs NVIDIA's Triton container.

The config maps the Segmenter's video state onto Triton's sequence batcher (correlation id = camera stream;
START / END / CORRID as control inputs; idle streams dropped after ``idle_seconds``) with the "oldest" strategy, so
frames of several streams that wait together reach the model as one batch. model.py imports ovseg's model
(model.py in this package) from the environment the repository was written in.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ovseg import __version__

from ..bundle.manifest import BundleError, EncoderInfo, Manifest, read_manifest
from .protocol import (
    CORRID,
    ENCODER_MODELS,
    END,
    FRAME,
    IMAGE,
    LABEL_MAP,
    MODEL,
    OPTIONS,
    SEGMENTS,
    START,
    ServingError,
)

ENCODER_PLACES = ("python", "onnxruntime")
MODEL_PY = '''"""ovseg {version}: the Segmenter on Triton's Python backend (ovseg.runtime.triton.model); written by ovseg-serve."""

import site

for _dir in {site_dirs!r}:  # the environment ovseg-serve ran in: ovseg and its dependencies
    site.addsitedir(_dir)

from ovseg.runtime.triton.model import TritonPythonModel  # noqa: E402,F401
'''


@dataclass
class RepositoryConfig:
    instances: int = 1  # model instances (each a Segmenter with its own encoder sessions)
    max_batch: int = 8  # frames of different streams run through the encoders together
    max_streams: int = 64  # streams served at once, per instance
    queue_delay_us: int = 2000  # how long a frame may wait for others to join its batch
    idle_seconds: float = 60.0  # a stream without frames for this long is dropped (Triton's and ovseg's state)
    max_pixels: int = 4096 * 4096  # larger frames are refused
    # Segmenter.from_bundle keyword arguments (backend, threads, trusted_keys), "config" the SegmenterConfig's fields
    segmenter: dict = field(default_factory=dict)
    encoders: str = "python"  # "python": in the Python model; "onnxruntime": on Triton's ONNX Runtime backend (GPU)
    encoder_precision: str = "fp32"  # with "onnxruntime": the bundle's ONNX files of this precision (fp32, fp16)

    def check(self) -> None:
        if min(self.instances, self.max_batch, self.max_streams, self.max_pixels) < 1 or self.queue_delay_us < 0:
            raise ServingError("instances, max batch, max streams and max pixels must be >= 1, queue delay >= 0")
        if self.encoders not in ENCODER_PLACES:
            raise ServingError(f"encoders go in one of {', '.join(ENCODER_PLACES)}, got {self.encoders!r}")
        if self.idle_seconds <= 0:
            raise ServingError(f"the idle timeout must be > 0 seconds, got {self.idle_seconds}")


def write_repository(bundle: Path, repository: Path, config: RepositoryConfig) -> Path:
    """Write the model repository for ``bundle`` into ``repository`` (replacing its ovseg model); returns the model
    directory. The bundle is read first, so a bad bundle fails here rather than in the server's log."""
    config.check()
    bundle = Path(bundle).expanduser().resolve()
    try:
        keys = config.segmenter.get("trusted_keys")
        manifest = read_manifest(bundle, trusted=[Path(k) for k in keys] if keys else None)
    except BundleError as e:
        raise ServingError(str(e)) from None
    repository = Path(repository).expanduser().resolve()
    repository.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL}-", dir=repository))
    (tmp / "1").mkdir()
    (tmp / "config.pbtxt").write_text(model_config(bundle, config))
    (tmp / "1" / "model.py").write_text(MODEL_PY.format(version=__version__, site_dirs=site_dirs()))
    target = repository / MODEL
    if config.encoders == "onnxruntime":
        for name, info in encoder_models(manifest).values():
            write_encoder_model(repository / name, bundle, info, config)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def encoder_models(manifest: Manifest) -> dict[str, tuple[str, EncoderInfo]]:
    """The image encoders' Triton model names and bundle records, by the role Engines.open opens them as."""
    return {
        "CLIP image": (ENCODER_MODELS["CLIP image"], manifest.clip),
        "DINOv2": (ENCODER_MODELS["DINOv2"], manifest.dinov2),
    }


def write_encoder_model(model_dir: Path, bundle: Path, info: EncoderInfo, config: RepositoryConfig) -> None:
    """An image encoder on Triton's ONNX Runtime backend: on the GPU, dynamic batching, TensorRT as ORT's accelerator
    at the encoder precision (engines cached by Triton). Never run here: that backend ships only in NVIDIA's
    containers."""
    source = info.files.get(config.encoder_precision)
    if source is None:
        raise ServingError(
            f"the bundle has no {config.encoder_precision} ONNX file for {info.files}: export it (ovseg-export --fp16) "
            "or pick another --encoder-precision"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}-", dir=model_dir.parent))
    (tmp / "1").mkdir()
    shutil.copy2(bundle / source, tmp / "1" / "model.onnx")
    mode = "FP16" if config.encoder_precision == "fp16" else "FP32"
    (tmp / "config.pbtxt").write_text(f"""name: "{model_dir.name}"
backend: "onnxruntime"
max_batch_size: {config.max_batch}
dynamic_batching {{ max_queue_delay_microseconds: {config.queue_delay_us} }}
instance_group [ {{ count: 1 kind: KIND_GPU }} ]
optimization {{ execution_accelerators {{
  gpu_execution_accelerator : [ {{
    name : "tensorrt"
    parameters {{ key: "precision_mode" value: "{mode}" }}
    parameters {{ key: "trt_engine_cache_enable" value: "1" }}
  }} ]
}} }}
""")
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(tmp, model_dir)


def site_dirs() -> list[str]:
    """Where this interpreter finds ovseg and its dependencies (a venv's site-packages first)."""
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir() and d.startswith(sys.prefix)] or dirs[:1]


def model_config(bundle: Path, config: RepositoryConfig) -> str:
    preferred = ", ".join(str(b) for b in (2, 4, 8, 16, 32) if b <= config.max_batch)
    params = {
        "bundle": str(bundle),
        "segmenter": json.dumps(config.segmenter, sort_keys=True),
        "idle_seconds": repr(config.idle_seconds),
        "max_pixels": str(config.max_pixels),
        "encoders": config.encoders,
        "encoder_precision": config.encoder_precision,
    }
    parameters = ",\n".join(
        f"  {{ key: {json.dumps(k)} value: {{ string_value: {json.dumps(v)} }} }}" for k, v in params.items()
    )
    return f"""name: "{MODEL}"
backend: "python"
max_batch_size: {config.max_batch}
input [
  {{ name: "{IMAGE}" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "{FRAME}" data_type: TYPE_UINT8 dims: [ -1, -1, -1 ] optional: true allow_ragged_batch: true }},
  {{ name: "{OPTIONS}" data_type: TYPE_STRING dims: [ 1 ] optional: true }}
]
output [
  {{ name: "{LABEL_MAP}" data_type: TYPE_INT32 dims: [ -1, -1 ] }},
  {{ name: "{SEGMENTS}" data_type: TYPE_STRING dims: [ 1 ] }}
]
sequence_batching {{
  max_sequence_idle_microseconds: {int(config.idle_seconds * 1e6)}
  oldest {{
    max_candidate_sequences: {config.max_streams}
    preferred_batch_size: [ {preferred or 1} ]
    max_queue_delay_microseconds: {config.queue_delay_us}
  }}
  control_input [
    {{ name: "{START}" control [ {{ kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "{END}" control [ {{ kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "{CORRID}" control [ {{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 }} ] }}
  ]
}}
instance_group [ {{ count: {config.instances} kind: KIND_CPU }} ]
parameters [
{parameters}
]
"""
