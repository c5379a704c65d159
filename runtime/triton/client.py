"""The client of ovseg's Triton model: streams of frames to one or more servers, each stream one sequence.

Streams are spread across the servers in turn. A server that cannot be reached is retried with back-off and reported;
when it stays away the stream moves to the next server and starts its sequence again (its video state is the
server's). ``RemoteSegmenter`` answers like a Segmenter, so ``ovseg-run --server`` shows, saves and prints remote
results exactly as local ones.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import replace
from urllib.parse import urlsplit

import numpy as np

from ..config import SegmenterConfig
from ..pipeline.render import overlay
from ..result import Result, Segment
from .protocol import FRAME, LABEL_MAP, MODEL, OPTIONS, SEGMENTS, RequestOptions, ServingError

log = logging.getLogger("ovseg")
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)  # seconds between tries at one server before the next one is tried
# gRPC status codes that mean "the server is not there (yet)", as opposed to "it refused this request".
FORGOTTEN = "must specify the START flag"  # Triton's answer to a frame of a sequence it does not hold
UNREACHABLE = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED")


def parse_servers(values: list[str]) -> list[str]:
    """``grpc://HOST:PORT`` URLs (repeated, or comma lists) as ``HOST:PORT``; ServingError for anything else."""
    servers = []
    for value in (v.strip() for item in values for v in item.split(",")):
        if not value:
            continue
        url = urlsplit(value if "://" in value else f"grpc://{value}")
        if url.scheme != "grpc" or not url.hostname or url.port is None or url.path not in ("", "/"):
            raise ServingError(f"--server takes grpc://HOST:PORT, got {value!r}")
        servers.append(f"{url.hostname}:{url.port}")
    if not servers:
        raise ServingError("--server got no address: give grpc://HOST:PORT")
    return servers


class RemoteStream:
    """One camera stream: a sequence on one server at a time."""

    def __init__(self, owner: RemoteSegmenter, first: int):
        self.owner = owner
        self.corrid = random.getrandbits(63) or 1
        self.server = first  # index into owner.servers
        self.started = False
        self.frames = 0

    def __call__(self, frame: np.ndarray, end: bool = False) -> Result:
        start = time.perf_counter()
        tries = itertools.chain.from_iterable(
            ((s, d) for d in (0.0, *self.owner.retry_delays)) for s in self.owner.rotation(self.server)
        )
        last = ""
        for server, delay in tries:
            if delay:
                self.owner.report(f"server {self.owner.servers[server]} unreachable ({last}); retrying in {delay:g} s")
                time.sleep(delay)
            if server != self.server:
                self.owner.report(f"stream moves to server {self.owner.servers[server]}")
                self.server, self.started = server, False
            try:
                outputs = self.owner.infer(server, frame, self.corrid, not self.started, end)
            except ServingError as e:
                if FORGOTTEN in str(e) and self.started:  # dropped when idle, or the server restarted
                    self.owner.report(f"server {self.owner.servers[server]} forgot the stream; starting it again")
                    self.started = False
                    outputs = self.owner.infer(server, frame, self.corrid, True, end)
                elif not str(e).startswith(UNREACHABLE):
                    raise ServingError(str(e).split(": ", 1)[-1]) from None
                else:
                    last, self.started = str(e).split(": ", 1)[-1][:120], False
                    continue
            self.started = not end
            return self._result(*outputs, (time.perf_counter() - start) * 1000)
        raise ServingError(f"no server answered ({', '.join(self.owner.servers)}): {last}")

    def _result(self, label_map: np.ndarray, body: dict, total_ms: float) -> Result:
        segments = [
            Segment(s["id"], s["label"], s["score"], s["area"], tuple(s["bbox"]), [tuple(a) for a in s["alternatives"]])
            for s in body["segments"]
        ]
        timings = dict(body["timings_ms"])
        timings["total"] = total_ms  # as this client waited for it, network included
        self.frames += 1
        return Result(
            label_map,
            segments,
            {s.id: s.label for s in segments},
            timings,
            body["frame"],
            body["keyframe"],
            body["change"],
        )


