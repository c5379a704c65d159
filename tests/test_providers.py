"""How sessions are opened on a device: the provider in use is checked, GPU sessions keep ORT's threads quiet and
every node of an image encoder on the GPU, the TensorRT provider's caches live under OVSEG_HOME, ORT's prints stay
off stdout, and run failures are one line. Everything here runs on the CPU build of ONNX Runtime; the GPU halves of
these paths are docs/gpu.md's "What has not been run here"."""

from __future__ import annotations

import ctypes
import logging
import operator
import os
import shutil
import stat
import subprocess
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest

from ovseg.errors import SegmenterError
from ovseg.runtime import Segmenter
from ovseg.runtime.bundle.manifest import read_manifest, sha256_file
from ovseg.runtime.engines import device as device_module
from ovseg.runtime.engines import sessions
from ovseg.runtime.engines import tensorrt as tensorrt_module
from ovseg.runtime.engines.engine import open_engine
from ovseg.runtime.engines.sessions import (
    DISABLE_CPU_FALLBACK,
    INTRA_OP_SPINNING,
    OnnxEncoder,
    SessionPlan,
    check_providers,
    open_trt_cache,
    session_plan,
    stdout_to_stderr,
    trt_cache_dir,
)

from assertions import one_line

SHAPE = (1, 3, 112, 112)  # the tiny bundle's input (conftest)
CUDA, TRT, CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"
WITH_GPU = [TRT, CUDA, CPU]


class FakeSession:
    def __init__(self, providers: list[str]):
        self.providers = providers

    def get_providers(self) -> list[str]:
        return self.providers


def config_entry(options: ort.SessionOptions, key: str) -> str | None:
    try:
        return options.get_session_config_entry(key)
    except RuntimeError:  # ORT's answer for a key never set
        return None


# --- the provider in use -------------------------------------------------------------------------------------------


def test_the_provider_asked_for_is_the_one_in_use(tmp_path):
    plan = session_plan("cuda", image_size=112)
    assert check_providers(FakeSession([CUDA, CPU]), plan, tmp_path / "dinov2.onnx") == "cuda"
    assert check_providers(FakeSession([CPU]), session_plan("cpu"), tmp_path / "dinov2.onnx") == "cpu"


@pytest.mark.parametrize("backend, given", [("cuda", [CPU]), ("tensorrt", [CUDA, CPU])])
def test_a_session_that_fell_back_is_refused_saying_why(tmp_path, monkeypatch, backend, given):
    monkeypatch.setattr(sessions.ort, "get_available_providers", lambda: WITH_GPU)  # an onnxruntime-gpu whose libs fail
    monkeypatch.setattr(sessions, "provider_problem", lambda p: f"{p}'s libfoo.so.13 does not load: install it")
    plan = session_plan(backend, image_size=112, trt_cache=tmp_path)
    with pytest.raises(SegmenterError) as err:
        check_providers(FakeSession(given), plan, tmp_path / "clip_visual.onnx")
    provider = sessions.PROVIDERS[backend]
    one_line(
        err, provider, "clip_visual.onnx", ", ".join(given), f"{provider}'s libfoo.so.13 does not load", "backend='cpu'"
    )


def test_a_provider_this_onnxruntime_lacks_says_which_onnxruntime_to_install(tmp_path):
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDAExecutionProvider")
    with pytest.raises(SegmenterError) as err:
        check_providers(FakeSession([CPU]), session_plan("cuda"), tmp_path / "clip_text.onnx")
    one_line(err, "this onnxruntime has no CUDAExecutionProvider", "pip", "backend='cpu'")


def test_a_real_session_that_onnxruntime_moved_to_the_cpu_is_refused(tiny_bundle):
    """ORT given [CUDA, CPU] without CUDA warns and opens on the CPU: the text encoder's plan must not accept that."""
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDAExecutionProvider")
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"), pytest.raises(SegmenterError) as err:
        OnnxEncoder(tiny_bundle / "clip_text.onnx", session_plan("cuda"))
    one_line(err, "asked for CUDAExecutionProvider", "ran it on CPUExecutionProvider")


