"""ONNX facts shared by export, calibration, the runtime and the benchmarks (numpy; onnx and onnxruntime on use)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx
    import onnxruntime

# Ops a projection's result may pass through on its way to a graph output without changing its values.
SHAPE_ONLY_OPS = ("Identity", "Reshape", "Cast", "Squeeze", "Transpose")


def session_options(threads: int | None = None) -> onnxruntime.SessionOptions:
    """The options of every ONNX Runtime session ovseg opens: all graph optimisations, ``threads`` intra-op threads
    (None: ORT's default, every core), ORT's own log quiet (ovseg reports what went wrong itself)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or 0
    options.log_severity_level = 3
    return options


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows (the last axis is the feature axis), in float64."""
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-30)


def output_projections(model: onnx.ModelProto) -> list[str]:
    """The MatMul/Gemm nodes whose results are graph outputs through shape-only ops: CLIP's final projections,
    kept in fp32 by the fp16 export and in float by INT8 calibration."""
    outputs = {o.name for o in model.graph.output}
    producers = {out: node for node in model.graph.node for out in node.output}
    names = []
    for name in outputs:
        node = producers.get(name)
        while node is not None and node.op_type in SHAPE_ONLY_OPS:
            node = producers.get(node.input[0])
        if node is not None and node.op_type in ("MatMul", "Gemm"):
            names.append(node.name)
    return names