class RemoteSegmenter:
    """Segmenter-like access to ovseg-serve: ``__call__`` runs the calling code's stream, ``stream()`` makes more."""

    def __init__(
        self,
        servers: list[str],
        options: RequestOptions | None = None,
        timeout: float = 30.0,
        report: Callable[[str], None] | None = None,
        retry_delays: tuple[float, ...] = RETRY_DELAYS,
    ):
        try:
            import tritonclient.grpc as grpcclient
        except ImportError:
            raise ServingError("ovseg-run --server needs the Triton client: pip install 'ovseg[client]'") from None
        self._grpc = grpcclient
        self.servers = list(servers)
        self.options = options or RequestOptions()
        self.timeout, self.retry_delays = timeout, retry_delays
        self.report = report or (lambda message: log.warning("%s", message))
        self._clients = [grpcclient.InferenceServerClient(url=s) for s in self.servers]
        self._next = 0
        self._default: RemoteStream | None = None

    @classmethod
    def open(
        cls,
        servers: list[str],
        classes: list[str] | str | None = None,
        vocab: list[str] | str | None = None,
        score_threshold: float | None = None,
        top_k: int | None = None,
    ) -> RemoteSegmenter:
        return cls(servers, RequestOptions(classes, vocab, top_k, score_threshold))

    def stream(self) -> RemoteStream:
        first = self._next % len(self.servers)
        self._next += 1
        return RemoteStream(self, first)

    def rotation(self, first: int) -> list[int]:
        return [(first + i) % len(self.servers) for i in range(len(self.servers))]

    def infer(self, server: int, frame: np.ndarray, corrid: int, start: bool, end: bool) -> tuple[np.ndarray, dict]:
        g = self._grpc
        frame = np.ascontiguousarray(frame if frame.ndim == 3 else frame[:, :, None])
        if frame.dtype != np.uint8:
            raise ServingError(f"--server sends uint8 frames, got {frame.dtype}")
        pixels = g.InferInput(FRAME, [1, *frame.shape], "UINT8")
        pixels.set_data_from_numpy(frame[None])
        options = g.InferInput(OPTIONS, [1, 1], "BYTES")
        options.set_data_from_numpy(np.array([[self.options.to_json().encode()]], dtype=object))
        try:
            response = self._clients[server].infer(
                MODEL,
                [pixels, options],
                sequence_id=corrid,
                sequence_start=start,
                sequence_end=end,
                outputs=[g.InferRequestedOutput(LABEL_MAP), g.InferRequestedOutput(SEGMENTS)],
                client_timeout=self.timeout,
            )
        except Exception as e:  # tritonclient raises InferenceServerException, grpc its own errors
            raise ServingError(_one_line(e)) from None
        label_map, body = response.as_numpy(LABEL_MAP), response.as_numpy(SEGMENTS)
        if label_map is None or body is None or label_map.size == 0 or body.size == 0:
            raise ServingError(f"server {self.servers[server]} answered without data: is it ovseg-serve's model?")
        return label_map[0], json.loads(body.reshape(-1)[0])

    # ---- what ovseg-run uses of a Segmenter ----------------------------------------------------------------------

    def __call__(self, frame: np.ndarray) -> Result:
        if self._default is None:
            self._default = self.stream()
        return self._default(frame)

    def reset(self) -> None:
        self._default = None  # the next frame starts a new sequence; the old one ends on the server's idle timeout

    def set_classes(self, names: list[str] | str | None) -> None:
        """As Segmenter.set_classes: guided mode with these classes, None back to guidance-free (the vocabulary stays)."""
        self.options = replace(self.options, classes=names)

    def set_vocabulary(self, names: list[str] | str) -> None:
        self.options = replace(self.options, vocabulary=names)

    def render(self, frame_bgr: np.ndarray, result: Result, alpha: float = 0.5, legend: bool = True) -> np.ndarray:
        return overlay(frame_bgr, result, alpha, legend)

    @property
    def mode(self) -> str:
        return "guided" if self.options.classes is not None else "guidance-free"

    @property
    def backend(self) -> str:
        return f"Triton at {', '.join(f'grpc://{s}' for s in self.servers)}"

    @property
    def precision(self) -> str:
        return "the server's precision"

    random_weights = False  # the server says so in its own log

    def close(self) -> None:
        for client in self._clients:
            client.close()


def _one_line(e: Exception) -> str:
    """``STATUS: message`` of a tritonclient / gRPC error, on one line."""
    status, message = (getattr(e, name, None) for name in ("status", "message"))
    status, message = (f() if callable(f) else None for f in (status, message))
    return f"{status or type(e).__name__}: {' '.join(str(message or e).split())}"


# Segmenter settings that live on the server (ovseg-serve takes them), by from_bundle's and SegmenterConfig's names.
SERVER_SETTINGS = {
    "backend": "--backend",
    "precision": "--precision",
    "num_segments": "--segments",
    "refine": "--refine",
    "keyframe_interval": "--keyframe-interval",
    "keyframe_change": "--keyframe-change",
    "threads": "--threads",
    "trusted_keys": "--trusted-key",
}


def remote_opener(servers: list[str]) -> Callable[..., RemoteSegmenter]:
    """What ovseg-run opens instead of a local Segmenter with --server (the same arguments as Segmenter.from_bundle)."""

    def open_remote(bundle, *, classes=None, vocab=None, config: SegmenterConfig, **local) -> RemoteSegmenter:
        settings = {**local, **{k: getattr(config, k) for k in SERVER_SETTINGS if hasattr(config, k)}}
        given = [SERVER_SETTINGS[k] for k, v in settings.items() if v not in (None, "auto")]
        if given:
            raise ServingError(f"with --server the server's Segmenter runs: give {', '.join(given)} to ovseg-serve")
        return RemoteSegmenter.open(servers, classes, vocab, config.score_threshold)

    return open_remote
