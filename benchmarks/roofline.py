"""Roofline: the encoders' FLOPs per frame, counted from their ONNX graphs, against a GEMM peak measured here.

FLOPs are 2 per multiply-add of every MatMul, Gemm and Conv (shapes from ONNX Runtime's symbolic
shape inference with the batch fixed to 1); softmax, normalisation and activations are not counted, so the
achieved rate is a slight underestimate of the work done. The peak is one ONNX Runtime MatMul of
two n x n fp32 matrices on the same thread count, timed in the same loop as the encoders.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ovseg.onnx_helpers import session_options

from .timing import Stats

GEMM_SIZE = 2048  # large enough that packing and threading overheads are a few percent of the product


@dataclass
class FlopCount:
    """Multiply-add work of one encoder at batch 1."""

    file: str
    gflop: float
    by_op: dict[str, float] = field(default_factory=dict)  # op type -> GFLOP
    nodes: int = 0  # MatMul/Gemm/Conv nodes counted
    unresolved: list[str] = field(default_factory=list)  # nodes whose shapes inference could not give


def _dims(value_info) -> list[int] | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return None if any(d is None for d in dims) else dims


def count_flops(path: str | Path, image_size: int) -> FlopCount:
    """FLOPs of the ONNX model at ``path`` for one (1, 3, S, S) image.

    Shapes come from ONNX Runtime's symbolic shape inference, which follows the Shape/Reshape
    arithmetic of attention that plain ONNX shape inference leaves unknown.
    """
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(path))
    for graph_input in model.graph.input:
        for d, value in zip(graph_input.type.tensor_type.shape.dim, (1, 3, image_size, image_size)):
            d.Clear()
            d.dim_value = value
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes: dict[str, list[int] | None] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        shapes[vi.name] = _dims(vi)
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    count = FlopCount(Path(path).name, 0.0)
    for node in inferred.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        out = shapes.get(node.output[0])
        if a is None or b is None or out is None:
            count.unresolved.append(node.name or node.op_type)
            continue
        if node.op_type == "Conv":
            groups = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
            flops = 2 * int(np.prod(out)) * (a[1] // groups) * int(np.prod(b[2:]))
        elif node.op_type == "Gemm":
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            k = a[0] if trans_a else a[1]
            flops = 2 * int(np.prod(out)) * k
        else:
            flops = 2 * int(np.prod(out)) * a[-1]  # out (..., m, n), contraction over A's last axis
        count.nodes += 1
        count.by_op[node.op_type] = count.by_op.get(node.op_type, 0.0) + flops / 1e9
        count.gflop += flops / 1e9
    return count


class GemmPeak:
    """One n x n x n fp32 MatMul in ONNX Runtime with ``threads`` intra-op threads: ``run()`` returns milliseconds."""

    def __init__(self, threads: int, n: int = GEMM_SIZE):
        import onnx
        from onnx import TensorProto, helper

        self.n = n
        self.gflop = 2 * n**3 / 1e9
        rng = np.random.default_rng(0)
        b = onnx.numpy_helper.from_array(rng.standard_normal((n, n), np.float32), "B")  # a constant, as weights are
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["A", "B"], ["C"])],
            "gemm",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, (n, n))],
            [helper.make_tensor_value_info("C", TensorProto.FLOAT, (n, n))],
            [b],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        self.session = ort.InferenceSession(
            model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"]
        )
        self.a = rng.standard_normal((n, n), np.float32)

    def run(self) -> float:
        start = time.perf_counter()
        self.session.run(None, {"A": self.a})
        return (time.perf_counter() - start) * 1000

    def gflops(self, ms: float) -> float:
        return self.gflop / (ms / 1000)


def cached_flops(path: Path, image_size: int, sha256: str | None, cache: Path) -> FlopCount:
    """count_flops, remembered per file digest (from the manifest) and size: parsing a 350 MB graph takes seconds."""
    import json
    from dataclasses import asdict

    key = cache / "flops" / f"{sha256 or Path(path).stat().st_mtime_ns}-{image_size}.json"
    if key.is_file():
        try:
            return FlopCount(**json.loads(key.read_text()))
        except (ValueError, TypeError):
            pass
    count = count_flops(path, image_size)
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text(json.dumps(asdict(count)))
    return count


@dataclass
class EncoderRoofline:
    gflop: float  # per frame
    ms: float  # median time per frame
    gflops: float  # gflop / median time
    fraction_of_peak: float  # median over frames of (this encoder's GFLOP/s) / (the GEMM's GFLOP/s just before)
    by_op: dict[str, float]
    unresolved: list[str]
    profile: OpProfile | None = None  # one profiled run: kernel time by op type


@dataclass
class Roofline:
    gemm_size: int
    gemm_ms: Stats
    gemm_gflops: float  # at the median GEMM time
    fraction_of_peak: Stats  # per frame: both encoders' GFLOP / their time, over the GEMM's GFLOP/s just before
    encoders: dict[str, EncoderRoofline]
    note: str = (
        "FLOPs: 2 per multiply-add of MatMul/Gemm/Conv (ONNX Runtime symbolic shape inference, batch 1); "
        "the GEMM runs right before every timed frame, so each ratio compares runs under the same load"
    )


def roofline(flops: dict[str, FlopCount], per_frame: dict[str, list[float]], gemm: GemmPeak) -> Roofline:
    """Achieved GFLOP/s of the encoders against the GEMM, frame by frame (per_frame: ms of dinov2, clip, gemm)."""
    g = np.asarray(per_frame["gemm"])
    peak = gemm.gflop / (g / 1000)  # GFLOP/s of each GEMM run
    encoders = {}
    for role, count in flops.items():
        t = np.asarray(per_frame[role])
        ms = float(np.median(t))
        encoders[role] = EncoderRoofline(
            count.gflop,
            ms,
            count.gflop / (ms / 1000),
            float(np.median(count.gflop / (t / 1000) / peak)),
            count.by_op,
            count.unresolved,
        )
    both = sum(c.gflop for c in flops.values()) / (sum(np.asarray(per_frame[r]) for r in flops) / 1000)
    g_stats = Stats.of(g)
    return Roofline(gemm.n, g_stats, gemm.gflops(g_stats.p50), Stats.of(both / peak), encoders)


GEMM_CLASS = (
    "MatMul",
    "Gemm",
    "Conv",
    "FusedMatMul",
    "FusedGemm",
    "FusedConv",
    "MatMulInteger",
    "QLinearMatMul",
    "DynamicQuantizeMatMul",
    "QGemm",
    "MatMulNBits",
    "NhwcFusedConv",
)


@dataclass
class OpProfile:
    """Where one encoder run spends its time, by ONNX Runtime kernel type (from ORT's own profiler)."""

    run_ms: float  # sum of the kernel times of the profiled run
    by_op_ms: dict[str, float]  # op type -> ms, largest first
    gemm_class_ms: float  # MatMul/Gemm/Conv and their fused forms
    gemm_class_gflops: float  # counted FLOPs / gemm_class_ms
    gemm_class_fraction_of_peak: float


def profile_ops(path: str | Path, image_size: int, threads: int, gflop: float, peak_gflops: float) -> OpProfile:
    """One warm-up and one profiled run of the encoder at ``path`` on a random input, kernel times grouped by op type."""
    import json
    import tempfile

    options = session_options(threads)  # as the runtime's sessions
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="ovseg-profile-") as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {
            session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(
                (1, 3, image_size, image_size), np.float32
            )
        }
        session.run(None, feed)
        session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"]
    )
    last = runs[-1]
    by_op: dict[str, float] = {}
    for e in events:
        if (
            e.get("cat") == "Node"
            and e.get("name", "").endswith("_kernel_time")
            and last["ts"] <= e["ts"] <= last["ts"] + last["dur"]
        ):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1000
    by_op = dict(sorted(by_op.items(), key=lambda kv: -kv[1]))
    gemm_ms = sum(v for k, v in by_op.items() if k in GEMM_CLASS)
    rate = gflop / (gemm_ms / 1000) if gemm_ms > 0 else 0.0
    return OpProfile(sum(by_op.values()), by_op, gemm_ms, rate, rate / peak_gflops if peak_gflops > 0 else 0.0)