@pytest.mark.parametrize("backend", ["cuda", "tensorrt"])
def test_an_image_encoder_off_the_gpu_fails_to_open(tiny_bundle, tmp_path, backend):
    """With CPU fallback disabled ORT refuses to open the session at all when a node would land on the CPU."""
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDAExecutionProvider")
    plan = session_plan(backend, image_size=112, trt_cache=tmp_path)
    with pytest.warns(UserWarning), pytest.raises(SegmenterError) as err:
        OnnxEncoder(tiny_bundle / "dinov2.onnx", plan, input_shape=SHAPE)
    one_line(err, "cannot load dinov2.onnx on", plan.provider, "fallback to CPU EP has been explicitly disabled")


def test_the_segmenter_reports_the_backend_its_sessions_run_on(tiny_bundle):
    seg = Segmenter.from_bundle(tiny_bundle, backend="cpu")
    assert seg.backend == seg.engines.clip.backend == seg.engines.dinov2.backend == "cpu"
    assert seg.engines.embedder.encoder.backend == "cpu"


def test_image_encoders_return_only_the_outputs_the_runtime_reads(tiny_bundle):
    seg = Segmenter.from_bundle(tiny_bundle, backend="cpu")
    assert list(seg.engines.clip.run()) == ["patch_embeddings"]  # not image_embedding
    assert list(seg.engines.dinov2.run()) == ["tokens"]
    with pytest.raises(SegmenterError) as err:
        OnnxEncoder(tiny_bundle / "dinov2.onnx", [CPU], input_shape=SHAPE, outputs=("patch_embeddings",))
    one_line(err, "dinov2.onnx has no output patch_embeddings", "tokens")


# --- session options -----------------------------------------------------------------------------------------------


def test_cpu_sessions_are_as_before():
    plan = session_plan("cpu", threads=3)
    options = plan.options()
    assert plan.providers == [CPU] and plan.fixed_axes == {}
    assert options.intra_op_num_threads == 3
    assert config_entry(options, INTRA_OP_SPINNING) is None and config_entry(options, DISABLE_CPU_FALLBACK) is None
    assert session_plan("cpu").options().intra_op_num_threads == 0  # ORT's default: every core


@pytest.mark.parametrize("backend", ["cuda", "tensorrt"])
def test_gpu_sessions_keep_one_cpu_thread_that_does_not_spin(tmp_path, backend):
    image = session_plan(backend, "fp16", image_size=112, trt_cache=tmp_path)
    text = session_plan(backend)
    for plan in (image, text):
        options = plan.options()
        assert options.intra_op_num_threads == 1
        assert config_entry(options, INTRA_OP_SPINNING) == "0"
    assert session_plan(backend, threads=4, image_size=112, trt_cache=tmp_path).options().intra_op_num_threads == 4
    # An image encoder runs whole on the GPU (ORT refuses the CPU provider listed next to disabled fallback);
    # the text encoder's shape arithmetic may take the CPU, and it runs on CUDA under both GPU backends.
    assert config_entry(image.options(), DISABLE_CPU_FALLBACK) == "1" and CPU not in image.providers
    assert config_entry(text.options(), DISABLE_CPU_FALLBACK) is None and text.providers == [CUDA, CPU]


