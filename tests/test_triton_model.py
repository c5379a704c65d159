"""The Triton model and its repository without a server: config.pbtxt parsed by Triton's own schema, and the Python
model run in this process with a stand-in for the backend's ``triton_python_backend_utils`` (the GPU variant's
encoder models run by ONNX Runtime on the CPU, as Triton's onnxruntime backend would run them)."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_batch import moving_frames

from ovseg.errors import OvsegError
from ovseg.runtime import Segmenter
from ovseg.runtime.segmenter import VideoStream
from ovseg.runtime.triton.protocol import CORRID, END, FRAME, LABEL_MAP, OPTIONS, SEGMENTS, START, ServingError
from ovseg.runtime.triton.repository import RepositoryConfig, write_repository

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="pip install 'ovseg[client]'")
text_format = pytest.importorskip("google.protobuf.text_format")
json_format = pytest.importorskip("google.protobuf.json_format")


class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self._name, self.array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self.array

    def is_cpu(self) -> bool:
        return True


class Error:
    def __init__(self, message: str):
        self._message = message

    def message(self) -> str:
        return self._message


class Response:
    def __init__(self, output_tensors=(), error=None):
        self.output_tensors, self.error_ = list(output_tensors), error

    def has_error(self) -> bool:
        return self.error_ is not None

    def error(self):
        return self.error_


def backend_utils(repository: Path, calls: list) -> types.ModuleType:
    """triton_python_backend_utils as far as ovseg's model uses it; BLS requests run the repository's ONNX models."""
    sessions: dict[str, ort.InferenceSession] = {}

    class InferenceRequest:
        def __init__(self, model_name, inputs, requested_output_names):
            self.model, self.inputs, self.outputs = model_name, inputs, requested_output_names

        def exec(self) -> Response:
            if self.model not in sessions:
                path = repository / self.model / "1" / "model.onnx"
                sessions[self.model] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            calls.append((self.model, self.inputs[0].as_numpy().shape[0]))
            feed = {t.name(): t.as_numpy() for t in self.inputs}
            return Response([Tensor(n, v) for n, v in zip(self.outputs, sessions[self.model].run(self.outputs, feed))])

    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor, pb.TritonError, pb.InferenceResponse, pb.InferenceRequest = Tensor, Error, Response, InferenceRequest
    pb.get_input_tensor_by_name = lambda request, name: request.get(name)
    pb.get_output_tensor_by_name = lambda response, name: next(
        (t for t in response.output_tensors if t.name() == name), None
    )
    return pb


def request(corrid: int, frame: np.ndarray, start: bool = False, end: bool = False, options: dict | None = None):
    r = {
        CORRID: Tensor(CORRID, np.array([[corrid]], np.uint64)),
        START: Tensor(START, np.array([[int(start)]], np.int32)),
        END: Tensor(END, np.array([[int(end)]], np.int32)),
        FRAME: Tensor(FRAME, frame[None]),
    }
    if options is not None:
        r[OPTIONS] = Tensor(OPTIONS, np.array([[json.dumps(options).encode()]], dtype=object))
    return r


def load(repository: Path, monkeypatch, calls: list):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", backend_utils(repository, calls))
    config = text_format.Parse((repository / "ovseg" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    from ovseg.runtime.triton.model import TritonPythonModel

    model = TritonPythonModel()
    as_json = json_format.MessageToJson(config, preserving_proto_field_name=True)
    model.initialize({"model_config": as_json, "model_instance_name": "ovseg_0"})
    return model, config


@pytest.mark.parametrize("encoders", ["python", "onnxruntime"])
def test_the_model_batches_streams_and_equals_a_local_segmenter(tiny_bundle, tmp_path, monkeypatch, encoders) -> None:
    repository = tmp_path / "repository"
    write_repository(tiny_bundle, repository, RepositoryConfig(segmenter={"threads": 1}, encoders=encoders))
    calls: list = []
    model, config = load(repository, monkeypatch, calls)
    assert config.sequence_batching.oldest.max_candidate_sequences == 64 and config.max_batch_size == 8
    videos = [moving_frames(k, 3, shape) for k, shape in enumerate([(64, 80), (72, 72)])]
    answers = []
    for t in range(3):
        responses = model.execute([request(100 + k, v[t], start=t == 0) for k, v in enumerate(videos)])
        assert not any(r.has_error() for r in responses)
        answers.append(responses)
    if encoders == "onnxruntime":
        encoder_configs = {p.parent.name: p.read_text() for p in repository.glob("ovseg_*/config.pbtxt")}
        assert sorted(encoder_configs) == ["ovseg_clip", "ovseg_dinov2"]
        for text in encoder_configs.values():
            parsed = text_format.Parse(text, model_config_pb2.ModelConfig())
            assert parsed.backend == "onnxruntime" and parsed.max_batch_size == 8
        assert ("ovseg_dinov2", 2) in calls and ("ovseg_clip", 2) in calls  # both streams in one encoder run
    else:
        assert calls == []
    with Segmenter.from_bundle(tiny_bundle, threads=1) as seg:
        for k, video in enumerate(videos):
            stream = VideoStream()
            for t, frame in enumerate(video):
                local = seg.batch([frame], [stream])[0]
                outputs = {o.name(): o.as_numpy() for o in answers[t][k].output_tensors}
                assert np.array_equal(outputs[LABEL_MAP][0], local.label_map)
                body = json.loads(outputs[SEGMENTS].reshape(-1)[0])
                assert [s["label"] for s in body["segments"]] == [s.label for s in local.segments]
    model.finalize()


def test_a_fixed_batch_backend_serves_four_streams_at_once(tiny_bundle, tmp_path, monkeypatch) -> None:
    """GPU sessions fix the image encoders' batch axis to 1: four streams sent together are still each served as alone
    (the CUDA session's options, on the CPU provider)."""
    from ovseg.runtime.engines import engine as engine_module
    from ovseg.runtime.engines import sessions

    real = sessions.session_plan

    def cuda_options_on_the_cpu(backend, precision="fp32", threads=None, image_size=None, trt_cache=None):
        plan = real(backend, precision, threads, image_size, trt_cache)
        cuda = real("cuda", precision, threads, image_size)
        return sessions.SessionPlan(plan.providers, cuda.threads, {sessions.INTRA_OP_SPINNING: "0"}, cuda.fixed_axes)

    monkeypatch.setattr(engine_module, "session_plan", cuda_options_on_the_cpu)
    repository = tmp_path / "repository"
    write_repository(tiny_bundle, repository, RepositoryConfig(segmenter={"threads": 1}))
    model, _ = load(repository, monkeypatch, [])
    assert model.segmenter.engines.clip.max_batch == model.segmenter.engines.dinov2.max_batch == 1
    videos = [moving_frames(k, 2, (64, 80)) for k in range(4)]
    answers = [model.execute([request(200 + k, v[t], start=t == 0) for k, v in enumerate(videos)]) for t in range(2)]
    model.finalize()
    monkeypatch.setattr(engine_module, "session_plan", real)
    with Segmenter.from_bundle(tiny_bundle, threads=1) as seg:
        for k, video in enumerate(videos):
            stream = VideoStream()
            for t, frame in enumerate(video):
                assert not answers[t][k].has_error(), answers[t][k].error().message()
                label_map = {o.name(): o.as_numpy() for o in answers[t][k].output_tensors}[LABEL_MAP][0]
                assert np.array_equal(label_map, seg.batch([frame], [stream])[0].label_map)


def test_bad_requests_get_an_error_each_and_the_rest_are_served(tiny_bundle, tmp_path, monkeypatch) -> None:
    repository = tmp_path / "repository"
    write_repository(tiny_bundle, repository, RepositoryConfig(segmenter={"threads": 1}, max_pixels=100 * 100))
    model, _ = load(repository, monkeypatch, [])
    good = moving_frames(1, 1, (48, 48))[0]
    bad = [
        (request(1, np.zeros((32, 32, 5), np.uint8), start=True), "HxWx4 (BGRA), got shape (32, 32, 5)"),
        (request(2, np.zeros((200, 200, 3), np.uint8), start=True), "200 x 200, over this server's 10000 pixels"),
        (request(3, good, start=True, options={"classes": []}), "no class names"),
        (request(4, good, start=True, options={"top_k": "three"}), "top_k must be an integer"),
        (request(5, good, start=True, options={"colour": 1}), "unknown keys"),
        (request(6, good, start=True, options={"classes": "no-such-preset-or-file"}), "no-such-preset-or-file"),
    ]
    responses = model.execute([r for r, _ in bad] + [request(7, good, start=True, options={"classes": ["cat", "dog"]})])
    for response, (_, message) in zip(responses, bad):
        assert response.has_error() and message in response.error().message(), response.error().message()
    assert not responses[-1].has_error()
    body = json.loads(responses[-1].output_tensors[1].as_numpy().reshape(-1)[0])
    assert {s["label"] for s in body["segments"]} <= {"cat", "dog"}
    model.finalize()


def test_repository_refuses_a_bad_bundle_and_settings(tmp_path) -> None:
    with pytest.raises(OvsegError, match="no bundle at"):
        write_repository(tmp_path / "missing", tmp_path / "repository", RepositoryConfig())
    with pytest.raises(ServingError, match="idle timeout"):
        write_repository(tmp_path / "missing", tmp_path / "repository", RepositoryConfig(idle_seconds=0))


def test_a_served_bundle_is_checked_against_the_trusted_keys(tiny_bundle, tmp_path, monkeypatch) -> None:
    from ovseg.runtime.bundle.signing import new_key, sign_bundle
    from ovseg.runtime.triton.cli import main

    monkeypatch.setenv("OVSEG_HOME", str(tmp_path / "home"))
    (tmp_path / "keys").mkdir()
    private, public = new_key(tmp_path / "keys" / "fleet")
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    repository = tmp_path / "repository"
    argv = ["--bundle", str(bundle), "--trusted-key", str(public), "--repository", str(repository), "--generate-only"]
    assert main(argv) == 2 and not (repository / "ovseg").exists()  # unsigned: refused before anything is written
    sign_bundle(bundle, private)
    assert main(argv) == 0
    params = text_format.Parse((repository / "ovseg" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert json.loads(params.parameters["segmenter"].string_value)["trusted_keys"] == [str(public.resolve())]


def test_the_client_changes_options_as_a_segmenter_changes_names() -> None:
    from ovseg.runtime.triton.client import RemoteSegmenter

    client = RemoteSegmenter(["127.0.0.1:1"])  # no request is sent
    client.set_vocabulary(["pallet", "forklift"])
    client.set_classes(["person"])
    assert (client.mode, client.options.classes, client.options.vocabulary) == (
        "guided",
        ["person"],
        ["pallet", "forklift"],
    )
    client.set_classes(None)  # back to guidance-free, with the vocabulary set before
    assert (client.mode, client.options.vocabulary) == ("guidance-free", ["pallet", "forklift"])
    assert json.loads(client.options.to_json())["vocabulary"] == ["pallet", "forklift"]
    client.close()
