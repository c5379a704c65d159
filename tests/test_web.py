"""ovseg-run --web: real HTTP requests to the server on 127.0.0.1, in this process. The test is the pipeline thread:
it runs the real Segmenter on the tiny bundle frame by frame, so "the next frame" is exact."""

from __future__ import annotations

import http.client
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest
from test_run_cli import FakeSegmenter, write_video

from ovseg.errors import OvsegError, SegmenterError
from ovseg.runtime import Segmenter
from ovseg.runtime.io import web as web_module
from ovseg.runtime.io.sinks import frame_record, to_json
from ovseg.runtime.io.sources import Frame
from ovseg.runtime.io.web import BOUNDARY, MAX_BODY_BYTES, WebSink, parse_address
from ovseg.runtime.pipeline.vocabulary import load_vocabulary
from ovseg.runtime.result import Result, Segment
from ovseg.runtime.tools import run as cli

from assertions import eventually

TOKEN = "s3cret-token"
NEW_CLASSES = ["person", "forklift", "pallet"]


def pictures() -> list[np.ndarray]:
    """Four 96x72 frames of coloured blocks that move, so consecutive frames differ."""
    frames = []
    for shift in range(4):
        image = np.full((72, 96, 3), 90, np.uint8)
        image[10:40, 8 + 6 * shift : 40 + 6 * shift] = (30, 40, 220)
        image[38:66, 50 - 4 * shift : 90 - 4 * shift] = (200, 120, 20)
        frames.append(image)
    return frames


class Pipeline:
    """What ovseg-run's loop does with a WebSink, one frame per step()."""

    def __init__(self, seg, web: WebSink):
        self.seg, self.web = seg, web
        self.pictures = pictures()
        self.results: list[Result] = []
        self.overlays: list[np.ndarray] = []
        self.frames: list[Frame] = []

    def step(self, n: int = 1) -> Result:
        for _ in range(n):
            self.web.before_frame(self.seg)
            i = len(self.results)
            image = self.pictures[i % len(self.pictures)]
            result = self.seg(image)
            overlay = self.seg.render(image, result)
            frame = Frame(i, i / 10, image, "test")
            self.web.write(frame, result, overlay)
            self.results.append(result)
            self.overlays.append(overlay)
            self.frames.append(frame)
        return self.results[-1]


@pytest.fixture(scope="module")
def seg(tiny_bundle):
    with Segmenter.from_bundle(tiny_bundle, backend="cpu") as s:
        yield s


@pytest.fixture
def web():
    server = WebSink(("127.0.0.1", 0), TOKEN)
    yield server
    server.close()


@pytest.fixture
def pipeline(seg, web):
    seg.set_classes(None)
    seg.reset()
    return Pipeline(seg, web)


def get(web: WebSink, path: str) -> tuple[int, bytes, http.client.HTTPMessage]:
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        return answer.status, answer.read(), answer.headers
    finally:
        conn.close()


def get_json(web: WebSink, path: str) -> tuple[int, dict]:
    status, body, headers = get(web, path)
    assert headers.get_content_type() == "application/json"
    return status, json.loads(body)


def post(
    web: WebSink,
    body: bytes | dict,
    token: str | None = TOKEN,
    content_type: str = "application/json",
    path="/vocabulary",
) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=60)
    try:
        conn.request("POST", path, body=data, headers=headers)
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        conn.close()


class Viewer:
    """A browser's MJPEG connection, read part by part."""

    def __init__(self, web: WebSink):
        self.sock = socket.create_connection(("127.0.0.1", web.port), timeout=30)
        self.sock.sendall(f"GET /stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n\r\n".encode())
        self.file = self.sock.makefile("rb")
        status = self.file.readline()
        assert status.split()[1] == b"200", status
        headers = self._headers()
        assert headers["content-type"] == f"multipart/x-mixed-replace; boundary={BOUNDARY}"

    def _headers(self) -> dict[str, str]:
        headers = {}
        while (line := self.file.readline().strip()) != b"":
            key, _, value = line.decode().partition(":")
            headers[key.lower()] = value.strip()
        return headers

    def next_image(self) -> np.ndarray:
        assert self.file.readline().strip() == f"--{BOUNDARY}".encode()
        headers = self._headers()
        assert headers["content-type"] == "image/jpeg"
        data = self.file.read(int(headers["content-length"]))
        assert self.file.read(2) == b"\r\n"
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None
        return image

    def close(self) -> None:
        self.file.close()
        self.sock.close()