def test_a_fixed_batch_axis_leaves_no_shape_arithmetic_for_the_cpu(tiny_bundle, tmp_path):
    """Why CUDA sessions fix the batch axis: ORT folds every Shape node away, so nothing small and int64 is left for the
    CUDA provider to hand to the CPU (which disabled fallback would refuse). Checked with the same graph optimisations
    on the CPU provider."""
    onnx = pytest.importorskip("onnx")
    fixed = session_plan("cuda", image_size=112).fixed_axes
    assert fixed == {"batch": 1}
    for name in ("clip_visual.onnx", "dinov2.onnx", "clip_visual.fp16.onnx"):
        counts = []
        for axes in ({}, fixed):
            options = SessionPlan([CPU], fixed_axes=axes).options()
            options.optimized_model_filepath = str(tmp_path / f"optimised_{name}")
            session = ort.InferenceSession(str(tiny_bundle / name), options, providers=[CPU])
            counts.append(sum(n.op_type == "Shape" for n in onnx.load(options.optimized_model_filepath).graph.node))
        assert counts[0] > 0 and counts[1] == 0, (name, counts)
        assert session.get_inputs()[0].shape == list(SHAPE)


# --- the TensorRT provider's caches --------------------------------------------------------------------------------


def test_tensorrt_caches_live_under_ovseg_home_keyed_by_file_precision_and_gpu(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("OVSEG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(device_module, "gpu_name", lambda: "NVIDIA GeForce RTX 4090")
    digest = sha256_file(tiny_bundle / "clip_visual.onnx")
    cache = trt_cache_dir(digest, "fp16")
    device = tmp_path / "home" / "trt_cache" / f"{digest[:16]}-fp16" / "nvidia-geforce-rtx-4090"
    assert cache.parent == device and cache.name.startswith(f"ort-{ort.__version__}_trt-")
    assert trt_cache_dir(digest, "fp32") != cache
    plan = session_plan("tensorrt", "fp16", image_size=448, trt_cache=cache)
    (name, options), *rest = plan.providers
    assert name == TRT and rest == [CUDA]
    assert options["trt_fp16_enable"] is True
    assert options["trt_engine_cache_enable"] is True and options["trt_timing_cache_enable"] is True
    for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
        assert options[key] == str(cache) and not options[key].startswith(str(tiny_bundle))
    for key in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
        assert options[key] == "pixel_values:1x3x448x448"
    monkeypatch.setattr(device_module, "gpu_name", lambda: None)
    assert trt_cache_dir(digest, "fp16").parent.name == "gpu0"


def stub_nvinfer(folder, version: int):
    """A libnvinfer whose getInferLibVersion() answers ``version`` (TensorRT 10's encoding: 10.3.0 is 100300)."""
    source = folder / f"nvinfer_{version}.c"
    source.write_text(f"int getInferLibVersion(void) {{ return {version}; }}\n")
    library = folder / f"libnvinfer_{version}.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return str(library)


def test_an_onnxruntime_or_tensorrt_upgrade_gets_a_new_engine_cache(tmp_path, monkeypatch):
    """The provider would load an engine built by another ONNX Runtime or TensorRT: each version has its directory,
    TensorRT's being the libnvinfer the provider links, whatever major the tensorrt package is."""
    monkeypatch.setenv("OVSEG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(device_module, "gpu_name", lambda: "NVIDIA Jetson AGX Orin")
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.4.0"))  # not what ORT links
    monkeypatch.setattr(sessions, "tensorrt_link", lambda: None)  # a CPU onnxruntime: no TensorRT provider
    monkeypatch.setattr(sessions.ort, "__version__", "1.20.1")
    before = trt_cache_dir("ab" * 32, "fp16")
    assert before.name == "ort-1.20.1_trt-unknown"
    monkeypatch.setattr(sessions.ort, "__version__", "1.22.0")
    assert trt_cache_dir("ab" * 32, "fp16") == before.with_name("ort-1.22.0_trt-unknown")
    monkeypatch.setattr(sessions, "tensorrt_link", lambda: stub_nvinfer(tmp_path, 100300))
    with_trt = trt_cache_dir("ab" * 32, "fp16")
    assert with_trt.name == "ort-1.22.0_trt-10.3.0"
    monkeypatch.setattr(sessions, "tensorrt_link", lambda: stub_nvinfer(tmp_path, 101601))
    assert trt_cache_dir("ab" * 32, "fp16") == with_trt.with_name("ort-1.22.0_trt-10.16.1")


def test_the_engine_build_is_announced_once_and_an_unwritable_home_is_an_error(tmp_path, caplog):
    cache = tmp_path / "home" / "trt_cache" / "key" / "gpu0"
    with caplog.at_level(logging.WARNING, logger="ovseg"):
        open_trt_cache(cache, "the DINOv2 encoder (fp16)")
    assert cache.is_dir()
    (message,) = [r.getMessage() for r in caplog.records]
    assert "DINOv2" in message and "minutes on a Jetson" in message and str(cache) in message
    caplog.clear()
    (cache / "TensorrtExecutionProvider_TRTKernel_graph_1_sm87.engine").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="ovseg"):
        open_trt_cache(cache, "the DINOv2 encoder (fp16)")
    assert not caplog.records  # built already: loading it is quick
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SegmenterError) as err:
        open_trt_cache(tmp_path / "a_file" / "trt_cache", "x")
    one_line(err, "cannot create the TensorRT engine cache", "OVSEG_HOME")


def test_the_tensorrt_backend_opens_its_cache_outside_the_bundle(bundle_copy, tmp_path, monkeypatch):
    """As far as the TensorRT path runs without TensorRT: cache under OVSEG_HOME, nothing written into the bundle."""
    if TRT in ort.get_available_providers():
        pytest.skip("this onnxruntime has TensorrtExecutionProvider")
    monkeypatch.setenv("OVSEG_HOME", str(tmp_path / "home"))
    bundle = bundle_copy.dir
    before = sorted(p.relative_to(bundle) for p in bundle.rglob("*"))
    manifest = read_manifest(bundle)
    with pytest.warns(UserWarning), pytest.raises(SegmenterError) as err:
        open_engine(bundle, manifest.dinov2, "DINOv2", "tensorrt", "fp16", None, digests=manifest.sha256)
    one_line(err, "dinov2.onnx", TRT)
    assert [p.name for p in (tmp_path / "home" / "trt_cache").iterdir()] == [
        f"{manifest.sha256['dinov2.onnx'][:16]}-fp16"
    ]
    assert sorted(p.relative_to(bundle) for p in bundle.rglob("*")) == before


def test_a_read_only_bundle_runs_on_the_cpu(bundle_copy):
    bundle = bundle_copy.dir
    before = {p: p.stat().st_mtime_ns for p in bundle.rglob("*")}
    for p in [*bundle.rglob("*"), bundle]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        seg = Segmenter.from_bundle(bundle, backend="cpu")
        result = seg(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
        assert result.label_map.shape == (60, 80)
        seg.close()
    finally:
        for p in [bundle, *bundle.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert {p: p.stat().st_mtime_ns for p in bundle.rglob("*")} == before  # root may write anyway: check nothing did


# --- stdout and run errors -----------------------------------------------------------------------------------------


def printing_session(monkeypatch):
    """ONNX Runtime's session, made to print to stdout from Python, from a raw descriptor write and from C, as its
    fallbacks and provider libraries do."""
    real = ort.InferenceSession

    def session(*args, **kwargs):
        print("Falling back to ['CPUExecutionProvider'] and retrying.")
        os.write(1, b"EP Error written to descriptor 1\n")
        ctypes.CDLL(None).printf(b"native provider message\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(sessions.ort, "InferenceSession", session)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reaches C's printf through the process's libc")
def test_nothing_onnxruntime_prints_while_a_session_opens_reaches_stdout(tiny_bundle, monkeypatch, capfd):
    printing_session(monkeypatch)
    encoder = OnnxEncoder(tiny_bundle / "dinov2.onnx", [CPU], input_shape=SHAPE)
    print("after")
    out, err = capfd.readouterr()
    assert out == "after\n"
    for line in ("Falling back", "EP Error written to descriptor 1", "native provider message"):
        assert line in err
    assert encoder.run()["tokens"].shape == (1, 64, 32)


def test_stdout_is_restored_after_an_error(capfd):
    with pytest.raises(ValueError), stdout_to_stderr():
        print("inside")
        raise ValueError
    print("outside")
    out, err = capfd.readouterr()
    assert out == "outside\n" and err == "inside\n"


def test_run_failures_are_one_line_errors_naming_the_file(tiny_bundle):
    plain = OnnxEncoder(tiny_bundle / "dinov2.onnx", [CPU], input_shape=SHAPE)
    with pytest.raises(SegmenterError) as err:
        plain.run(np.zeros((1, 3, 100, 100), np.float32))
    one_line(err, "ONNX Runtime failed to run dinov2.onnx on cpu", "invalid dimensions", "Got: 100 Expected: 112")
    bound = OnnxEncoder(tiny_bundle / "dinov2.onnx", [CPU], input_shape=SHAPE, io_binding=True)
    bound.input = np.zeros((1, 3, 100, 100), np.float32)
    with pytest.raises(SegmenterError) as err:
        bound.run()
    one_line(err, "dinov2.onnx", "invalid dimensions")
    bound.close()
    with pytest.raises(SegmenterError) as err:
        bound.run()
    one_line(err, "closed")


def test_a_model_that_fails_inside_a_run(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [2, 2])],
    )
    path = tmp_path / "reshape.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    encoder = OnnxEncoder(path, [CPU])
    assert encoder.run(np.ones(4, np.float32))["y"].shape == (2, 2)
    with pytest.raises(SegmenterError) as err:
        encoder.run(np.ones(5, np.float32))
    one_line(err, "ONNX Runtime failed to run reshape.onnx", "Reshape")


# --- the native TensorRT runner, against stand-ins for TensorRT and CUDA ------------------------------------------


class FakeCudart:
    """cuda-python's runtime calls the runner makes, on host memory; counts what was allocated, copied and freed."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = "h2d", "d2h"

    def __init__(self):
        self.buffers: dict[int, ctypes.Array] = {}
        self.pinned: set[int] = set()
        self.copies: list[tuple[str, int]] = []

    def _alloc(self, nbytes):
        buffer = ctypes.create_string_buffer(nbytes)
        self.buffers[ctypes.addressof(buffer)] = buffer
        return 0, ctypes.addressof(buffer)

    def cudaMalloc(self, nbytes):
        return self._alloc(nbytes)

    def cudaMallocHost(self, nbytes):
        err, ptr = self._alloc(nbytes)
        self.pinned.add(ptr)
        return err, ptr

    def cudaFree(self, ptr):
        del self.buffers[ptr]
        return (0,)

    def cudaFreeHost(self, ptr):
        self.pinned.remove(ptr)
        return self.cudaFree(ptr)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        ctypes.memmove(dst, src, nbytes)
        self.copies.append((kind, nbytes))
        return (0,)

    def cudaStreamCreate(self):
        return 0, Stream(0x5000)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)


class Stream:
    """cuda-python's cudaStream_t: not an int, but one to pybind11 through __index__ (as the real bindings take it)."""

    def __init__(self, handle: int):
        self.handle = handle

    def __index__(self) -> int:
        return self.handle


def fake_tensorrt(accepts_shape: bool = True, null_runtime: bool = False):
    """A plan with pixel_values -> image_embedding (1, 4), patch_embeddings (1, 3, 4): patch = mean of the input.
    Addresses and streams must be ints to pybind11 (operator.index), as the real bindings' are; a NULL runtime raises
    TypeError, as the real bindings do (tests/trt_api/check.py checks that)."""
    shapes = {"pixel_values": SHAPE, "image_embedding": (1, 4), "patch_embeddings": (1, 3, 4)}

    class Context:
        addresses: dict[str, int] = {}

        def set_input_shape(self, name, shape):
            return accepts_shape

        def get_tensor_shape(self, name):
            return shapes[name]

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = operator.index(ptr)

        def execute_async_v3(self, stream):
            operator.index(stream)

            def view(name):
                n = int(np.prod(shapes[name])) * 4
                buffer = (ctypes.c_byte * n).from_address(self.addresses[name])
                return np.frombuffer(buffer, np.float32).reshape(shapes[name])

            view("patch_embeddings")[...] = view("pixel_values").mean()
            return True

    class Engine:
        num_io_tensors = len(shapes)

        def get_tensor_name(self, i):
            return list(shapes)[i]

        def get_tensor_mode(self, name):
            return "in" if name == "pixel_values" else "out"

        def get_tensor_dtype(self, name):
            return np.float32

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            if null_runtime:
                raise TypeError("pybind11::init(): factory function returned nullptr")

        def deserialize_cuda_engine(self, data):
            return Engine()

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    return types.SimpleNamespace(
        Runtime=Runtime, Logger=Logger, TensorIOMode=types.SimpleNamespace(INPUT="in"), nptype=lambda t: t
    )


def test_the_tensorrt_runner_copies_each_used_output_once_through_pinned_memory(tmp_path, monkeypatch):
    cudart = FakeCudart()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    monkeypatch.setattr(tensorrt_module, "_cudart", lambda: cudart)
    plan = tmp_path / "clip.plan"
    plan.write_bytes(b"plan")
    engine = tensorrt_module.TensorRTEngine(plan, SHAPE, outputs=("patch_embeddings",))
    assert engine.backend == "tensorrt"
    assert len(cudart.pinned) == 2  # the input and the one output read; image_embedding stays on the device
    engine.input[...] = 0.5
    first = engine.run()
    assert list(first) == ["patch_embeddings"] and np.all(first["patch_embeddings"] == 0.5)
    assert cudart.copies == [("h2d", int(np.prod(SHAPE)) * 4), ("d2h", 3 * 4 * 4)]
    engine.input[...] = 2.0
    engine.run()
    assert np.all(first["patch_embeddings"] == 0.5)  # what a caller kept is its own
    engine.close()
    assert not cudart.buffers and not cudart.pinned and engine.input.size == 0


def test_the_tensorrt_runner_refuses_an_input_shape_outside_its_profile(tmp_path, monkeypatch):
    cudart = FakeCudart()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(accepts_shape=False))
    monkeypatch.setattr(tensorrt_module, "_cudart", lambda: cudart)
    plan = tmp_path / "clip.plan"
    plan.write_bytes(b"plan")
    with pytest.raises(SegmenterError) as err:
        tensorrt_module.TensorRTEngine(plan, SHAPE)
    one_line(err, "clip.plan does not take pixel_values of shape (1, 3, 112, 112)", "rebuild the plan")
    assert not cudart.buffers  # nothing left allocated


