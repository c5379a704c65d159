"""Lower-precision variants of an exported ONNX model."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

from ovseg.onnx_helpers import output_projections

from .onnx_io import IR_VERSION

# ViTs lose accuracy when these run in fp16: LayerNorm statistics, softmax over long rows, L2 norms.
FP32_OPS = ["LayerNormalization", "Softmax", "ReduceL2", "ReduceMean", "Pow"]


def to_fp16(src: Path, dst: Path) -> Path:
    """fp16 weights and activations, with FP32_OPS and the output projections kept in fp32; fp32 inputs/outputs."""
    model = onnx.load(str(src))
    fp16 = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=FP32_OPS, node_block_list=output_projections(model)
    )
    drop_duplicate_casts(fp16.graph)
    sort_nodes(fp16.graph)
    fp16.ir_version = IR_VERSION
    onnx.checker.check_model(fp16, full_check=True)
    onnx.save(fp16, str(dst))
    return dst


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Put nodes in topological order (the fp16 converter appends its input casts at the end)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [all(i in available for i in n.input) for n in pending]
        if not any(ready):
            raise ValueError("ONNX graph has a cycle or a dangling input")
        for node, ok in zip(pending, ready):
            if ok:
                available.update(node.output)
                ordered.append(node)
        pending = [n for n, ok in zip(pending, ready) if not ok]
    del graph.node[:]
    graph.node.extend(ordered)


def drop_duplicate_casts(graph: onnx.GraphProto) -> None:
    """The fp16 converter emits one Cast per use of a shared fp32-kept weight, all with the same output name."""
    seen: dict[str, onnx.NodeProto] = {}
    keep = []
    for node in graph.node:
        first = seen.get(node.output[0]) if node.op_type == "Cast" else None
        if first is not None and first.input == node.input and first.attribute == node.attribute:
            continue
        seen.update({out: node for out in node.output})
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
