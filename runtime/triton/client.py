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
import re
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ovseg.errors import one_line

from ..config import SegmenterConfig
from ..pipeline.render import overlay
from ..result import Result, Segment
from .protocol import FRAME, LABEL_MAP, MODEL, OPTIONS, SEGMENTS, RequestOptions, ServingError

log = logging.getLogger("ovseg")
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)  # seconds between tries at one server before the next one is tried
FORGOTTEN = "must specify the START flag"  # Triton's answer to a frame of a sequence it does not hold
# gRPC status codes that mean "the server is not there (yet)", as opposed to "it refused this request".
UNREACHABLE = ("[StatusCode.UNAVAILABLE]", "[StatusCode.DEADLINE_EXCEEDED]", "[StatusCode.CANCELLED]")


def parse_servers(values: list[str]) -> list[str]:
    """``grpc://HOST:PORT`` URLs (repeated, or comma lists) as ``HOST:PORT``; ServingError for anything else."""
    servers = []
    for value in filter(None, (v.strip() for item in values for v in item.split(","))):
        url = re.fullmatch(r"(?:grpc://)?([^/:@\s\[\]]+|\[[0-9a-fA-F:.]+\]):(\d{1,5})/?", value)
        if url is None:
            raise ServingError(f"--server takes grpc://HOST:PORT, got {value!r}")
        servers.append(f"{url[1]}:{url[2]}")
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

    def __call__(self, frame: np.ndarray, end: bool = False) -> Result:
        start, owner = time.perf_counter(), self.owner
        servers = [(self.server + i) % len(owner.servers) for i in range(len(owner.servers))]
        tries = itertools.product(servers, (0.0, *owner.retry_delays))
        last = ""
        for server, delay in tries:
            if delay:
                owner.report(f"server {owner.servers[server]} unreachable ({last}); retrying in {delay:g} s")
                time.sleep(delay)
            if server != self.server:
                owner.report(f"stream moves to server {owner.servers[server]}")
                self.server, self.started = server, False
            try:
                label_map, body = owner.infer(server, frame, self.corrid, not self.started, end)
            except ServingError as e:
                if FORGOTTEN in str(e) and self.started:  # dropped when idle, or the server restarted
                    owner.report(f"server {owner.servers[server]} forgot the stream; starting it again")
                    self.started = False
                    label_map, body = owner.infer(server, frame, self.corrid, True, end)
                elif not str(e).startswith(UNREACHABLE):
                    raise ServingError(str(e).split("] ", 1)[-1]) from None
                else:
                    last, self.started = str(e).split("] ", 1)[-1][:120], False
                    continue
            self.started = not end
            segments = [
                Segment(
                    s["id"], s["label"], s["score"], s["area"], tuple(s["bbox"]), [tuple(a) for a in s["alternatives"]]
                )
                for s in body["segments"]
            ]
            timings = body["timings_ms"] | {"total": (time.perf_counter() - start) * 1000}  # network included
            labels = {s.id: s.label for s in segments}
            return Result(label_map, segments, labels, timings, body["frame"], body["keyframe"], body["change"])
        raise ServingError(f"no server answered ({', '.join(owner.servers)}): {last}")


class RemoteSegmenter:
    """Segmenter-like access to ovseg-serve: ``__call__`` runs the calling code's stream, ``stream()`` makes more."""

    precision = "the server's precision"
    render = staticmethod(overlay)

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

    def stream(self) -> RemoteStream:
        self._next += 1
        return RemoteStream(self, (self._next - 1) % len(self.servers))

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
        except Exception as e:  # tritonclient's InferenceServerException: "[StatusCode.X] message"
            raise ServingError(one_line(e)) from None
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

    @property
    def mode(self) -> str:
        return "guided" if self.options.classes is not None else "guidance-free"

    @property
    def backend(self) -> str:
        return f"Triton at {', '.join(f'grpc://{s}' for s in self.servers)}"

    def close(self) -> None:
        for client in self._clients:
            client.close()


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
        settings = {**local, **vars(config)}
        given = [flag for key, flag in SERVER_SETTINGS.items() if settings.get(key) not in (None, "auto")]
        if given:
            raise ServingError(f"with --server the server's Segmenter runs: give {', '.join(given)} to ovseg-serve")
        return RemoteSegmenter(servers, RequestOptions(classes, vocab, None, config.score_threshold))

    return open_remote