def test_the_tensorrt_runner_without_a_usable_gpu_says_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(null_runtime=True))
    monkeypatch.setattr(tensorrt_module, "_cudart", FakeCudart)
    plan = tmp_path / "clip.plan"
    plan.write_bytes(b"plan")
    with pytest.raises(SegmenterError) as err:
        tensorrt_module.TensorRTEngine(plan, SHAPE)
    one_line(err, "TensorRT cannot create a runtime here for clip.plan (no usable CUDA GPU or driver", "backend='cpu'")


def no_cuda_python():
    raise SegmenterError("no cuda-python")


def test_without_nvidia_smi_the_device_key_is_gpu0(monkeypatch):
    device_module.gpu_name.cache_clear()
    monkeypatch.setattr(device_module, "is_jetson", lambda: False)
    monkeypatch.setattr(device_module, "_cudart", no_cuda_python)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    try:
        assert device_module.gpu_name() is None and device_module.device_key() == "gpu0"
    finally:
        device_module.gpu_name.cache_clear()


@pytest.mark.parametrize(
    "visible, asked",
    [
        (None, "0"),
        ("2,0", "2"),
        ("GPU-8f6e2c1a-0000-1111-2222-333344445555", "GPU-8f6e2c1a-0000-1111-2222-333344445555"),
        ("-1", None),
        ("", None),
    ],
)
def test_nvidia_smi_is_asked_about_the_gpu_cuda_uses(monkeypatch, visible, asked):
    """ONNX Runtime and TensorRT run on CUDA's device 0, the first of CUDA_VISIBLE_DEVICES; nvidia-smi numbers every
    GPU whatever that says, so the device key asks it about that one."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(device_module, "is_jetson", lambda: False)
    monkeypatch.setattr(device_module, "_cudart", no_cuda_python)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    calls = []

    def smi(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="NVIDIA L4\n", stderr="")

    monkeypatch.setattr(subprocess, "run", smi)
    device_module.gpu_name.cache_clear()
    try:
        if asked is None:
            assert device_module.device_key() == "gpu0" and not calls
        else:
            assert device_module.device_key() == "nvidia-l4"
            assert [a[-1] for a in calls] == [f"--id={asked}"]
    finally:
        device_module.gpu_name.cache_clear()


def test_cuda_python_names_the_gpu_when_it_imports(monkeypatch):
    props = types.SimpleNamespace(name=b"NVIDIA H200\0\0", major=9, minor=0)
    cudart = types.SimpleNamespace(cudaGetDeviceProperties=lambda device: (0, props))
    monkeypatch.setattr(device_module, "is_jetson", lambda: False)
    monkeypatch.setattr(device_module, "_cudart", lambda: cudart)
    monkeypatch.setattr(shutil, "which", lambda name: pytest.fail("nvidia-smi asked although CUDA answered"))
    device_module.gpu_name.cache_clear()
    try:
        assert device_module.device_key() == "nvidia-h200"
    finally:
        device_module.gpu_name.cache_clear()


# --- which backend runs here ---------------------------------------------------------------------------------------


def test_auto_takes_cuda_only_where_its_provider_opens_a_session(monkeypatch, caplog):
    """onnxruntime-gpu lists CUDA whether or not it loads: auto asks the probe, and says why it stays on the CPU."""
    problems = {CUDA: "no NVIDIA driver (libcuda.so.1 does not load): install the driver"}
    monkeypatch.setattr(sessions, "provider_problem", problems.get)
    with caplog.at_level(logging.WARNING, logger="ovseg"):
        assert sessions.resolve_backend("auto", WITH_GPU) == "cpu"
    assert [r.getMessage() for r in caplog.records] == [
        f"backend auto runs on the CPU: CUDA cannot run here ({problems[CUDA]})"
    ]
    for backend in ("cuda", "tensorrt"):
        problems[sessions.PROVIDERS[backend]] = f"{backend} is missing something"
        with pytest.raises(SegmenterError) as err:
            sessions.resolve_backend(backend, WITH_GPU)
        one_line(err, f"backend '{backend}' cannot run here: {backend} is missing something", "backend='cpu'")
    problems.clear()
    assert sessions.resolve_backend("auto", WITH_GPU) == "cuda"
    assert sessions.resolve_backend("tensorrt", WITH_GPU) == "tensorrt"


def test_the_probe_model_is_one_node_that_runs():
    session = ort.InferenceSession(str(sessions.PROBE_MODEL), providers=[CPU])
    assert [n.name for n in session.get_inputs()] == ["x"] and sessions.PROBE_MODEL.stat().st_size < 200
    assert session.run(None, {"x": np.full(1, 2.0, np.float32)})[0].tolist() == [3.0]


def test_the_probe_names_a_missing_driver_before_anything_else(monkeypatch):
    monkeypatch.setattr(sessions, "_loads", lambda library: library != "libcuda.so.1")
    sessions.provider_problem.cache_clear()
    try:
        assert sessions.provider_problem(CUDA).startswith("no NVIDIA driver (libcuda.so.1 does not load)")
    finally:
        sessions.provider_problem.cache_clear()


def test_a_fixed_batch_axis_runs_a_batch_frame_by_frame(tiny_bundle):
    """GPU image sessions fix the batch axis to 1: Segmenter.batch must then run four streams' frames one by one, with
    the results each stream gets alone (the CUDA session's options, on the CPU provider)."""
    from test_batch import moving_frames, same

    from ovseg.runtime.segmenter import VideoStream

    cuda = session_plan("cuda", image_size=112)
    plan = SessionPlan([CPU], 1, {INTRA_OP_SPINNING: "0"}, cuda.fixed_axes)
    opened = []

    def image_encoder(info, role, output):
        shape = (1, 3, info.image_size, info.image_size)
        opened.append(OnnxEncoder(tiny_bundle / info.files["fp32"], plan, input_shape=shape, outputs=(output,)))
        return opened[-1]

    videos = [moving_frames(s, 3, (96, 128)) for s in range(4)]
    alone = []
    with Segmenter.from_bundle(tiny_bundle, threads=1) as plain:
        for video in videos:
            stream = VideoStream()
            alone.append([plain.batch([f], [stream])[0] for f in video])
    with Segmenter.from_bundle(tiny_bundle, threads=1, image_encoder=image_encoder) as seg:
        assert [e.max_batch for e in opened] == [1, 1]
        streams = [VideoStream() for _ in videos]
        for t in range(3):
            for k, result in enumerate(seg.batch([v[t] for v in videos], streams)):
                same(result, alone[k][t])


def test_node_placement_comes_from_a_profiled_run(tiny_bundle, tmp_path):
    options = SessionPlan([CPU], 1).options()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(tiny_bundle / "dinov2.onnx"), options, providers=[CPU])
    nodes = sessions.placement(session, {"pixel_values": np.zeros(SHAPE, np.float32)})
    assert list(nodes) == [CPU] and nodes[CPU] >= 10
    assert list(tmp_path.iterdir()) == []  # the profile is read and deleted


