"""TensorRT plans without TensorRT: a stand-in ``tensorrt`` module with only the attributes TensorRT 11 still has,
so touching a removed one (BuilderFlag.FP16, platform_has_fast_fp16, int8_calibrator, layer precision) fails, and a
NULL builder raising TypeError, as the real bindings do (tests/trt_api/check.py checks both against TensorRT 10 and
11). The plans it "builds" name their ONNX file, and the stand-in plan runner runs that file on the CPU."""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from ovseg.calib.bundle import CalibOptions, calibrate_bundle
from ovseg.constants import DEFAULT_AGREEMENT, DEFAULT_COSINE, INT8_SYMMETRIC
from ovseg.errors import SegmenterError
from ovseg.runtime.bundle.manifest import BundleError, DeviceInfo, PlanRecord, read_manifest, sha256_file
from ovseg.runtime.engines import engine as engine_module
from ovseg.runtime.engines.engine import open_engine
from ovseg.runtime.engines.sessions import OnnxEncoder
from ovseg.runtime.tools import build
from ovseg.runtime.tools.compare import Thresholds, synthetic_frames

HERE = DeviceInfo("10.3.0", "NVIDIA Jetson AGX Orin", "8.7")
STRONGLY_TYPED = 1


def fake_tensorrt(version: str = "10.3.0", builder_fails: bool = False, calls: dict | None = None):
    calls = {} if calls is None else calls

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Input:
        name, shape = "pixel_values", (-1, 3, 112, 112)

    class Network:
        num_inputs = 1

        def __init__(self, flags):
            calls["flags"] = flags

        def get_input(self, i):
            return Input()

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls["source"] = Path(path).name
            return True

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+timing"

    class Config:
        __slots__ = ("cache",)  # nothing else can be set on it: no int8_calibrator

        def clear_flag(self, flag):
            calls.setdefault("cleared", []).append(flag)

        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = (pool, size)

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            calls["ignore_mismatch"] = ignore_mismatch
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            calls["profile"] = profile.shapes

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            if builder_fails:  # TensorRT's factory returned NULL (it logs why), which the bindings raise as:
                raise TypeError("pybind11::init(): factory function returned nullptr")

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return f"plan:{calls['source']}".encode()

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, Parser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=STRONGLY_TYPED)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(TF32="tf32")
    return trt


class PlanRunner:
    """A "plan" runs the ONNX file it names, on the CPU; ``noise`` replaces its outputs, ``shift`` moves every CLIP
    patch embedding by ``shift`` (a vector) times the embedding's norm."""

    def __init__(self, path: Path, shape, noise: bool = False, shift: np.ndarray | None = None):
        source = path.read_bytes().decode().removeprefix("plan:")
        self.session = OnnxEncoder(path.parent / source, ["CPUExecutionProvider"], input_shape=shape)
        self.input = self.session.input
        self.noise = noise
        self.shift = shift

    def run(self):
        out = self.session.run()
        rng = np.random.default_rng(0)
        if self.shift is not None and "patch_embeddings" in out:
            x = out["patch_embeddings"]
            out["patch_embeddings"] = (x + np.linalg.norm(x, axis=-1, keepdims=True) * self.shift).astype(np.float32)
        return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in out.items()} if self.noise else out

    def close(self):
        self.session.close()


