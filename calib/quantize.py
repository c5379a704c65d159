"""ONNX Runtime static INT8 (QDQ) for the image encoders, with the ops that hurt ViTs kept in float.

Steps, each a pure function of files and arrays:
  ``calibrate`` the fp32 model's tensor ranges on the calibration frames (cached as JSON next to the model, keyed by
  the model's sha256, the frames and the method), ``quantize`` with those ranges (no recalibration when nodes are
  excluded), and rank quantised nodes by ``sensitivity`` (the SQNR of their int8 inputs on held-out frames) for the
  gate's fallback loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import (
    CalibrationCacheEncoder,
    TensorData,
    TensorsData,
    create_calibrator,
    save_tensors_data,
)
from tqdm import tqdm

from ovseg.onnx_helpers import output_projections, session_options
from ovseg.runtime.bundle.manifest import sha256_file

log = logging.getLogger("ovseg.calib")

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
# What runs in int8: the GEMMs. Everything else (LayerNorm, Softmax, GELU, adds) stays float between them.
QUANT_OPS = ("MatMul", "Gemm", "Conv")
# Kept in float whatever the op list says: ViT accuracy dies on int8 LayerNorm statistics and softmax rows.
FLOAT_OPS = ("LayerNormalization", "Softmax")
CACHE_SUFFIX = ".int8.calib.json"
CACHE_VERSION = 1


def cache_path(model_path: Path) -> Path:
    """``clip_visual.onnx`` -> ``clip_visual.int8.calib.json`` next to it."""
    return model_path.with_name(model_path.name.removesuffix(".onnx") + CACHE_SUFFIX)


def attention_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls whose both inputs are activations (q.kT, attention x values, GEM's self-self attention)."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input)]


def float_nodes(model: onnx.ModelProto, exclude: tuple[str, ...] = ()) -> list[str]:
    """Every node that must not be quantised: FLOAT_OPS, the output projections, the attention MatMuls, ``exclude``.

    Attention stays float because it is both worse and slower in int8 here: softmax rows of a thousand probabilities do
    not survive a 1/255 step, and ORT's int8 kernels for activation x activation products are no faster than fp32
    (docs/DESIGN.md, "Measurements behind defaults").
    """
    names = [n.name for n in model.graph.node if n.op_type in FLOAT_OPS] + output_projections(model)
    return list(dict.fromkeys(names + attention_matmuls(model) + list(exclude)))


def calibrate(
    model_path: Path, frames: np.ndarray, digest: str, method: str, cache: Path | None = None
) -> tuple[TensorsData, bool]:
    """Tensor ranges of ``model_path`` on ``frames`` (N, 3, S, S): from the cache when its key matches, else computed and cached.

    Returns (ranges, recalibrated). The cache is JSON (no pickle), written atomically.
    """
    cache = cache or cache_path(model_path)
    key = hashlib.sha256(f"{CACHE_VERSION}:{sha256_file(model_path)}:{digest}:{method}".encode()).hexdigest()
    cached = read_cache(cache, key)
    if cached is not None:
        return cached, False
    ranges = compute_ranges(model_path, frames, method)
    minmax = {k: TensorData(lowest=v.lowest, highest=v.highest) for k, v in ranges.items()}  # no histograms
    payload = {"key": key, "version": CACHE_VERSION, "method": method, "frames": len(frames), "model": model_path.name}
    payload["ranges"] = TensorsData(ranges.calibration_method, minmax).to_dict()
    tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, cls=CalibrationCacheEncoder))
    os.replace(tmp, cache)
    return ranges, True


def compute_ranges(model_path: Path, frames: np.ndarray, method: str) -> TensorsData:
    """Run ORT's calibrator over the frames one at a time (bounded memory, a progress bar)."""
    model = onnx.load(str(model_path), load_external_data=False)
    input_name = model.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="ovseg-calib-") as tmp:
        calibrator = create_calibrator(
            model_path,
            list(QUANT_OPS),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=METHODS[method],
            extra_options={"symmetric": method == "percentile"},
        )
        for x in tqdm(frames, desc=f"calibrating {model_path.name} ({method})", unit="frame", leave=False):
            one_feed = SimpleNamespace(get_next=iter([{input_name: x[None]}, None]).__next__)  # a data reader
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram collector prints a line per call
                calibrator.collect_data(one_feed)
        with contextlib.redirect_stdout(io.StringIO()):
            ranges = calibrator.compute_data()
        del calibrator
    return ranges


