"""ovseg-run --web: the live overlay, the segments and a box to change what the robot looks for, served to browsers
by the standard library's ThreadingHTTPServer inside the running process. Threads and hand-offs: docs/DESIGN.md."""

from __future__ import annotations

import argparse
import collections
import contextlib
import hmac
import ipaddress
import json
import logging
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np

from ovseg.errors import OvsegError

from ..pipeline.render import segment_palette
from ..pipeline.vocabulary import DEFAULT_CONCEPTS, PRESETS, load_vocabulary, parse_class_list
from ..result import Result, largest_first
from .sinks import Sink, frame_record, to_json
from .sources import Frame

log = logging.getLogger("ovseg.web")

DEFAULT_HOST = "127.0.0.1"  # another address is explicit: whoever reaches it sees the camera
GUIDED, GUIDANCE_FREE = "guided", "guidance-free"
MAX_BODY_BYTES = 64 * 1024
MAX_CLASSES = 1000  # guided mode embeds every class with 8 templates on the pipeline thread; the largest preset has 171
APPLY_TIMEOUT_S = 120.0  # a change waits this long for the pipeline's next frame
SOCKET_TIMEOUT_S = 10.0  # a browser that neither sends nor reads for this long is dropped
MAX_VIEWERS = 8  # streams at once: each is a thread and a frame's bytes per frame on the robot's link
IDLE_CHECK_S = 1.0  # while no frame comes, each stream checks this often whether its browser left
JPEG_QUALITY = 80
FPS_WINDOW = 30  # frames the page's FPS is measured over
BOUNDARY = "ovsegframe"
PAGE = Path(__file__).with_name("web_page.html")

Answer = tuple[int, dict]  # an HTTP status and its JSON body


def parse_address(text: str) -> tuple[str, int]:
    """argparse type of --web: ``PORT`` or ``HOST:PORT`` (port 0: any free port); the host defaults to 127.0.0.1."""
    host, _, port_text = text.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected [HOST:]PORT such as 8080 or 0.0.0.0:8080, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {port}")
    return host or DEFAULT_HOST, port


def local_names(bound_host: str, allowed: tuple[str, ...] = ()) -> frozenset[str]:
    """Host names a browser may use for this server besides IP addresses: localhost, this machine's names (and its
    mDNS name), the name --web was bound to, and ``allowed`` (--web-allow-host)."""
    hostname = socket.gethostname()
    names = {"localhost", hostname, f"{hostname}.local", socket.getfqdn(), bound_host, *allowed}
    return frozenset(n.lower().rstrip(".") for n in names if n)


def foreign_host(header: str, names: frozenset[str]) -> str | None:
    """The name in a Host header (``robot:8080``, ``[::1]:8080``) when this machine does not answer to it; None for an
    IP address, ``names`` and .localhost names. A page from another site can reach this server through a name of its
    own that resolves here (DNS rebinding) and read the camera; the browser then sends that name."""
    header = header.strip()
    if header.startswith("["):
        name = header[1:].partition("]")[0]
    else:
        name = header.rpartition(":")[0] if header.count(":") == 1 else header
    try:
        ipaddress.ip_address(name)
        return None
    except ValueError:
        return None if name.lower().rstrip(".") in names or name.lower().endswith(".localhost") else name


# ---- vocabulary changes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VocabularyChange:
    """What a browser asked for: guided mode with these classes, or guidance-free with these names as the vocabulary
    (None: the vocabulary it has)."""

    mode: str
    names: list[str] | None
    what: str  # for the answer: "guided: voc21", "guidance-free, vocabulary red block, blue block"