def test_the_backend_is_where_the_nodes_ran(tmp_path, monkeypatch, caplog):
    """ORT lists every provider it registered; the profiled run says which ran nodes."""
    monkeypatch.setattr(sessions, "provider_problem", lambda provider: None)
    trt, cuda = (session_plan(b, image_size=112, trt_cache=tmp_path) for b in ("tensorrt", "cuda"))
    path = tmp_path / "clip_visual.onnx"
    with caplog.at_level(logging.WARNING, logger="ovseg"):
        assert check_providers(FakeSession(WITH_GPU), trt, path, {TRT: 30}) == "tensorrt"
        assert check_providers(FakeSession(WITH_GPU), trt, path, {TRT: 28, CUDA: 2}) == "tensorrt+cuda"
    assert [r.getMessage() for r in caplog.records] == [
        f"clip_visual.onnx: {TRT} runs 28 of its 30 nodes, {CUDA} the rest"
    ]
    for given, nodes in ((trt, {CUDA: 30}), (cuda, {CPU: 30})):
        with pytest.raises(SegmenterError) as err:
            check_providers(FakeSession(WITH_GPU[1:] if given is cuda else WITH_GPU), given, path, nodes)
        one_line(err, f"asked for {given.provider}", f"ran it on {next(iter(nodes))} (30 nodes)", "backend='cpu'")


def test_cuda_python_newer_than_the_driver_says_which_to_install(monkeypatch):
    """cuda-python 13 on a CUDA 12 driver (JetPack 6, drivers before 580): every call fails with error 35."""
    monkeypatch.setattr(device_module, "driver_cuda", lambda: "12.6")
    monkeypatch.setattr(device_module, "installed", lambda names: {"cuda-bindings": "13.4.4"})
    monkeypatch.setattr(
        device_module, "_cudart", lambda: types.SimpleNamespace(cudaGetDeviceProperties=lambda i: (35, None))
    )
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    device_module.this_device.cache_clear()
    with pytest.raises(SegmenterError) as err:
        device_module.this_device()
    device_module.this_device.cache_clear()
    one_line(err, "cuda-python 13.4.4 needs a newer driver", "CUDA 12.6 at most", "pip install 'cuda-python>=12,<13'")