def read_cache(cache: Path, key: str) -> TensorsData | None:
    if not cache.is_file():
        return None
    try:
        payload = json.loads(cache.read_text())
        if payload.get("key") != key:
            return None
        return TensorsData.from_dict(payload["ranges"])
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the unreadable calibration cache %s (%s)", cache, e)
        return None


def quantize(
    model_path: Path, out_path: Path, ranges: TensorsData, exclude: tuple[str, ...] = (), tensorrt: bool = False
) -> tuple[list[str], list[str]]:
    """Write the QDQ int8 model (per-channel int8 weights, uint8 activations) and check it; returns (float, quantised) nodes.

    uint8 activations: with int8 ones ORT left the q/k/v projections as float MatMuls after dequantising.
    ``tensorrt``: the explicit Q/DQ model TensorRT builds int8 plans from, from the same ranges and with the same nodes
    in float: int8 activations with zero points 0 (TensorRT quantises symmetrically only) and float biases (its
    DequantizeLinear takes no int32). Weights are int8 per output channel either way (MatMul axis 1, Conv axis 0).
    """
    model = onnx.load(str(model_path))
    keep = float_nodes(model, exclude)
    with tempfile.TemporaryDirectory(prefix="ovseg-quant-") as tmp:
        ort_cache = Path(tmp) / "ranges.json"  # in ORT's own cache format, so quantize_static does not recalibrate
        save_tensors_data(ranges, ort_cache)
        with _quiet_root_logger():  # ORT's "consider pre-processing" advice: its shape inference runs inside anyway
            quantize_static(
                str(model_path),
                str(out_path),
                None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANT_OPS),
                per_channel=True,
                activation_type=QuantType.QInt8 if tensorrt else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=keep,
                calibrate_method=ranges.calibration_method,
                calibration_cache_path=str(ort_cache),
                # GEMM outputs stay float: ORT fuses DQ -> MatMul into MatMulIntegerToFloat (dequantised in the kernel),
                # faster and closer to fp32 than requantised outputs (QLinearMatMul): docs/DESIGN.md, "Measurements
                # behind defaults".
                extra_options={
                    "ActivationSymmetric": tensorrt,
                    "QuantizeBias": not tensorrt,
                    "WeightSymmetric": True,
                    "MatMulConstBOnly": True,
                    "OpTypesToExcludeOutputQuantization": list(QUANT_OPS),
                },
            )
    qmodel = onnx.load(str(out_path))
    qmodel.ir_version = model.ir_version  # the exporter's IR version (the quantiser may stamp a newer one ORT refuses)
    read_float(qmodel.graph, keep, model.graph)
    onnx.checker.check_model(qmodel, full_check=True)
    onnx.save(qmodel, str(out_path))
    return keep, quantized_nodes(qmodel)


