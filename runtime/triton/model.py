"""The Python backend model that tritonserver runs: one Segmenter per model instance, one VideoStream per sequence.

Triton's sequence batcher routes every request of a camera stream (its correlation id) to one instance, in order;
START starts the stream afresh, END forgets it, and a stream idle for longer than the repository's idle time is
forgotten here as Triton forgets it. The requests of one ``execute`` call (frames of several streams waiting together)
go through ``Segmenter.batch``: each encoder runs once on them.

Runs inside tritonserver's Python stub, where ``triton_python_backend_utils`` is importable; the repository's
model.py imports this module (repository.py).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import cv2
import numpy as np

from ovseg.errors import SegmenterError

from ..bundle.manifest import EncoderInfo
from ..config import SegmenterConfig
from ..pipeline.preprocess import check_frame
from ..segmenter import Segmenter, VideoStream
from .protocol import (
    CORRID,
    ENCODER_INPUT,
    ENCODER_MODELS,
    END,
    FRAME,
    IMAGE,
    LABEL_MAP,
    OPTIONS,
    SEGMENTS,
    START,
    RequestOptions,
    ServingError,
)

# Segmenters for distinct request options (classes, vocabulary, top_k, threshold) kept at once; they share the encoders.
MAX_VARIANTS = 16


@dataclass
class HeldStream:
    stream: VideoStream
    options: str  # the options its labels were made with (RequestOptions.to_json)
    seen: float  # time.monotonic() of its last request


@dataclass
class Work:
    index: int  # of the request in execute's list
    corrid: int
    frame: np.ndarray
    segmenter: Segmenter
    end: bool


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.idle_seconds = float(params["idle_seconds"])
        self.max_pixels = int(params["max_pixels"])
        self.instance = args.get("model_instance_name", "ovseg")
        settings = json.loads(params["segmenter"])
        config = SegmenterConfig(**settings.pop("config", {}))
        if params["encoders"] == "onnxruntime":  # the encoders are models of this server (repository.py)
            config = replace(config, precision=params["encoder_precision"])
            settings |= {"backend": "triton", "image_encoder": partial(ServedEncoder, pb_utils)}
        self.segmenter = Segmenter.from_bundle(params["bundle"], config=config, **settings)
        self.variants: OrderedDict[str, Segmenter] = OrderedDict()
        self.streams: dict[int, HeldStream] = {}

    def execute(self, requests: list) -> list:
        now = time.monotonic()
        for corrid in [c for c, h in self.streams.items() if now - h.seen > self.idle_seconds]:
            del self.streams[corrid]
        responses: list = [None] * len(requests)
        work: list[Work] = []
        for i, request in enumerate(requests):
            try:
                work.append(self._accept(i, request, now))
            except SegmenterError as e:
                responses[i] = self._error(str(e))
        while work:  # a batch holds one frame per stream; a stream's next frame waits for the next
            batch: dict[int, Work] = {}
            for w in work:
                batch.setdefault(w.corrid, w)
            work = [w for w in work if batch[w.corrid] is not w]
            groups: dict[int, list[Work]] = {}  # by the Segmenter variant that serves their options
            for w in batch.values():
                groups.setdefault(id(w.segmenter), []).append(w)
            for group in groups.values():
                self._run(group, responses)
        return responses

    def finalize(self) -> None:
        self.segmenter.close()

    def _accept(self, index: int, request, now: float) -> Work:
        controls = (self.pb.get_input_tensor_by_name(request, name).as_numpy() for name in (CORRID, START, END))
        corrid, start, end = (int(c.flat[0]) for c in controls)  # Triton's sequence batcher always sends them
        frame = self._frame(request)
        raw = self._input(request, OPTIONS)
        options = RequestOptions.from_json(raw.flat[0] if raw is not None else b"")
        key = options.to_json()
        segmenter = self._variant(options, key)
        held = self.streams.get(corrid)
        if start or held is None:
            held = self.streams[corrid] = HeldStream(VideoStream(), key, now)
        elif held.options != key:
            held.stream.vocab_version, held.options = -1, key  # new names: labels start afresh, segments continue
        held.seen = now
        return Work(index, corrid, frame, segmenter, bool(end))

    def _frame(self, request) -> np.ndarray:
        image, raw = self._input(request, IMAGE), self._input(request, FRAME)
        if image is not None and raw is None:
            data = image.flat[0]
            decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
            if decoded is None:
                raise ServingError(
                    f"IMAGE ({len(data)} bytes) is not an image OpenCV can decode: send JPEG or PNG bytes"
                )
            raw = decoded[None]
        elif image is not None or raw is None:
            raise ServingError(
                "send one of IMAGE (JPEG/PNG bytes) or FRAME (uint8 H x W x C pixels), not both or neither"
            )
        frame = check_frame(raw[0])  # the Segmenter's own check, so that this request alone is refused
        if frame.shape[0] * frame.shape[1] > self.max_pixels:
            raise ServingError(
                f"the frame is {frame.shape[1]} x {frame.shape[0]}, over this server's {self.max_pixels} pixels: "
                "send it smaller (the encoders see it at a few hundred pixels) or start ovseg-serve with --max-pixels"
            )
        return frame

    def _variant(self, options: RequestOptions, key: str) -> Segmenter:
        if key in self.variants:
            self.variants.move_to_end(key)
            return self.variants[key]
        given: dict[str, Any] = {"top_k": options.top_k, "score_threshold": options.threshold}
        variant = self.segmenter.with_config(
            replace(self.segmenter.config, **{k: v for k, v in given.items() if v is not None})
        )
        if options.vocabulary is not None:
            variant.set_vocabulary(options.vocabulary)
        if options.classes is not None:
            variant.set_classes(options.classes)
        self.variants[key] = variant
        while len(self.variants) > MAX_VARIANTS:
            self.variants.popitem(last=False)
        return variant

    def _run(self, group: list[Work], responses: list) -> None:
        streams = [self.streams[w.corrid].stream for w in group]
        try:
            results = group[0].segmenter.batch([w.frame for w in group], streams)
        except SegmenterError as e:
            for w in group:
                responses[w.index] = self._error(str(e))
            return
        for w, result in zip(group, results):
            if w.end:
                self.streams.pop(w.corrid, None)
            body = result.to_json_dict() | {"server": {"instance": self.instance, "streams": len(self.streams)}}
            responses[w.index] = self.pb.InferenceResponse(
                output_tensors=[
                    self.pb.Tensor(LABEL_MAP, result.label_map.astype(np.int32)[None]),
                    self.pb.Tensor(SEGMENTS, np.array([[json.dumps(body).encode()]], dtype=object)),
                ]
            )

    def _input(self, request, name: str) -> np.ndarray | None:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _error(self, message: str):
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message))


class ServedEncoder:
    """An image encoder that another model of this Triton server runs (business logic scripting), batched there."""

    max_batch = None  # Triton's dynamic batcher splits what its encoder models' max_batch_size does not take
    backend = "triton"

    def __init__(self, pb, info: EncoderInfo, role: str, output: str):
        self.pb, self.model, self.output = pb, ENCODER_MODELS[role], output
        self.input = np.zeros((1, 3, info.image_size, info.image_size), np.float32)

    def run(self, x: np.ndarray | None = None) -> dict[str, np.ndarray]:
        request = self.pb.InferenceRequest(
            model_name=self.model,
            inputs=[self.pb.Tensor(ENCODER_INPUT, self.input if x is None else x)],
            requested_output_names=[self.output],
        )
        response = request.exec()
        if response.has_error():
            raise SegmenterError(f"Triton model {self.model} failed: {response.error().message()}")
        tensor = self.pb.get_output_tensor_by_name(response, self.output)
        if tensor is None or not tensor.is_cpu():
            raise SegmenterError(f"Triton model {self.model} returned no {self.output} in CPU memory")
        return {self.output: tensor.as_numpy()}

    def close(self) -> None:
        pass