# ---- endpoints ------------------------------------------------------------------------------------------------


def test_before_the_first_frame_the_page_loads_and_the_rest_says_starting(web):
    status, page, headers = get(web, "/")
    assert status == 200 and headers.get_content_type() == "text/html"
    for element in (b'id="stream"', b'src="/stream.mjpg"', b'id="legend"', b'id="classes"', b'id="token"'):
        assert element in page
    assert get_json(web, "/health") == (503, {"status": "starting", "seq": 0, "viewers": 0})
    for path in ("/segments", "/snapshot.png"):
        status, body = get_json(web, path)
        assert status == 503 and body["error"] == "no frame yet: the pipeline is starting"
    status, body = get_json(web, "/nope")
    assert status == 404 and "/segments" in body["error"]


def test_segments_status_and_snapshot_match_the_newest_result(pipeline, web):
    result = pipeline.step(3)
    status, body = get_json(web, "/segments")
    assert status == 200
    expected = json.loads(to_json(frame_record(pipeline.frames[-1], result)))
    assert body == {"seq": 3, **expected}
    assert [s["label"] for s in body["segments"]] == [s.label for s in result.segments]
    assert [s["area"] for s in body["segments"]] == [s.area for s in result.segments]

    status, health = get_json(web, "/health")
    assert status == 200 and health["status"] == "ok" and health["seq"] == 3 and health["viewers"] == 0

    status, state = get_json(web, "/status")
    by_area = sorted(result.segments, key=lambda s: (-s.area, s.id))
    assert [row["label"] for row in state["legend"]] == [s.label for s in by_area]
    assert sum(row["share"] for row in state["legend"]) == pytest.approx(1.0)
    assert state["mode"] == "guidance-free" and state["classes"] is None and state["seq"] == 3
    assert state["timings_ms"]["total"] == round(result.timings["total"], 1)
    assert "concepts" not in state["presets"]["guided"] and "concepts" in state["presets"]["guidance-free"]

    status, png, headers = get(web, "/snapshot.png")
    assert status == 200 and headers.get_content_type() == "image/png"
    snapshot = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(snapshot, pipeline.overlays[-1])


def test_several_viewers_get_the_newest_frame_and_leaving_frees_them(pipeline, web):
    pipeline.step()
    viewers = [Viewer(web), Viewer(web)]
    eventually(lambda: web.viewers == 2, "two viewers connected")
    assert get_json(web, "/health")[1]["viewers"] == 2
    for viewer in viewers:  # the frame published before they connected
        image = viewer.next_image()
        assert image.shape == pipeline.overlays[-1].shape
        assert np.abs(image.astype(int) - pipeline.overlays[-1]).mean() < 8  # JPEG
    pipeline.step()
    for viewer in viewers:
        image = viewer.next_image()
        assert np.abs(image.astype(int) - pipeline.overlays[-1]).mean() < 8
    viewers[0].close()
    pipeline.step()  # the server notices a closed connection when it next writes to it
    eventually(lambda: web.viewers == 1, "the closed viewer released")
    viewers[1].close()
    pipeline.step()
    eventually(lambda: web.viewers == 0, "both viewers released")


def test_viewers_beyond_the_limit_are_turned_away_until_one_leaves(pipeline, web, monkeypatch):
    monkeypatch.setattr(web_module, "MAX_VIEWERS", 2)
    pipeline.step()
    viewers = [Viewer(web), Viewer(web)]
    status, body = get_json(web, "/stream.mjpg")
    assert status == 503 and body["error"] == "2 browsers are watching already; try again when one leaves"
    viewers[0].close()
    pipeline.step()
    eventually(lambda: web.viewers == 1, "the first viewer released")
    viewers.append(Viewer(web))
    assert viewers[2].next_image().shape == pipeline.overlays[-1].shape
    for viewer in viewers[1:]:
        viewer.close()