def read_float(graph: onnx.GraphProto, kept: list[str], source: onnx.GraphProto) -> None:
    """Point Shape nodes and the nodes ``kept`` in float back at float tensors where the quantiser feeds them a DQ
    (directly, or through the Identity by which a weight is shared): a Shape would dequantise per run (two per DINOv2
    block) just to read a shape, and a kept node would compute on int8-rounded inputs. An activation is read before
    its Q -> DQ pair; a weight shared with a quantised node is the float weight of ``source`` (the model quantised),
    added back. Q, DQ and Identity nodes left without consumers are dropped."""
    producer = {o: n for n in graph.node for o in n.output}
    source_producer = {o: n for n in source.node for o in n.output}
    source_weights = {i.name: i for i in source.initializer}
    weights = {i.name for i in graph.initializer}

    def float_tensor(name: str) -> str | None:
        dq = producer.get(_behind_identities(name, producer))
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        q = producer.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            return q.input[0]
        weight = _behind_identities(name, source_producer)
        if weight not in source_weights:
            return None
        copy = f"{weight}_float"  # the quantiser may have given the weight's own name to its DQ output
        if copy not in weights:
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(source_weights[weight]), copy))
            weights.add(copy)
        return copy

    readers = set(kept)
    for node in graph.node:
        inputs = node.input[:1] if node.op_type == "Shape" else node.input if node.name in readers else []
        for i, name in enumerate(inputs):
            node.input[i] = float_tensor(name) or name
    _drop_unread(graph, ("QuantizeLinear", "DequantizeLinear", "Identity"))


def _drop_unread(graph: onnx.GraphProto, ops: tuple[str, ...]) -> None:
    """Remove the nodes of ``ops`` whose outputs nothing reads, until there are none."""
    while True:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ops and not read.intersection(n.output)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


def _behind_identities(name: str, producer: dict[str, onnx.NodeProto]) -> str:
    """The tensor behind Identity nodes (the quantiser shares one DQ among consumers through one)."""
    while name in producer and producer[name].op_type == "Identity":
        name = producer[name].input[0]
    return name


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantized_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of QUANT_OPS nodes that take at least one DequantizeLinear input: they run in int8."""
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [n.name for n in model.graph.node if n.op_type in QUANT_OPS and any(i in dq for i in n.input)]


def activation_inputs(qmodel: onnx.ModelProto) -> dict[str, list[tuple[str, float, int]]]:
    """For every int8 node: its quantised activation inputs as (float tensor, scale, zero point)."""
    inits = {i.name: i for i in qmodel.graph.initializer}
    producer = {o: n for n in qmodel.graph.node for o in n.output}

    def value(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    found: dict[str, list[tuple[str, float, int]]] = {}
    for node in qmodel.graph.node:
        if node.op_type not in QUANT_OPS:
            continue
        for name in node.input:
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in inits:
                continue  # not quantised, or a weight
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            scale, zero = value(q.input[1]), value(q.input[2]) if len(q.input) > 2 else np.zeros((), np.uint8)
            if scale is None or scale.size != 1 or zero is None:
                continue
            found.setdefault(node.name, []).append((q.input[0], float(scale), int(zero)))
    return found


def sensitivity(fp32_path: Path, qmodel_path: Path, frames: np.ndarray) -> list[tuple[str, float]]:
    """Int8 nodes ranked worst first by the SQNR (dB) of their quantised activation inputs on ``frames``.

    The activations are the fp32 model's own (one run with those tensors exposed as outputs), quantised with the
    int8 model's scales: a per-layer error that needs no run per candidate node.
    """
    inputs = activation_inputs(onnx.load(str(qmodel_path)))
    tensors = sorted({t for ins in inputs.values() for t, _, _ in ins})
    model = onnx.load(str(fp32_path))
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in known)
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    signal = dict.fromkeys(tensors, 0.0)
    noise = dict.fromkeys(tensors, 0.0)
    for x in frames:
        outs = dict(
            zip([o.name for o in session.get_outputs()], session.run(None, {session.get_inputs()[0].name: x[None]}))
        )
        for ins in inputs.values():
            for t, scale, zero in ins:
                a = outs[t].astype(np.float64)
                deq = (np.clip(np.round(a / scale) + zero, 0, 255) - zero) * scale
                signal[t] += float((a * a).sum())
                noise[t] += float(((a - deq) ** 2).sum())
    sqnr = {t: 10 * np.log10(max(signal[t], 1e-30) / max(noise[t], 1e-30)) for t in tensors}
    ranked = [(node, min(sqnr[t] for t, _, _ in ins)) for node, ins in inputs.items()]
    return sorted(ranked, key=lambda item: item[1])
