"""ovseg-run --web: the live overlay, the segments and a box to change what the robot looks for, served to browsers
from inside the running process by the standard library's ThreadingHTTPServer (nothing the edge device lacks).

The pipeline thread publishes each frame into one slot that holds the newest frame only; each browser's thread takes
the newest frame when it is ready for one, and a frame is JPEG-encoded once however many browsers watch. A slow
browser skips frames; it never holds the pipeline or grows memory.

The Segmenter keeps one stream of video state, so a vocabulary change asked for on an HTTP thread is handed to the
pipeline thread, which applies it before its next frame; the HTTP answer waits for that and says what happened.
"""

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
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np

from ovseg.errors import OvsegError

from ..pipeline.render import segment_palette
from ..pipeline.vocabulary import DEFAULT_CONCEPTS, PRESETS, VocabularyError, load_vocabulary, parse_class_list
from ..result import Result
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


class WebError(OvsegError, RuntimeError):
    """The web server cannot start, or a change cannot be applied; one line saying why."""


class BadRequest(OvsegError, ValueError):
    """A request the server refuses (answered 4xx with this message); ``status`` is the HTTP status."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


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


def host_name(header: str) -> str:
    """The name or address in a Host header, without its port: ``[::1]:8080`` -> ``::1``, ``robot:80`` -> ``robot``."""
    header = header.strip()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def check_host(header: str | None, names: frozenset[str]) -> None:
    """Refuse a request whose Host is a name this machine does not answer to. A page from another site can reach this
    server through a name of its own that resolves here (DNS rebinding) and read the camera; the browser then sends that
    name. IP addresses and no Host at all (not a browser) pass."""
    if header is None:
        return
    name = host_name(header)
    try:
        ipaddress.ip_address(name)
        return
    except ValueError:
        pass
    if name.lower().rstrip(".") in names or name.lower().endswith(".localhost"):
        return
    raise BadRequest(
        f"this server does not answer to the name {name!r}: open it by this machine's address or name, or start "
        f"ovseg-run with --web-allow-host {name}",
        HTTPStatus.FORBIDDEN,
    )


# ---- vocabulary changes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VocabularyChange:
    """What a browser asked for. Guided: these classes or a preset's. Guidance-free: segments named from these names
    or a preset as the vocabulary, or from the current vocabulary when neither is given."""

    mode: str
    classes: tuple[str, ...] = ()
    preset: str | None = None

    def apply(self, seg) -> list[str] | None:
        """Make the change on ``seg``; returns guided mode's classes after it, None for guidance-free."""
        names = list(self.classes) or (load_vocabulary(self.preset) if self.preset else None)
        if self.mode == GUIDED:
            seg.set_classes(names)
            return names
        if names is not None:
            seg.set_vocabulary(names)
        seg.set_classes(None)
        return None