def test_a_browser_that_stops_reading_never_holds_the_pipeline(web):
    stalled = socket.create_connection(("127.0.0.1", web.port))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(b"GET /stream.mjpg HTTP/1.0\r\n\r\n")
    eventually(lambda: web.viewers == 1, "the stalled viewer connected")
    noise = np.random.default_rng(0).integers(0, 256, (720, 1280, 3), np.uint8)  # about 1 MB a JPEG: fills any buffer
    label_map = np.zeros(noise.shape[:2], np.int32)
    result = Result(label_map, [Segment(0, "noise", 0.1, label_map.size, (0, 0, 1280, 720))], {0: "noise"}, {})
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(lambda: [web.write(Frame(i, 0.0, noise, "noise"), result, noise) for i in range(60)])
        done.result(timeout=120)  # raises TimeoutError if a write waited for the stalled viewer
    assert get_json(web, "/health")[1]["seq"] == 60
    stalled.close()


# ---- changing the vocabulary --------------------------------------------------------------------------------


def change_during_next_frame(pipeline: Pipeline, body: dict) -> tuple[int, dict]:
    """POST a change from another thread (it waits for the pipeline), then run one frame."""
    web = pipeline.web
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, web, body)
        eventually(lambda: len(web.pending) == 1 or answer.done(), "the change reached the pipeline")
        assert not answer.done(), answer.result()
        pipeline.step()
        return answer.result(timeout=60)


def test_a_change_takes_effect_on_the_next_frame(pipeline, web, seg):
    before = pipeline.step(2)
    assert seg.mode == "guidance-free" and {s.label for s in before.segments} <= set(load_vocabulary("voc21"))

    status, answer = change_during_next_frame(pipeline, {"mode": "guided", "classes": ", ".join(NEW_CLASSES)})
    assert status == 200, answer
    assert answer == {"mode": "guided", "from_seq": 3, "change": "guided: person, forklift, pallet"}
    assert seg.mode == "guided" and seg.labels == NEW_CLASSES
    labels = {s.label for s in pipeline.results[2].segments}
    assert labels and labels <= set(NEW_CLASSES)
    status, body = get_json(web, "/segments")
    assert body["seq"] == 3 and {s["label"] for s in body["segments"]} == labels
    pipeline.step()  # the page shows the mode the newest frame ran in
    state = get_json(web, "/status")[1]
    assert state["mode"] == "guided" and state["classes"] == NEW_CLASSES

    vocabulary = ["red block", "blue block", "grey floor"]
    status, answer = change_during_next_frame(pipeline, {"mode": "guidance-free", "classes": vocabulary})
    assert (
        status == 200
        and answer["from_seq"] == 5
        and answer["change"] == "guidance-free, vocabulary red block, blue block, grey floor"
    )
    assert seg.mode == "guidance-free" and {s.label for s in pipeline.results[4].segments} <= set(vocabulary)

    status, answer = change_during_next_frame(pipeline, {"mode": "guided", "preset": "voc20"})
    assert status == 200 and answer["change"] == "guided: voc20"
    assert seg.labels == load_vocabulary("voc20")
    assert {s.label for s in pipeline.results[5].segments} <= set(load_vocabulary("voc20"))

    status, answer = change_during_next_frame(pipeline, {"mode": "guidance-free"})
    assert status == 200 and seg.mode == "guidance-free" and seg.index.names == vocabulary


