"""ovseg on a real tritonserver (the nvidia-pytriton wheel's, from the serving environment `make serve-setup` makes),
started on 127.0.0.1 by these tests and stopped by them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_batch import moving_frames

from ovseg.benchmarks.serving import Server
from ovseg.runtime import Segmenter
from ovseg.runtime.segmenter import VideoStream
from ovseg.runtime.triton.protocol import FRAME, IMAGE, LABEL_MAP, MODEL, SEGMENTS
from ovseg.runtime.triton.server import Ports

ROOT = Path(__file__).resolve().parents[1]
SERVE_PYTHON = Path(os.environ.get("OVSEG_SERVE_PYTHON", ROOT / ".venv-serve" / "bin" / "python"))
IDLE_SECONDS = 3.0
grpcclient = pytest.importorskip("tritonclient.grpc", reason="the Triton client: pip install 'ovseg[client]'")
pytestmark = pytest.mark.skipif(
    not SERVE_PYTHON.exists(), reason=f"no serving environment at {SERVE_PYTHON}: run `make serve-setup`"
)


def serve(bundle: Path, log: Path, ports: Ports | None = None) -> Server:
    """ovseg-serve from the serving environment, one ONNX Runtime thread, streams idle after IDLE_SECONDS."""
    return Server(bundle, SERVE_PYTHON, log, "--threads", "1", "--idle-timeout", str(IDLE_SECONDS), ports=ports)


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("*triton*")} if Path("/dev/shm").is_dir() else set()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    served = serve(tiny_bundle, tmp_path_factory.mktemp("triton") / "server.log")
    yield served
    served.stop()


def remote(url_or_urls, **kwargs):
    from ovseg.runtime.triton.client import RemoteSegmenter

    urls = [url_or_urls] if isinstance(url_or_urls, str) else url_or_urls
    return RemoteSegmenter(urls, **kwargs)


def test_concurrent_streams_equal_an_in_process_segmenter(server, tiny_bundle) -> None:
    videos = [moving_frames(s, 6, shape) for s, shape in enumerate([(96, 128), (120, 90), (96, 128), (64, 160)])]
    client = remote(server.url)
    got: dict[int, list] = {}

    def run(k: int) -> None:
        stream = client.stream()
        got[k] = [stream(f) for f in videos[k]]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(videos))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(got) == list(range(len(videos)))
    with Segmenter.from_bundle(tiny_bundle, threads=1) as seg:
        for k, video in enumerate(videos):
            stream = VideoStream()
            for f, r in zip(video, got[k]):
                local = seg.batch([f], [stream])[0]
                assert np.array_equal(r.label_map, local.label_map)
                assert r.labels == local.labels and r.frame_index == local.frame_index
                assert [s.area for s in r.segments] == [s.area for s in local.segments]


def test_guided_options_and_an_encoded_image(server, tiny_bundle) -> None:
    import cv2

    frame = moving_frames(3, 1, (96, 96))[0]
    client = remote(server.url)
    client.set_classes(["cat", "dog", "person"])
    assert set(client(frame).labels.values()) <= {"cat", "dog", "person", "unknown"}
    ok, png = cv2.imencode(".png", frame)
    response = infer(server.url, corrid=77, start=True, image=png.tobytes())
    with Segmenter.from_bundle(tiny_bundle, threads=1) as seg:
        assert np.array_equal(response.as_numpy(LABEL_MAP)[0], seg(frame).label_map)


def infer(url: str, corrid: int, start: bool = False, end: bool = False, image: bytes | None = None, frame=None):
    client = grpcclient.InferenceServerClient(url=url)
    if image is not None:
        x = grpcclient.InferInput(IMAGE, [1, 1], "BYTES")
        x.set_data_from_numpy(np.array([[image]], dtype=object))
    else:
        kind = {np.dtype(np.uint8): "UINT8", np.dtype(np.float32): "FP32"}[frame.dtype]
        x = grpcclient.InferInput(FRAME, [1, *frame.shape], kind)
        x.set_data_from_numpy(frame[None])
    return client.infer(MODEL, [x], sequence_id=corrid, sequence_start=start, sequence_end=end)


def test_start_and_end_reset_a_stream(server) -> None:
    frames = moving_frames(5, 3, (64, 64))
    first = json.loads(infer(server.url, 11, start=True, frame=frames[0]).as_numpy(SEGMENTS).reshape(-1)[0])
    second = json.loads(infer(server.url, 11, frame=frames[1]).as_numpy(SEGMENTS).reshape(-1)[0])
    assert (first["frame"], second["frame"]) == (0, 1)
    infer(server.url, 11, end=True, frame=frames[2])
    with pytest.raises(Exception, match="START"):  # ended: the next frame must start the sequence again
        infer(server.url, 11, frame=frames[0])
    again = json.loads(infer(server.url, 11, start=True, frame=frames[1]).as_numpy(SEGMENTS).reshape(-1)[0])
    assert again["frame"] == 0


def test_an_idle_stream_is_dropped(server) -> None:
    frame = moving_frames(6, 1, (64, 64))[0]
    held = json.loads(infer(server.url, 21, start=True, frame=frame).as_numpy(SEGMENTS).reshape(-1)[0])
    assert held["server"]["streams"] >= 1
    time.sleep(IDLE_SECONDS + 1.5)
    with pytest.raises(Exception, match="START"):
        infer(server.url, 21, frame=frame)
    other = json.loads(infer(server.url, 22, start=True, frame=frame).as_numpy(SEGMENTS).reshape(-1)[0])
    assert other["server"]["streams"] == 1  # the idle stream's state went with it


@pytest.mark.parametrize(
    "request_, message",
    [
        ({"image": b"not an image at all"}, "not an image OpenCV can decode"),
        ({"image": b""}, r"IMAGE \(0 bytes\) is not an image"),
        ({"frame": np.zeros((32, 32, 5), np.uint8)}, r"HxWx4 \(BGRA\), got shape \(32, 32, 5\)"),
        ({"frame": np.zeros((32, 32, 3), np.float32)}, "FP32"),
        ({"frame": np.zeros((4320, 7680, 3), np.uint8)}, "7680 x 4320, over this server's"),
    ],
    ids=["corrupt", "empty", "channels", "dtype", "8k"],
)
def test_bad_input_is_refused_and_other_streams_go_on(server, request_, message) -> None:
    with pytest.raises(Exception, match=message):
        infer(server.url, 31, start=True, **request_)
    good = infer(server.url, 32, start=True, frame=moving_frames(1, 1, (48, 48))[0])
    assert good.as_numpy(LABEL_MAP).shape == (1, 48, 48)


def test_a_lost_server_is_retried_and_two_servers_share_streams(tiny_bundle, tmp_path) -> None:
    first = serve(tiny_bundle, tmp_path / "first.log")
    second = serve(tiny_bundle, tmp_path / "second.log")
    reports: list[str] = []
    restarted: list[Server] = []
    restart: threading.Timer | None = None
    try:
        client = remote([first.url, second.url], report=reports.append, retry_delays=(0.5, 1.0, 2.0, 4.0, 8.0))
        a, b = client.stream(), client.stream()
        frames = moving_frames(2, 4, (64, 64))
        a(frames[0]), b(frames[0])
        assert (a.server, b.server) == (0, 1)
        pgid = first.process.pid
        first.stop(signal.SIGKILL)
        restart = threading.Timer(
            1.0, lambda: restarted.append(serve(tiny_bundle, tmp_path / "again.log", first.ports))
        )
        restart.start()
        result = a(frames[1])  # retried until the first server is back (or moved to the second)
        assert result.frame_index == 0  # a new sequence: the old one's state died with its server
        assert any("unreachable" in r for r in reports)
        assert b(frames[1]).frame_index == 0 and b.server == 1  # idle meanwhile: its server started it again
        assert any("forgot the stream" in r for r in reports)
        assert not group_alive(pgid)
    finally:
        if restart is not None:
            restart.join(180)
        for s in (first, second, *restarted):
            s.stop()


def test_clean_shutdown_leaves_nothing_behind(tiny_bundle, tmp_path) -> None:
    before = shm_segments()
    served = serve(tiny_bundle, tmp_path / "server.log")
    remote(served.url)(moving_frames(4, 1, (64, 64))[0])
    assert shm_segments() - before, "the Python backend's shared memory was not where this test looks"
    code, out = served.stop(signal.SIGINT)
    assert code == 130 and "interrupted; the server is stopped" in out and "Traceback" not in out
    assert not group_alive(served.process.pid)
    assert shm_segments() - before == set()


def test_a_server_that_cannot_start_is_one_line(tiny_bundle, tmp_path) -> None:
    log = tmp_path / "no-such-folder" / "server.log"
    command = [str(SERVE_PYTHON), "-m", "ovseg.runtime.triton.cli", "--bundle", str(tiny_bundle), "--log", str(log)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "cannot start" in errors[0] and "No such file or directory" in errors[0], out.stderr


def ovseg_run(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ovseg.runtime.tools.run", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def labelled(stdout: str) -> list[list[tuple]]:
    """Each JSON line's segments without their scores (ONNX Runtime and OpenCV differ by a last bit between the
    serving environment and this one)."""
    return [
        [(s["id"], s["label"], s["area"], s["bbox"]) for s in json.loads(line)["segments"]]
        for line in stdout.splitlines()
    ]


def test_ovseg_run_server_prints_what_a_local_run_prints(server, tiny_bundle, tmp_path) -> None:
    import cv2

    for i, f in enumerate(moving_frames(8, 2, (80, 96))):
        cv2.imwrite(str(tmp_path / f"{i}.png"), f)
    common = ["--image", str(tmp_path), "--json", "--no-show"]
    local = ovseg_run("--bundle", str(tiny_bundle), "--threads", "1", *common)
    served = ovseg_run("--server", f"grpc://{server.url}", *common)
    assert served.returncode == 0, served.stderr
    assert labelled(served.stdout) == labelled(local.stdout) and len(labelled(local.stdout)) == 2
    refused = ovseg_run("--server", "grpc://127.0.0.1:1", "--segments", "4", *common)
    assert refused.returncode == 2 and "give --segments to ovseg-serve" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_ovseg_run_web_steers_a_served_stream(server) -> None:
    """--web with --server: a change typed on the page reaches the server's stream on the next frame."""
    from test_web import NEW_CLASSES, TOKEN, Pipeline, change_during_next_frame, get_json

    from ovseg.runtime.io.web import WebSink
    from ovseg.runtime.pipeline.vocabulary import load_vocabulary

    web = WebSink(("127.0.0.1", 0), TOKEN)
    client = remote(server.url)
    try:
        pipeline = Pipeline(client, web)
        pipeline.step(2)
        assert client.mode == "guidance-free"
        status, answer = change_during_next_frame(pipeline, {"mode": "guided", "classes": ", ".join(NEW_CLASSES)})
        assert status == 200 and answer["change"] == "guided: person, forklift, pallet", answer
        labels = {s.label for s in pipeline.results[2].segments}
        assert client.mode == "guided" and labels and labels <= {*NEW_CLASSES, "unknown"}
        assert {s["label"] for s in get_json(web, "/segments")[1]["segments"]} == labels
        status, answer = change_during_next_frame(pipeline, {"mode": "guidance-free"})
        assert status == 200 and client.mode == "guidance-free"
        assert {s.label for s in pipeline.results[3].segments} <= set(load_vocabulary("voc21"))  # the bundle's
    finally:
        web.close()
        client.close()
