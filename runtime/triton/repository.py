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
import shutil
import site
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ovseg import __version__

from ..bundle.manifest import read_manifest
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
    idle_seconds: float = 60  # a stream without frames for this long is dropped (Triton's and ovseg's state)
    max_pixels: int = 4096 * 4096  # larger frames are refused
    # Segmenter.from_bundle keyword arguments (backend, threads, trusted_keys), "config" the SegmenterConfig's fields
    segmenter: dict = field(default_factory=dict)
    encoders: str = "python"  # "python": in the Python model; "onnxruntime": on Triton's ONNX Runtime backend (GPU)
    encoder_precision: str = "fp32"  # with "onnxruntime": the bundle's ONNX files of this precision (fp32, fp16)


def write_repository(bundle: Path, repository: Path, config: RepositoryConfig) -> Path:
    """Write the model repository for ``bundle`` into ``repository`` (replacing its ovseg models); returns the model
    directory. The bundle is read first, so a bad bundle fails here rather than in the server's log."""
    if config.idle_seconds <= 0:
        raise ServingError(f"the idle timeout must be > 0 seconds, got {config.idle_seconds}")
    bundle = Path(bundle).expanduser().resolve()
    keys = config.segmenter.get("trusted_keys")
    manifest = read_manifest(bundle, trusted=[Path(k) for k in keys] if keys else None)
    dirs = [*site.getsitepackages(), site.getusersitepackages()]  # where ovseg and its dependencies are, venv first
    dirs = [d for d in dict.fromkeys(dirs) if Path(d).is_dir() and d.startswith(sys.prefix)] or dirs[:1]
    models: dict[str, tuple[str, str | Path]] = {
        MODEL: (model_config(bundle, config), MODEL_PY.format(version=__version__, site_dirs=dirs))
    }
    if config.encoders == "onnxruntime":
        for role, info in (("CLIP image", manifest.clip), ("DINOv2", manifest.dinov2)):
            if config.encoder_precision not in info.files:
                raise ServingError(
                    f"the bundle has no {config.encoder_precision} ONNX file for {info.files}: export it "
                    "(ovseg-export --fp16) or pick another --encoder-precision"
                )
            name = ENCODER_MODELS[role]
            models[name] = (encoder_config(name, config), bundle / info.files[config.encoder_precision])
    repository = Path(repository).expanduser().resolve()
    for name, (pbtxt, model) in models.items():
        shutil.rmtree(repository / name, ignore_errors=True)
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "config.pbtxt").write_text(pbtxt)
        if isinstance(model, Path):
            shutil.copy2(model, repository / name / "1" / "model.onnx")
        else:
            (repository / name / "1" / "model.py").write_text(model)
    return repository / MODEL


def encoder_config(name: str, config: RepositoryConfig) -> str:
    """An image encoder on Triton's ONNX Runtime backend: on the GPU, dynamic batching, TensorRT as ORT's accelerator
    at the encoder precision (engines cached by Triton). Never run here: that backend ships only in NVIDIA's
    containers."""
    return f"""name: "{name}"
backend: "onnxruntime"
max_batch_size: {config.max_batch}
dynamic_batching {{ max_queue_delay_microseconds: {config.queue_delay_us} }}
instance_group [ {{ count: 1 kind: KIND_GPU }} ]
optimization {{ execution_accelerators {{
  gpu_execution_accelerator : [ {{
    name : "tensorrt"
    parameters {{ key: "precision_mode" value: "{config.encoder_precision.upper()}" }}
    parameters {{ key: "trt_engine_cache_enable" value: "1" }}
  }} ]
}} }}
"""


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