@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"],
)
def test_changes_need_the_token(pipeline, web, seg, header):
    pipeline.step()
    headers = {"Content-Type": "application/json"} | ({"Authorization": header} if header else {})
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
    conn.request("POST", "/vocabulary", body=json.dumps({"mode": "guided", "classes": "cat"}), headers=headers)
    answer = conn.getresponse()
    assert answer.status == 401
    assert "token" in json.loads(answer.read())["error"]
    conn.close()
    assert len(web.pending) == 0
    pipeline.step()
    assert seg.mode == "guidance-free"
    assert get_json(web, "/health")[1]["seq"] == 2


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, "the body is not JSON"),
        (b"\xff\xfe", 400, "the body is not JSON"),
        (b"[]", 400, "must be a JSON object"),
        ({"mode": "guided", "classes": ""}, 400, "has no class names"),
        ({"mode": "guided", "classes": " , ,"}, 400, "has no class names"),
        ({"mode": "guided", "classes": []}, 400, "the class list is empty"),
        ({"mode": "guided", "classes": [1, 2]}, 400, "classes must be a string"),
        ({"mode": "guided", "classes": ["x"] * 1 + [f"c{i}" for i in range(1000)]}, 400, "at most 1000"),
        ({"mode": "guided"}, 400, "guided mode needs classes"),
        ({"mode": "guided", "preset": "nope"}, 400, "unknown preset 'nope'"),
        ({"mode": "guided", "preset": "/etc/passwd"}, 400, "unknown preset '/etc/passwd'"),
        ({"mode": "guided", "preset": "concepts"}, 400, "too many for guided mode"),
        ({"mode": "guided", "classes": "a", "preset": "voc21"}, 400, "not both"),
        ({"mode": "guided", "classes": "a", "colour": "red"}, 400, "unknown field 'colour'"),
        ({"mode": "panoptic"}, 400, "mode must be 'guided' or 'guidance-free'"),
        ({}, 400, "mode must be"),
    ],
)
def test_bad_changes_are_refused_and_never_reach_the_pipeline(pipeline, web, seg, body, status, message):
    pipeline.step()
    code, answer = post(web, body)
    assert code == status and message in answer["error"], answer
    assert "\n" not in answer["error"]
    assert len(web.pending) == 0
    pipeline.step()
    assert seg.mode == "guidance-free" and get_json(web, "/health")[1]["seq"] == 2


def test_bad_requests_get_4xx_with_a_message(pipeline, web):
    pipeline.step()
    assert post(web, {"mode": "guidance-free"}, content_type="text/plain") == (
        415,
        {"error": "send the change as application/json"},
    )
    assert post(web, {"mode": "guidance-free"}, path="/segments")[0] == 404

    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
    conn.putrequest("POST", "/vocabulary")
    for key, value in (("Content-Type", "application/json"), ("Authorization", f"Bearer {TOKEN}")):
        conn.putheader(key, value)
    conn.putheader("Content-Length", str(100 * MAX_BODY_BYTES))
    conn.endheaders()  # the body is never sent: the answer comes without it
    answer = conn.getresponse()
    assert answer.status == 413 and f"at most {MAX_BODY_BYTES}" in json.loads(answer.read())["error"]
    conn.close()

    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
    conn.putrequest("POST", "/vocabulary")
    for key, value in (("Content-Type", "application/json"), ("Authorization", f"Bearer {TOKEN}")):
        conn.putheader(key, value)
    conn.endheaders()
    answer = conn.getresponse()
    assert answer.status == 411 and "Content-Length" in json.loads(answer.read())["error"]
    conn.close()

    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
    conn.request("DELETE", "/vocabulary")
    assert conn.getresponse().status == 501
    conn.close()
    pipeline.step()
    assert get_json(web, "/health")[1]["seq"] == 2


@pytest.mark.parametrize(
    "host, allowed",
    [
        ("127.0.0.1:{port}", True),
        ("[::1]:{port}", True),
        ("192.168.7.20", True),
        ("localhost:{port}", True),
        ("app.localhost:{port}", True),
        ("{hostname}:{port}", True),
        ("Robot7.Lab.Example.com.:{port}", True),  # --web-allow-host, any case, a trailing dot
        ("attacker.example:{port}", False),
        ("127.0.0.1.attacker.example", False),
    ],
)
def test_names_this_machine_does_not_answer_to_are_refused_against_dns_rebinding(host, allowed):
    server = WebSink(("127.0.0.1", 0), TOKEN, allowed_hosts=("robot7.lab.example.com",))
    try:
        header = host.format(port=server.port, hostname=socket.gethostname())
        for method, path in (("GET", "/status"), ("GET", "/stream.mjpg"), ("POST", "/vocabulary")):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            conn.putrequest(method, path, skip_host=True)
            conn.putheader("Host", header)
            conn.putheader("Content-Length", "0")
            conn.endheaders()
            answer = conn.getresponse()
            body = answer.read() if answer.headers.get_content_type() == "application/json" else b""
            conn.close()
            if allowed:
                assert answer.status != 403, (method, path, body)
            else:
                assert answer.status == 403 and "--web-allow-host" in json.loads(body)["error"], (method, path)
    finally:
        server.close()


