"""What the Segmenter refuses, and how it says so: bundles, backends, precisions, settings; one line each."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from ovseg.environment import machine_key
from ovseg.errors import OvsegError
from ovseg.runtime import Segmenter, SegmenterError
from ovseg.runtime.bundle.manifest import BundleError, read_manifest
from ovseg.runtime.config import SegmenterConfig
from ovseg.runtime.engines import precision, sessions
from ovseg.runtime.engines.engine import open_engine
from ovseg.runtime.engines.precision import pick_precision
from ovseg.runtime.engines.sessions import OnnxEncoder, resolve_backend
from ovseg.runtime.engines.tensorrt import tensorrt_importable
from ovseg.runtime.pipeline.vocabulary import VocabularyError

from assertions import one_line

CPU_ONLY = ["CPUExecutionProvider"]
WITH_CUDA = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


# --- bundles --------------------------------------------------------------------------------------------------------


def test_missing_bundle_says_to_run_ovseg_export(tmp_path):
    with pytest.raises(SegmenterError) as err:
        Segmenter.from_bundle(tmp_path / "nowhere")
    one_line(err, "no bundle at", "ovseg-export")
    assert isinstance(err.value, OvsegError)  # what every ovseg-* command prints as one line


def test_the_default_bundle_follows_ovseg_home_when_called(tmp_path, monkeypatch):
    monkeypatch.setenv("OVSEG_HOME", str(tmp_path))
    with pytest.raises(SegmenterError) as err:
        Segmenter.from_bundle()
    one_line(err, f"no bundle at {tmp_path / 'bundles' / 'default'}")


def test_corrupted_file_fails_its_sha256(bundle_copy):
    with open(bundle_copy.dir / "clip_visual.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(SegmenterError) as err:
        Segmenter.from_bundle(bundle_copy.dir)
    one_line(err, "clip_visual.onnx", "sha256")


def test_bundle_from_another_schema_version(bundle_copy):
    bundle = bundle_copy(lambda m: m.update(schema_version=99))
    with pytest.raises(SegmenterError) as err:
        Segmenter.from_bundle(bundle)
    one_line(err, "schema version 99", "re-export")


def test_onnx_model_whose_input_does_not_fit(bundle_copy):
    def swap(m):
        m["dinov2"]["files"]["fp32"] = "clip_text.onnx"

    with pytest.raises(SegmenterError) as err:
        Segmenter.from_bundle(bundle_copy(swap), backend="cpu")
    one_line(err, "clip_text.onnx", "input_ids", "does not fit")


def test_random_weights_warn_once_per_opening(bundle_copy, caplog):
    bundle = bundle_copy(lambda m: m.update(random_weights=True))
    with caplog.at_level(logging.WARNING, logger="ovseg"):
        first = Segmenter.from_bundle(bundle, backend="cpu")
        first.with_config(SegmenterConfig(num_segments=4))  # the same engines: said already
    warnings = [r for r in caplog.records if "random weights" in r.getMessage()]
    assert len(warnings) == 1 and "meaningless" in warnings[0].getMessage() and str(bundle) in warnings[0].getMessage()
    assert first.random_weights


# --- backends and precisions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend, provider", [("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")]
)
def test_unavailable_backend_is_an_error_not_a_fallback(tiny_bundle, backend, provider, tmp_path, monkeypatch):
    import onnxruntime as ort

    if provider in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has {provider}")
    with pytest.raises(SegmenterError) as err:
        Segmenter.from_bundle(tiny_bundle, backend=backend)
    one_line(err, provider, "backend='cpu'")
    # Past the availability check, ONNX Runtime itself is asked: the session is refused, not opened on the CPU.
    monkeypatch.setenv("OVSEG_HOME", str(tmp_path))  # the TensorRT provider's cache
    manifest = read_manifest(tiny_bundle)
    with pytest.warns(UserWarning) as warned, pytest.raises(SegmenterError) as err:
        open_engine(tiny_bundle, manifest.clip, "CLIP image", backend, "fp32", None)
    one_line(err, "clip_visual.onnx", provider, "backend='cpu'")
    assert any(provider in str(w.message) for w in warned)  # ORT's own word on it


def test_cuda_with_the_cpu_int8_model_is_refused(tiny_bundle, monkeypatch):
    monkeypatch.setattr(sessions, "provider_problem", lambda provider: None)  # as where CUDA opens a session
    manifest = read_manifest(tiny_bundle)
    for requested in ("cuda", "auto"):
        backend = resolve_backend(requested, WITH_CUDA)
        with pytest.raises(SegmenterError) as err:
            pick_precision(manifest, backend, "int8")
        one_line(err, "int8 on backend 'cuda'", "CPU", "precision='fp16'", "backend='tensorrt'")
    with pytest.raises(SegmenterError) as err:
        open_engine(tiny_bundle, manifest.dinov2, "DINOv2", "cuda", "int8", None)
    one_line(err, "int8 on backend 'cuda'")
    calibrated = dataclasses.replace(
        manifest,
        clip=dataclasses.replace(manifest.clip, files={**manifest.clip.files, "int8": "clip_visual.onnx"}),
        dinov2=dataclasses.replace(manifest.dinov2, files={**manifest.dinov2.files, "int8": "dinov2.onnx"}),
        gates={"int8": {"passed": True, "speedup_vs_fp32": 1.7, "machine": machine_key()}},
    )
    assert pick_precision(calibrated, "cpu", "auto") == "int8"
    assert precision.pick_precision(calibrated, "cuda", "auto") == "fp16"  # auto never picks the CPU's int8 on a GPU


def test_every_backend_the_clis_offer_has_a_provider():
    from ovseg.constants import BACKENDS
    from ovseg.runtime.engines.sessions import PROVIDERS

    assert BACKENDS == ("auto", *PROVIDERS)


def test_backend_resolution(monkeypatch):
    monkeypatch.setattr(sessions, "provider_problem", lambda provider: None)  # as where CUDA opens a session
    assert resolve_backend("auto", CPU_ONLY) == "cpu"
    assert resolve_backend("auto", WITH_CUDA) == "cuda"
    assert resolve_backend("tensorrt", WITH_CUDA) == "tensorrt"
    with pytest.raises(SegmenterError, match="unknown backend 'gpu'"):
        resolve_backend("gpu", WITH_CUDA)


def test_precision_choice(tiny_bundle, monkeypatch):
    seg = Segmenter.from_bundle(tiny_bundle, backend="cpu")
    manifest = seg.manifest
    assert pick_precision(manifest, "cpu", "auto") == "fp32"  # fp16 ONNX on a CPU is slower, not faster
    assert pick_precision(manifest, "cuda", "auto") == "fp16"
    failed = dataclasses.replace(manifest, gates={"fp16": {"passed": False}})
    assert pick_precision(failed, "cuda", "auto") == "fp32"  # a failed gate is never picked by auto
    assert pick_precision(manifest, "cpu", "fp16") == "fp16"  # asked for explicitly: honoured

    def drop(info):
        return dataclasses.replace(info, files={"fp32": info.files["fp32"]})

    without_fp16 = dataclasses.replace(manifest, clip=drop(manifest.clip), dinov2=drop(manifest.dinov2))
    assert pick_precision(without_fp16, "cuda", "auto") == "fp32"
    with pytest.raises(SegmenterError) as err:
        pick_precision(without_fp16, "cuda", "fp16")
    one_line(err, "no fp16 variant", "ovseg-export --fp16")
    with pytest.raises(SegmenterError, match="unknown precision 'int4'"):
        pick_precision(manifest, "cpu", "int4")


def test_missing_precision_file_in_a_bundle(bundle_copy):
    def drop_fp16(m):
        for role in ("clip", "dinov2"):
            m[role]["files"].pop("fp16")

    with pytest.raises(SegmenterError) as err:
        Segmenter.from_bundle(bundle_copy(drop_fp16), backend="cpu", config=SegmenterConfig(precision="fp16"))
    one_line(err, "no fp16 variant", "--fp16")


def test_io_binding_gives_the_same_outputs(tiny_bundle):
    path = tiny_bundle / "clip_visual.onnx"
    plain = OnnxEncoder(path, ["CPUExecutionProvider"], input_shape=(1, 3, 112, 112))
    bound = OnnxEncoder(path, ["CPUExecutionProvider"], input_shape=(1, 3, 112, 112), io_binding=True)
    x = np.random.default_rng(0).standard_normal((1, 3, 112, 112)).astype(np.float32)
    plain.input[...] = x
    bound.input[...] = x
    a, b = plain.run(), bound.run()
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    bound.input[...] = 0  # the binding reads the buffer at run time, not at bind time
    assert not np.array_equal(bound.run()["image_embedding"], a["image_embedding"])


@pytest.mark.skipif(
    not tensorrt_importable(), reason="tensorrt is not installed (the native TensorRT runner needs it and a CUDA GPU)"
)
@pytest.mark.gpu
def test_tensorrt_engine_runs_a_plan(tmp_path, tiny_bundle):
    from ovseg.runtime.engines.tensorrt import TensorRTEngine
    from ovseg.runtime.tools.build import PlanSpec, build_plan, load_tensorrt

    plan = build_plan(
        load_tensorrt(), tiny_bundle / "clip_visual.onnx", tmp_path / "clip.plan", PlanSpec((1, 3, 112, 112))
    )
    engine = TensorRTEngine(plan, (1, 3, 112, 112))
    reference = OnnxEncoder(tiny_bundle / "clip_visual.onnx", ["CPUExecutionProvider"], input_shape=(1, 3, 112, 112))
    engine.input[...] = reference.input[...] = 0.5
    np.testing.assert_allclose(engine.run()["patch_embeddings"], reference.run()["patch_embeddings"], atol=1e-3)
    engine.close()


# --- settings ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"config": SegmenterConfig(refine="crf")}, "unknown refine"),
        ({"config": SegmenterConfig(num_segments=0)}, "num_segments"),
        ({"config": SegmenterConfig(keyframe_interval=0)}, "keyframe_interval"),
        ({"config": SegmenterConfig(lookup="faiss")}, "unknown lookup"),
        ({"config": SegmenterConfig(precision="int4")}, "unknown precision"),
        ({"classes": []}, "no class names"),
        ({"vocab": "no-such-preset"}, "unknown vocabulary"),
    ],
)
def test_bad_settings_are_one_line_errors(tiny_bundle, kwargs, message):
    with pytest.raises(SegmenterError) as err:
        Segmenter.from_bundle(tiny_bundle, backend="cpu", **kwargs)
    one_line(err, message)


def test_vocabulary_errors_keep_their_message(tiny_bundle):
    with pytest.raises(SegmenterError) as err:
        Segmenter.from_bundle(tiny_bundle, backend="cpu", classes="/no/such/file.txt")
    one_line(err, "unknown vocabulary '/no/such/file.txt'")


def test_runtime_errors_share_one_base():
    from ovseg.runtime.io.sources import SourceError

    for error in (SegmenterError, BundleError, VocabularyError, SourceError):
        assert issubclass(error, OvsegError), error
    assert issubclass(VocabularyError, ValueError)  # callers that caught ValueError still do