def parse_change(body: bytes) -> VocabularyChange:
    """A change from a request body: ``{"mode": "guided", "classes": "person, forklift"}`` (or a list of names),
    ``{"mode": "guided", "preset": "voc21"}``, ``{"mode": "guidance-free"}`` with an optional "classes" or "preset"
    as its vocabulary. Raises BadRequest saying what is wrong."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest('the body must be a JSON object such as {"mode": "guided", "classes": "person, forklift"}')
    unknown = sorted(set(data) - {"mode", "classes", "preset"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}: a change has mode, classes and preset")
    mode = data.get("mode")
    if mode not in (GUIDED, GUIDANCE_FREE):
        raise BadRequest(f"mode must be {GUIDED!r} or {GUIDANCE_FREE!r}, got {mode!r}")
    classes, preset = data.get("classes"), data.get("preset")
    if classes is not None and preset is not None:
        raise BadRequest("give classes or a preset, not both")
    if preset is not None:
        return VocabularyChange(mode, preset=_preset(preset, mode))
    if classes is None:
        if mode == GUIDED:
            raise BadRequest("guided mode needs classes (e.g. 'person, forklift') or a preset")
        return VocabularyChange(mode)
    return VocabularyChange(mode, classes=_class_names(classes))


def _preset(name: object, mode: str) -> str:
    if not isinstance(name, str) or name not in PRESETS:
        raise BadRequest(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    if mode == GUIDED and name == DEFAULT_CONCEPTS:
        count = len(load_vocabulary(name))
        raise BadRequest(f"preset {name!r} has {count} names, too many for guided mode; use it guidance-free")
    return name


def _class_names(classes: object) -> tuple[str, ...]:
    if isinstance(classes, str):
        try:
            names = parse_class_list(classes)
        except VocabularyError as e:
            raise BadRequest(str(e)) from None
    elif isinstance(classes, list) and all(isinstance(c, str) for c in classes):
        names = list(dict.fromkeys(c.strip() for c in classes if c.strip()))
        if not names:
            raise BadRequest("the class list is empty; give names such as ['person', 'forklift']")
    else:
        raise BadRequest("classes must be a string of comma-separated names or a list of strings")
    if len(names) > MAX_CLASSES:
        raise BadRequest(f"{len(names)} classes; at most {MAX_CLASSES}")
    return tuple(names)


class Steering:
    """Changes asked for on HTTP threads, applied in order by the pipeline thread (``apply_pending``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[tuple[VocabularyChange, Future]] = []
        self._closed = False

    def submit(self, change: VocabularyChange) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise WebError("ovseg-run is stopping; nothing was changed")
            self._pending.append((change, future))
        return future

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def apply_pending(self, seg, next_seq: int) -> list[list[str] | None]:
        """On the pipeline thread, before frame ``next_seq``: apply every change asked for since the last frame; each
        browser that asked gets ``next_seq``, or the error (a change that fails leaves the Segmenter as it was).
        Returns what each change that was made returned, in order."""
        with self._lock:
            pending, self._pending = self._pending, []
        made = []
        for change, future in pending:
            if not future.set_running_or_notify_cancel():
                continue  # the browser gave up waiting
            try:
                made.append(change.apply(seg))
            except OvsegError as e:
                future.set_exception(e)
            except Exception as e:
                log.warning("web: the change %s failed: %s", change, e)
                future.set_exception(WebError(f"the change failed: {type(e).__name__}: {e}"))
            else:
                future.set_result(next_seq)
        return made

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, []
        for _, future in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(WebError("ovseg-run stopped before its next frame; nothing was changed"))


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


class LatestFrame:
    """A slot with the newest frame only, and its JPEG encoded once, on the first browser thread that asks."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: Published | None = None
        self._closed = False
        self._encode = threading.Lock()
        self._jpeg: tuple[int, bytes] = (0, b"")

    def publish(self, frame: Published) -> None:
        with self._cond:
            self._frame = frame
            self._cond.notify_all()

    def latest(self) -> Published | None:
        with self._cond:
            return self._frame

    @property
    def closed(self) -> bool:
        return self._closed

    def wait_newer(self, seq: int, timeout: float) -> Published | None:
        """The newest frame, once it is newer than ``seq``, the slot closed or ``timeout`` seconds passed."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or (self._frame is not None and self._frame.seq > seq), timeout)
            return self._frame

    def jpeg(self, frame: Published) -> bytes:
        with self._encode:
            if self._jpeg[0] != frame.seq:
                ok, data = cv2.imencode(".jpg", frame.overlay, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                if not ok:
                    raise WebError(f"cannot encode frame {frame.seq} as JPEG")
                self._jpeg = (frame.seq, data.tobytes())
            return self._jpeg[1]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def legend(result: Result) -> list[dict]:
    """The page's legend: per segment, largest first, its label, score, colour (as the overlay draws it) and share."""
    palette = segment_palette(max((s.id for s in result.segments), default=0) + 1)
    total = max(1, result.label_map.size)
    rows = []
    for s in sorted(result.segments, key=lambda s: (-s.area, s.id)):
        b, g, r = (int(v) for v in palette[s.id])
        rows.append(
            {"label": s.label, "score": round(s.score, 3), "colour": f"#{r:02x}{g:02x}{b:02x}", "share": s.area / total}
        )
    return rows


# ---- HTTP ------------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = SOCKET_TIMEOUT_S
    server_version = "ovseg-web"

    def log_message(self, format: str, *args) -> None:
        log.debug("web: %s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        web = self.server.web
        path = self.path.split("?", 1)[0]
        try:
            check_host(self.headers.get("Host"), web.names)
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, web.page, "text/html; charset=utf-8")
            elif path == "/stream.mjpg":
                self._stream(web)
            elif path == "/health":
                status, body = web.health()
                self._json(status, body)
            elif path == "/status":
                self._json(HTTPStatus.OK, web.status())
            elif path == "/segments":
                self._json(HTTPStatus.OK, web.segments())
            elif path == "/snapshot.png":
                self._send(HTTPStatus.OK, web.snapshot(), "image/png")
            else:
                raise BadRequest(f"no page {path}: try /, /segments, /health or /snapshot.png", HTTPStatus.NOT_FOUND)
        except BadRequest as e:
            self._json(e.status, {"error": str(e)})
        except WebError as e:
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(e)})

    def do_POST(self) -> None:
        web = self.server.web
        try:
            check_host(self.headers.get("Host"), web.names)
            if self.path.split("?", 1)[0] != "/vocabulary":
                raise BadRequest(f"cannot POST to {self.path}: changes go to /vocabulary", HTTPStatus.NOT_FOUND)
            web.authorise(self.headers.get("Authorization", ""))
            if self.headers.get_content_type() != "application/json":
                raise BadRequest("send the change as application/json", HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
            self._json(HTTPStatus.OK, web.change(parse_change(self._body())))
        except BadRequest as e:
            self._json(e.status, {"error": str(e)})
        except WebError as e:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(e)})

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest("a change needs a Content-Length", HTTPStatus.LENGTH_REQUIRED)
        try:
            size = int(length)
        except ValueError:
            raise BadRequest(f"bad Content-Length {length!r}") from None
        if not 0 <= size <= MAX_BODY_BYTES:
            self.close_connection = True  # the body stays unread
            raise BadRequest(f"the body is {size} bytes; at most {MAX_BODY_BYTES}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return self.rfile.read(size)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, body: dict) -> None:
        self._send(status, to_json(body).encode(), "application/json")

    def _stream(self, web: WebSink) -> None:
        with web.viewer():
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            seq = 0
            while not web.frames.closed:
                frame = web.frames.wait_newer(seq, IDLE_CHECK_S)
                if self._gone():
                    return
                if frame is None or frame.seq <= seq:
                    continue
                jpeg = web.frames.jpeg(frame)
                head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
                try:
                    self.wfile.write(head + jpeg + b"\r\n")
                except OSError:  # the browser left (closed, reset, or stopped reading for SOCKET_TIMEOUT_S)
                    return
                seq = frame.seq

    def _gone(self) -> bool:
        """True once the browser closed its end: after its request it sends nothing, so an end of data means closed."""
        poller = select.poll()  # not select.select: it refuses descriptors over 1023
        poller.register(self.connection, select.POLLIN)
        try:
            return bool(poller.poll(0)) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], web: WebSink):
        self.web = web
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address) -> None:
        log.debug("web: request from %s failed", client_address, exc_info=True)


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
        self.frames = LatestFrame()
        self.steering = Steering()
        self.page = PAGE.read_bytes()
        self._lock = threading.Lock()
        self._viewers = 0
        self._seq = 0
        self._times: collections.deque[float] = collections.deque(maxlen=FPS_WINDOW)
        self._mode = GUIDANCE_FREE
        self._classes = classes  # guided mode's, as the Segmenter started with and the changes made since
        try:
            self._server = _Server(address, self)
        except (OSError, UnicodeError) as e:  # port taken, address not on this machine, unresolvable name
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise WebError(f"cannot serve --web on {address[0]}:{address[1]}: {reason}") from None
        self.host, self.port = address[0], self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="ovseg-web", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    @property
    def viewers(self) -> int:
        with self._lock:
            return self._viewers

    @contextlib.contextmanager
    def viewer(self) -> Iterator[None]:
        with self._lock:
            if self._viewers >= MAX_VIEWERS:
                raise BadRequest(
                    f"{MAX_VIEWERS} browsers are watching already; try again when one leaves",
                    HTTPStatus.SERVICE_UNAVAILABLE,
                )
            self._viewers += 1
        try:
            yield
        finally:
            with self._lock:
                self._viewers -= 1

    # ---- the pipeline thread ----

    def before_frame(self, seg) -> None:
        for classes in self.steering.apply_pending(seg, self._seq + 1):
            self._classes = classes
        self._mode = seg.mode

    def write(self, frame: Frame, result: Result, overlay: np.ndarray | None) -> None:
        if overlay is None:
            raise WebError("the web page needs the rendered overlay")
        now = time.monotonic()
        self._times.append(now)
        fps = (len(self._times) - 1) / (now - self._times[0]) if len(self._times) > 1 and now > self._times[0] else 0.0
        self._seq += 1
        self.frames.publish(Published(self._seq, frame, result, overlay, fps, self._mode, self._classes, now))

    def close(self) -> None:
        self.frames.close()
        self.steering.close()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # ---- HTTP threads ----

    def authorise(self, header: str) -> None:
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise BadRequest(
                "changing the vocabulary needs the token ovseg-run printed at start (Authorization: Bearer TOKEN)",
                HTTPStatus.UNAUTHORIZED,
            )

    def change(self, change: VocabularyChange) -> dict:
        future = self.steering.submit(change)
        try:
            try:
                from_seq = future.result(APPLY_TIMEOUT_S)
            except FutureTimeout:
                if future.cancel():
                    raise WebError(f"no frame arrived within {APPLY_TIMEOUT_S:.0f} s; nothing was changed") from None
                from_seq = future.result()  # being applied right now
        except CancelledError:
            raise WebError("the change was cancelled; nothing was changed") from None
        except WebError:
            raise
        except OvsegError as e:
            raise BadRequest(str(e)) from None
        return {"mode": change.mode, "from_seq": from_seq, "change": _describe(change)}

    def _newest(self) -> Published:
        frame = self.frames.latest()
        if frame is None:
            raise BadRequest("no frame yet: the pipeline is starting", HTTPStatus.SERVICE_UNAVAILABLE)
        return frame

    def segments(self) -> dict:
        """The newest frame as `ovseg-run --json` writes it, with ``seq``."""
        frame = self._newest()
        return {"seq": frame.seq, **frame_record(frame.frame, frame.result)}

    def snapshot(self) -> bytes:
        frame = self._newest()
        ok, png = cv2.imencode(".png", frame.overlay)
        if not ok:
            raise WebError(f"cannot encode frame {frame.seq} as PNG")
        return png.tobytes()

    def health(self) -> tuple[HTTPStatus, dict]:
        frame = self.frames.latest()
        body = {"status": "ok" if frame else "starting", "seq": frame.seq if frame else 0, "viewers": self.viewers}
        if frame is None:
            return HTTPStatus.SERVICE_UNAVAILABLE, body
        return HTTPStatus.OK, {**body, "seconds_since_frame": round(time.monotonic() - frame.at, 3)}

    def status(self) -> dict:
        """What the page shows beside the stream: FPS, per-stage latency, legend, mode and classes."""
        frame = self.frames.latest()
        presets = {GUIDED: [p for p in PRESETS if p != DEFAULT_CONCEPTS], GUIDANCE_FREE: list(PRESETS)}
        if frame is None:
            return {"seq": 0, "presets": presets, "viewers": self.viewers}
        timings = {k: round(v, 1) for k, v in frame.result.timings.items() if v > 0}
        return {
            "seq": frame.seq,
            "fps": round(frame.fps, 2),
            "timings_ms": timings,
            "legend": legend(frame.result),
            "mode": frame.mode,
            "classes": frame.classes,
            "presets": presets,
            "viewers": self.viewers,
        }


def _describe(change: VocabularyChange) -> str:
    what = ", ".join(change.classes) if change.classes else change.preset
    if change.mode == GUIDED:
        return f"guided: {what}"
    return f"guidance-free, vocabulary {what}" if what else "guidance-free"