@pytest.fixture
def device(monkeypatch, tmp_path):
    monkeypatch.setenv("OVSEG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(build, "this_device", lambda: HERE)
    monkeypatch.setattr(build, "_open_plan", PlanRunner)


def test_plans_are_strongly_typed_with_workspace_profile_and_timing_cache(tmp_path):
    calls: dict = {}
    trt = fake_tensorrt(calls=calls)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    (tmp_path / "m.fp16.onnx").write_bytes(b"")
    spec = build.PlanSpec((1, 3, 112, 112), workspace_mib=512, timing_cache=cache)
    plan = build.build_plan(trt, tmp_path / "m.fp16.onnx", tmp_path / "m.fp16.plan", spec)
    assert calls["flags"] == 1 << STRONGLY_TYPED
    assert calls["workspace"] == ("workspace", 512 << 20)
    assert calls["profile"] == {"pixel_values": ((1, 3, 112, 112),) * 3}
    assert calls["ignore_mismatch"] is False
    assert calls["cleared"] == ["tf32"]  # float tensors run in fp32, as the plan check compares them
    assert plan.read_bytes() == b"plan:m.fp16.onnx"
    assert cache.read_bytes() == b"old+timing"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary file left


@pytest.mark.parametrize("driver, extra", [("13.0", "tensorrt"), ("12.6", "tensorrt-cu12")])
def test_ovseg_build_without_tensorrt_exits_2_with_one_line(tiny_bundle, monkeypatch, capsys, driver, extra):
    from ovseg import environment

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    monkeypatch.setattr(environment, "driver_cuda", lambda: driver)
    monkeypatch.setattr(environment, "is_jetson", lambda: False)
    assert build.main(["--bundle", str(tiny_bundle), "--fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ovseg-build: error: tensorrt does not import")
    assert f"pip install -e '.[{extra}]'" in err[0]


@pytest.mark.parametrize(
    ("trt", "message"),
    [
        (fake_tensorrt(version="8.6.2"), "TensorRT 8.6.2 is older than 10.3"),
        (fake_tensorrt(builder_fails=True), "cannot create a builder here (no usable CUDA GPU or driver"),
    ],
)
def test_ovseg_build_with_an_old_or_unusable_tensorrt_exits_2(tiny_bundle, monkeypatch, capsys, trt, message):
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    assert build.main(["--bundle", str(tiny_bundle)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_ovseg_build_writes_checked_plans_and_their_records(bundle_copy, device, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    d = bundle_copy.dir
    assert build.main(["--bundle", str(d), "--fp16", "--timing-cache", str(tmp_path / "t.cache")]) == 0
    manifest = read_manifest(d)  # verifies every sha256
    for info, fp32 in ((manifest.clip, "clip_visual"), (manifest.dinov2, "dinov2")):
        plan = info.files["trt_fp16"]
        assert plan == f"{fp32}.fp16.plan" and manifest.sha256[plan] == sha256_file(d / plan)
        record = info.plans["trt_fp16"]
        assert (record.source, record.tensorrt, record.gpu, record.compute_capability) == (
            info.files["fp16"],
            *(HERE.tensorrt, HERE.gpu, HERE.compute_capability),
        )
        assert 0.98 <= record.min_cosine <= record.mean_cosine <= 1.0 + 1e-6
        assert DEFAULT_AGREEMENT <= record.label_agreement <= 1.0
    assert manifest.clip.plans["trt_fp16"].label_agreement == manifest.dinov2.plans["trt_fp16"].label_agreement
    assert (tmp_path / "t.cache").is_file()
    err = capsys.readouterr().err
    assert "building clip_visual.fp16.plan" in err and "fp16 plans: label agreement" in err
    assert "fp16 plans written" in err


def test_ovseg_build_sign_signs_the_new_manifest_and_a_bad_key_builds_nothing(
    bundle_copy, device, monkeypatch, tmp_path, capsys
):
    from ovseg.runtime.bundle.signing import new_key, sign_bundle

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    d = bundle_copy.dir
    private, public = new_key(tmp_path / "fleet")
    (tmp_path / "bad.pem").write_text("not a key")
    assert build.main(["--bundle", str(d), "--fp16", "--sign", str(tmp_path / "bad.pem")]) == 2
    assert "is not an unencrypted Ed25519 private key" in capsys.readouterr().err and not list(d.glob("*.plan"))
    sign_bundle(d, private)
    assert build.main(["--bundle", str(d), "--fp16", "--sign", str(private)]) == 0
    assert f"fp16 plans written into {d}, signed with {private}" in capsys.readouterr().err
    assert "trt_fp16" in read_manifest(d, trusted=[public]).clip.files
    assert build.main(["--bundle", str(d), "--fp16"]) == 0  # rebuilt without the key: unsigned, and said so
    assert f"{d} was signed and its new manifest is not" in capsys.readouterr().err
    with pytest.raises(BundleError, match="is not signed"):
        read_manifest(d, trusted=[public])


def test_a_plan_under_the_cosine_gate_writes_nothing(bundle_copy, device, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    monkeypatch.setattr(build, "_open_plan", lambda path, shape: PlanRunner(path, shape, noise=True))
    d = bundle_copy.dir
    manifest = (d / "manifest.json").read_bytes()
    assert build.main(["--bundle", str(d), "--fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ovseg-build: error: clip_visual.fp16.plan reaches a worst per-token cosine")
    assert "nothing written" in err[-1]
    assert (d / "manifest.json").read_bytes() == manifest and not list(d.glob("*.plan"))


def test_plans_that_pass_the_cosine_gate_but_label_segments_otherwise_write_nothing(
    bundle_copy, device, monkeypatch, capsys
):
    """Every CLIP patch embedding moved a little toward one class's text embedding: within the cosine gate token by
    token (the shift is small against each token), but the same for every token, so the labels move; only the
    Segmenter's label agreement sees it."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    d = bundle_copy.dir
    manifest = read_manifest(d)
    background = np.load(d / manifest.vocabulary.embeddings["fp32"])[0]  # voc21's first entry
    shift = 0.15 * background / np.linalg.norm(background)
    monkeypatch.setattr(build, "_open_plan", lambda path, shape: PlanRunner(path, shape, shift=shift))
    before = _tree(d)
    assert build.main(["--bundle", str(d), "--fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    worst = [float(line.split("worst cosine ")[1].split(",")[0]) for line in err if "worst cosine" in line]
    assert len(worst) == 2 and min(worst) >= DEFAULT_COSINE  # the cosine gate alone would have written them
    assert err[-1].startswith("ovseg-build: error: the Segmenter on the fp16 plans labels 0.")
    assert f"of the segments as CPU fp32 does, under {DEFAULT_AGREEMENT}: nothing written" in err[-1]
    assert _tree(d) == before


def _tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_int8_plans_without_the_symmetric_model_are_refused_in_one_line(bundle_copy, device, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    before = _tree(bundle_copy.dir)
    assert build.main(["--bundle", str(bundle_copy.dir), "--int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no symmetric int8 clip or dinov2 model" in err[0]
    assert "run `ovseg-calib --tensorrt` first" in err[0]
    assert _tree(bundle_copy.dir) == before


def test_fp16_and_int8_plans_are_one_or_the_other(capsys):
    with pytest.raises(SystemExit) as exit_:
        build.build_parser().parse_args(["--fp16", "--int8"])
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err


@pytest.fixture
def symmetric_bundle(bundle_copy, tmp_path) -> Path:
    """The tiny bundle calibrated with --tensorrt on synthetic frames: it has the symmetric int8 models."""
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, frame in enumerate(synthetic_frames(6)):
        cv2.imwrite(str(frames / f"{i}.png"), frame)
    opts = CalibOptions(source=frames, frames=6, timing_runs=1, thresholds=Thresholds(0.0, 0.0), tensorrt=True)
    calibrate_bundle(bundle_copy.dir, opts)
    return bundle_copy.dir


def test_int8_plans_are_strongly_typed_networks_of_the_symmetric_model(symmetric_bundle, device, monkeypatch):
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls=calls))
    d = symmetric_bundle
    assert build.main(["--bundle", str(d), "--int8"]) == 0
    assert calls["flags"] == 1 << STRONGLY_TYPED  # and no builder flag: the stand-in's config has no set_flag
    manifest = read_manifest(d)  # verifies every sha256
    for info, fp32 in ((manifest.clip, "clip_visual"), (manifest.dinov2, "dinov2")):
        assert info.files[INT8_SYMMETRIC] == f"{fp32}.int8_symmetric.onnx"
        plan = info.files["trt_int8"]
        assert plan == f"{fp32}.int8.plan" and (d / plan).read_bytes() == f"plan:{fp32}.int8_symmetric.onnx".encode()
        record = info.plans["trt_int8"]
        assert record.source == info.files[INT8_SYMMETRIC] and record.fits(HERE)
        assert record.min_cosine >= DEFAULT_COSINE and record.label_agreement >= DEFAULT_AGREEMENT


# --- the runtime's choice ---------------------------------------------------------------------------------------------


def _with_plan(bundle_copy, built_for: DeviceInfo):
    record = PlanRecord(
        "dinov2.fp16.onnx", built_for.tensorrt, built_for.gpu, built_for.compute_capability, 0.99, 0.999
    )

    def change(m):
        m["dinov2"]["files"]["trt_fp16"] = "dinov2.fp16.plan"
        m["dinov2"]["plans"] = {"trt_fp16": record.__dict__}
        m["sha256"]["dinov2.fp16.plan"] = "0" * 64  # every file the manifest names is pinned (read unverified here)

    d = bundle_copy(change)
    return read_manifest(d, verify=False)


@pytest.fixture
def runtime_device(monkeypatch):
    monkeypatch.setattr(engine_module, "tensorrt_importable", lambda: True)
    monkeypatch.setattr(engine_module, "this_device", lambda: HERE)
    opened = []
    monkeypatch.setattr(
        engine_module, "TensorRTEngine", lambda path, shape, outputs: opened.append(path.name) or "plan"
    )
    return opened


@pytest.mark.filterwarnings("ignore:Specified provider")  # ORT's, on the way to the refusal asserted
@pytest.mark.parametrize(
    "other",
    [
        DeviceInfo("10.3.0", "NVIDIA GeForce RTX 4090", "8.9"),
        DeviceInfo("10.3.0", HERE.gpu, "8.6"),
        DeviceInfo("11.0.0", HERE.gpu, HERE.compute_capability),
    ],
)
def test_a_plan_built_for_another_gpu_or_tensorrt_is_skipped_with_a_warning(
    bundle_copy, runtime_device, monkeypatch, caplog, tmp_path, other
):
    monkeypatch.setenv("OVSEG_HOME", str(tmp_path / "home"))
    manifest = _with_plan(bundle_copy, other)
    with caplog.at_level(logging.WARNING, "ovseg"), pytest.raises(SegmenterError, match="TensorrtExecutionProvider"):
        # this ONNX Runtime has no TensorRT provider: the provider it falls to is refused, in one line
        open_engine(bundle_copy.dir, manifest.dinov2, "DINOv2", "tensorrt", "fp16", None)
    assert runtime_device == []
    assert "dinov2.fp16.plan was built for" in caplog.text and "skipped" in caplog.text and "ovseg-build" in caplog.text


def test_a_plan_built_here_is_opened(bundle_copy, runtime_device):
    manifest = _with_plan(bundle_copy, HERE)
    assert open_engine(bundle_copy.dir, manifest.dinov2, "DINOv2", "tensorrt", "fp16", None) == "plan"
    assert runtime_device == ["dinov2.fp16.plan"]


def test_manifest_round_trips_plan_records(bundle_copy):
    manifest = _with_plan(bundle_copy, HERE)
    again = json.loads(manifest.to_json())
    assert again["dinov2"]["plans"]["trt_fp16"]["gpu"] == HERE.gpu
    assert manifest.dinov2.plans["trt_fp16"].fits(HERE)


def test_a_plan_record_from_before_label_agreement_still_loads(bundle_copy):
    _with_plan(bundle_copy, HERE)
    d = bundle_copy(lambda m: m["dinov2"]["plans"]["trt_fp16"].pop("label_agreement"))
    assert read_manifest(d, verify=False).dinov2.plans["trt_fp16"].label_agreement is None


# --- ovseg-export ------------------------------------------------------------------------------------------------------


def test_export_keeps_its_bundle_when_tensorrt_imports_but_cannot_build(tmp_path, monkeypatch, capsys):
    from conftest import TINY_SIZE, _export

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(builder_fails=True))
    out = _export(tmp_path / "bundle", image_size=TINY_SIZE, vocab="voc21", fp16=True)
    manifest = read_manifest(out)
    assert "fp16" in manifest.dinov2.files and "trt_fp16" not in manifest.dinov2.files
    assert not list(out.glob("*.plan"))
    err = capsys.readouterr().err
    assert "no TensorRT plans (TensorRT 10.3.0 cannot create a builder here" in err and "ovseg-build --fp16" in err