class RefusingSegmenter:
    mode = "guidance-free"

    def set_classes(self, names):
        raise SegmenterError("the text encoder refused these classes")


def test_an_error_applying_a_change_is_shown_and_the_pipeline_goes_on(web):
    refusing = RefusingSegmenter()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, web, {"mode": "guided", "classes": "cat"})
        eventually(lambda: len(web.pending) == 1, "the change reached the pipeline")
        web.before_frame(refusing)
        assert answer.result(timeout=60) == (400, {"error": "the text encoder refused these classes"})
    web.before_frame(refusing)
    assert len(web.pending) == 0


def test_the_page_shows_the_classes_the_run_started_with(seg):
    web = WebSink(("127.0.0.1", 0), TOKEN, ["cat", "dog"])
    try:
        seg.set_classes(["cat", "dog"])
        Pipeline(seg, web).step()
        state = get_json(web, "/status")[1]
        assert state["mode"] == "guided" and state["classes"] == ["cat", "dog"]
    finally:
        seg.set_classes(None)
        web.close()


# ---- start and stop -------------------------------------------------------------------------------------------


def test_close_ends_streams_fails_waiting_changes_and_frees_the_port(pipeline, web):
    pipeline.step()
    viewer = Viewer(web)
    viewer.next_image()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(post, web, {"mode": "guided", "classes": "cat"})
        eventually(lambda: len(web.pending) == 1, "the change reached the pipeline")
        web.close()
        assert waiting.result(timeout=60) == (
            503,
            {"error": "ovseg-run stopped before its next frame; nothing was changed"},
        )
    assert viewer.file.read() == b""  # the stream ended
    viewer.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", web.port), timeout=30)
    WebSink(("127.0.0.1", web.port)).close()  # the next ovseg-run can take the port


def test_a_taken_port_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OvsegError) as err:
            WebSink(("127.0.0.1", port))
    assert str(err.value) == f"cannot serve --web on 127.0.0.1:{port}: Address already in use"


def test_the_token_is_random_unless_given():
    first, second = WebSink(("127.0.0.1", 0)), WebSink(("127.0.0.1", 0))
    try:
        assert len(first.token) >= 16 and first.token != second.token and first.port != second.port
        assert first.url == f"http://127.0.0.1:{first.port}/"
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize(
    "text, address",
    [
        ("8080", ("127.0.0.1", 8080)),
        (":0", ("127.0.0.1", 0)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("robot:9", ("robot", 9)),
    ],
)
def test_address(text, address):
    assert parse_address(text) == address


@pytest.mark.parametrize(
    "argv",
    [
        ["--web", "http"],
        ["--web", "70000"],
        ["--web-token", "t"],
        ["--web-allow-host", "robot"],
        ["--web", "0", "--web-allow-host", ""],
        ["--web", "0", "--web-token", " "],
        ["--camera", "0", "--loop"],
    ],
)
def test_web_and_loop_argument_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--sample", *argv] if "--camera" not in argv else argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("ovseg-run: error: ")


def test_loop_starts_a_video_again_after_its_last_frame(tmp_path: Path, capsys):
    video = write_video(tmp_path / "clip.mp4", n=5)
    fake = FakeSegmenter()
    with mock.patch.object(Segmenter, "from_bundle", fake.open):
        assert cli.main(["--video", str(video), "--loop", "--max-frames", "12", "--json", "--no-show"]) == 0
    frames = [json.loads(line)["frame"] for line in capsys.readouterr().out.splitlines()]
    assert frames == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