def parse_change(body: bytes) -> VocabularyChange:
    """A change from a request body: ``{"mode": "guided", "classes": "person, forklift"}`` (or a list of names),
    ``{"mode": "guided", "preset": "voc21"}``, ``{"mode": "guidance-free"}`` with an optional "classes" or "preset"
    as its vocabulary. Raises ValueError saying what is wrong."""
    try:
        data = json.loads(body)
    except ValueError as e:  # not UTF-8, or not JSON
        raise ValueError(f"the body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError('the body must be a JSON object such as {"mode": "guided", "classes": "person, forklift"}')
    unknown = sorted(set(data) - {"mode", "classes", "preset"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}: a change has mode, classes and preset")
    mode, classes, preset = data.get("mode"), data.get("classes"), data.get("preset")
    if mode not in (GUIDED, GUIDANCE_FREE):
        raise ValueError(f"mode must be {GUIDED!r} or {GUIDANCE_FREE!r}, got {mode!r}")
    names = _names(classes, preset)
    if mode == GUIDANCE_FREE:
        what = preset or ", ".join(names or ())
        return VocabularyChange(mode, names, f"guidance-free, vocabulary {what}" if what else "guidance-free")
    if names is None:
        raise ValueError("guided mode needs classes (e.g. 'person, forklift') or a preset")
    if preset is not None and len(names) > MAX_CLASSES:
        raise ValueError(f"preset {preset!r} has {len(names)} names, too many for guided mode; use it guidance-free")
    return VocabularyChange(mode, names, f"guided: {preset or ', '.join(names)}")


def _names(classes: object, preset: object) -> list[str] | None:
    """The names of a change: a preset's, the classes given (a comma-separated string or a list), or None."""
    if classes is not None and preset is not None:
        raise ValueError("give classes or a preset, not both")
    if preset is not None:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
        return load_vocabulary(preset)
    if classes is None:
        return None
    if isinstance(classes, str):
        names = parse_class_list(classes)  # a VocabularyError (a ValueError) saying what is wrong
    elif isinstance(classes, list) and all(isinstance(c, str) for c in classes):
        names = list(dict.fromkeys(c.strip() for c in classes if c.strip()))
        if not names:
            raise ValueError("the class list is empty; give names such as ['person', 'forklift']")
    else:
        raise ValueError("classes must be a string of comma-separated names or a list of strings")
    if len(names) > MAX_CLASSES:
        raise ValueError(f"{len(names)} classes; at most {MAX_CLASSES}")
    return names


# ---- the newest frame ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """One processed frame as the pipeline handed it over; never modified afterwards."""

    seq: int  # frames published since the server started, from 1
    frame: Frame
    result: Result
    overlay: np.ndarray
    fps: float
    mode: str
    classes: list[str] | None
    at: float  # time.monotonic() when published


def legend(result: Result) -> list[dict]:
    """The page's legend: per segment, largest first, its label, score, colour (as the overlay draws it) and share."""
    palette = segment_palette(max((s.id for s in result.segments), default=0) + 1)  # BGR
    return [
        {
            "label": s.label,
            "score": round(s.score, 3),
            "colour": "#" + palette[s.id][::-1].tobytes().hex(),
            "share": s.area / max(1, result.label_map.size),
        }
        for s in largest_first(result.segments)
    ]


# ---- HTTP ------------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    web: WebSink  # set on a subclass per sink
    timeout = SOCKET_TIMEOUT_S
    server_version = "ovseg-web"

    def log_message(self, format: str, *args) -> None:
        log.debug("web: %s %s", self.address_string(), format % args)

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # the browser left (closed, reset, or stopped reading for SOCKET_TIMEOUT_S)
            super().handle()

    def do_GET(self) -> None:
        web, path = self.web, self.path.split("?", 1)[0]
        frame = web.latest
        if path in ("/", "/index.html"):
            self._send(200, web.page, "text/html; charset=utf-8")
        elif path == "/stream.mjpg":
            self._stream(web)
        elif path == "/health":
            self._send(*web.health())
        elif path == "/status":
            self._send(200, web.status())
        elif path not in ("/segments", "/snapshot.png"):
            self._error(404, f"no page {path}: try /, /segments, /health or /snapshot.png")
        elif frame is None:
            self._error(503, "no frame yet: the pipeline is starting")
        elif path == "/segments":
            self._send(200, {"seq": frame.seq, **frame_record(frame.frame, frame.result)})
        else:
            self._send(200, cv2.imencode(".png", frame.overlay)[1].tobytes(), "image/png")

    def do_POST(self) -> None:
        web, length = self.web, self.headers.get("Content-Length")
        if self.path.split("?", 1)[0] != "/vocabulary":
            self._error(404, f"cannot POST to {self.path}: changes go to /vocabulary")
        elif not web.authorised(self.headers.get("Authorization", "")):
            self._error(
                401, "changing the vocabulary needs the token ovseg-run printed at start (Authorization: Bearer TOKEN)"
            )
        elif self.headers.get_content_type() != "application/json":
            self._error(415, "send the change as application/json")
        elif length is None:
            self._error(411, "a change needs a Content-Length")
        elif not length.isdecimal():
            self._error(400, f"bad Content-Length {length!r}")
        elif int(length) > MAX_BODY_BYTES:
            self.close_connection = True  # the body stays unread
            self._error(413, f"the body is {int(length)} bytes; at most {MAX_BODY_BYTES}")
        else:
            try:
                change = parse_change(self.rfile.read(int(length)))
            except ValueError as e:
                self._error(400, str(e))
            else:
                self._send(*web.change(change))

    def parse_request(self) -> bool:
        """The request line and headers, then a 403 for a Host this machine does not answer to (no Host: not a browser)."""
        if not super().parse_request():
            return False
        name = foreign_host(self.headers.get("Host", "localhost"), self.web.names)
        if name is None:
            return True
        self._error(
            403,
            f"this server does not answer to the name {name!r}: open it by this machine's address or name, or start "
            f"ovseg-run with --web-allow-host {name}",
        )
        return False

    def _send(self, status: int, body: dict | bytes, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else to_json(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message})

    def _stream(self, web: WebSink) -> None:
        with web.cond:
            admitted = web.viewers < MAX_VIEWERS
            web.viewers += admitted
        if not admitted:
            self._error(503, f"{MAX_VIEWERS} browsers are watching already; try again when one leaves")
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            seq = 0
            while not web.closed:
                frame = web.wait_newer(seq, IDLE_CHECK_S)
                if self._gone():
                    return
                if frame is not None and frame.seq > seq:
                    jpeg = web.jpeg(frame)
                    head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                    self.wfile.write(head.encode() + jpeg + b"\r\n")
                    seq = frame.seq
        finally:
            with web.cond:
                web.viewers -= 1

    def _gone(self) -> bool:
        """True once the browser closed its end: after its request it sends nothing, so an end of data means closed."""
        poller = select.poll()  # not select.select: it refuses descriptors over 1023
        poller.register(self.connection, select.POLLIN)
        try:
            return bool(poller.poll(0)) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True


class WebSink(Sink):
    """ovseg-run's --web output: serves the page, the MJPEG stream and the JSON endpoints on its own threads.

    The pipeline thread calls ``before_frame(seg)`` before each frame (vocabulary changes are applied there) and
    ``write`` after it. Binds when constructed, so a busy port fails before any model loads.
    """

    needs_overlay = True

    def __init__(
        self,
        address: tuple[str, int],
        token: str | None = None,
        classes: list[str] | None = None,
        allowed_hosts: tuple[str, ...] = (),
    ):
        self.token = token or secrets.token_urlsafe(12)
        self.names = local_names(address[0], allowed_hosts)
        self.page = PAGE.read_bytes()
        self.cond = threading.Condition()  # guards the four below; notified when a frame comes and at close()
        self.latest: Published | None = None
        self.closed = False
        self.viewers = 0  # streams being served
        self.pending: list[tuple[VocabularyChange, Future[Answer]]] = []  # changes for the pipeline thread, in order
        self._jpeg_lock = threading.Lock()
        self._jpeg = (0, b"")  # the newest JPEG and its seq
        self._seq = 0
        self._times: collections.deque[float] = collections.deque(maxlen=FPS_WINDOW)
        self._mode = GUIDANCE_FREE
        self._classes = classes  # guided mode's, as the Segmenter started with and the changes made since
        try:
            self._server = ThreadingHTTPServer(address, type("Handler", (_Handler,), {"web": self}))
        except (OSError, UnicodeError) as e:  # port taken, address not on this machine, unresolvable name
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise OvsegError(f"cannot serve --web on {address[0]}:{address[1]}: {reason}") from None
        self._server.daemon_threads = True
        self.host, self.port = address[0], self._server.server_address[1]
        self.url = f"http://{self.host}:{self.port}/"
        self._thread = threading.Thread(target=self._server.serve_forever, name="ovseg-web", daemon=True)
        self._thread.start()

    # ---- the pipeline thread ----

    def before_frame(self, seg) -> None:
        self._settle(lambda change: self._apply(change, seg))
        self._mode = seg.mode

    def _apply(self, change: VocabularyChange, seg) -> Answer:
        try:
            if change.mode == GUIDED:
                seg.set_classes(change.names)
            else:
                if change.names is not None:
                    seg.set_vocabulary(change.names)
                seg.set_classes(None)
        except OvsegError as e:  # the Segmenter is as it was
            return 400, {"error": str(e)}
        except Exception as e:
            log.warning("web: the change %s failed: %s", change, e)
            return 503, {"error": f"the change failed: {type(e).__name__}: {e}"}
        self._classes = change.names if change.mode == GUIDED else None
        return 200, {"mode": change.mode, "from_seq": self._seq + 1, "change": change.what}

    def _settle(self, answer: Callable[[VocabularyChange], Answer]) -> None:
        """Answer the changes asked for since the last frame, in order; one whose browser gave up is not made."""
        with self.cond:
            pending, self.pending = self.pending, []
        for change, future in pending:
            if future.set_running_or_notify_cancel():
                future.set_result(answer(change))

    def write(self, frame: Frame, result: Result, overlay: np.ndarray | None) -> None:
        assert overlay is not None  # needs_overlay
        now = time.monotonic()
        self._times.append(now)
        fps = (len(self._times) - 1) / (now - self._times[0]) if now > self._times[0] else 0.0
        self._seq += 1
        with self.cond:
            self.latest = Published(self._seq, frame, result, overlay, fps, self._mode, self._classes, now)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        stopped = "ovseg-run stopped before its next frame; nothing was changed"
        self._settle(lambda change: (503, {"error": stopped}))
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # ---- HTTP threads ----

    def authorised(self, header: str) -> bool:
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    def change(self, change: VocabularyChange) -> Answer:
        """Hand ``change`` to the pipeline thread and wait for its next frame: the answer for the browser."""
        future: Future[Answer] = Future()
        with self.cond:
            if self.closed:
                return 503, {"error": "ovseg-run is stopping; nothing was changed"}
            self.pending.append((change, future))
        try:
            return future.result(APPLY_TIMEOUT_S)
        except FutureTimeout:
            if not future.cancel():
                return future.result()  # being applied right now
            message = f"no frame arrived within {APPLY_TIMEOUT_S:.0f} s; nothing was changed"
            return 503, {"error": message}

    def wait_newer(self, seq: int, timeout: float) -> Published | None:
        """The newest frame, once it is newer than ``seq``, the sink closed or ``timeout`` seconds passed."""
        with self.cond:
            self.cond.wait_for(lambda: self.closed or (self.latest is not None and self.latest.seq > seq), timeout)
            return self.latest

    def jpeg(self, frame: Published) -> bytes:
        """``frame``'s overlay as JPEG, encoded by the first stream that asks."""
        with self._jpeg_lock:
            if self._jpeg[0] != frame.seq:
                data = cv2.imencode(".jpg", frame.overlay, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1]
                self._jpeg = (frame.seq, data.tobytes())
            return self._jpeg[1]

    def health(self) -> Answer:
        frame = self.latest
        if frame is None:
            return 503, {"status": "starting", "seq": 0, "viewers": self.viewers}
        since = round(time.monotonic() - frame.at, 3)
        return 200, {"status": "ok", "seq": frame.seq, "viewers": self.viewers, "seconds_since_frame": since}

    def status(self) -> dict:
        """What the page shows beside the stream: FPS, per-stage latency, legend, mode and classes."""
        frame = self.latest
        presets = {GUIDED: [p for p in PRESETS if p != DEFAULT_CONCEPTS], GUIDANCE_FREE: list(PRESETS)}
        state: dict = {"seq": 0, "presets": presets, "viewers": self.viewers}
        if frame is not None:
            state |= {
                "seq": frame.seq,
                "fps": round(frame.fps, 2),
                "timings_ms": {k: round(v, 1) for k, v in frame.result.timings.items() if v > 0},
                "legend": legend(frame.result),
                "mode": frame.mode,
                "classes": frame.classes,
            }
        return state
