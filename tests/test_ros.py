"""ovseg-ros with the real rclpy (PyPI's ROS 2 wheels, the [ros] extra): images of every encoding in, label map, class
map, JSON and overlay out with the input's header; dropping while busy; parameters at run time; bad input; shutdown.

Nothing leaves the host: discovery on localhost, shared-memory transport only, a domain of this test run's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import cv2
import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ovseg-ros needs ROS 2: `make setup` installs the [ros] extra on x86-64")

from builtin_interfaces.msg import Time  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.parameter_client import AsyncParameterClient  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from rclpy.signals import SignalHandlerOptions  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import Header, String  # noqa: E402

from ovseg.errors import OvsegError  # noqa: E402
from ovseg.runtime.ros.images import ENCODINGS, fill_image, frame_from_compressed, frame_from_image  # noqa: E402
from ovseg.runtime.ros.node import Camera, SegmenterNode  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:module 'sre_:DeprecationWarning")  # lark, under rosidl's parser
TIMEOUT = 60.0  # the longest any one wait may take before the test fails (a loaded 2-core machine)
OUTPUTS = {"label_map": Image, "class_map": Image, "segments": String, "overlay": Image}


def wait_until(condition: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.01)


def picture(h: int = 90, w: int = 120) -> np.ndarray:
    """BGR uint8 blocks of colour: segments to find, any channel swap visible."""
    blocks = np.random.default_rng(7).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return np.ascontiguousarray(cv2.resize(blocks, (w, h), interpolation=cv2.INTER_NEAREST))


def as_encoding(bgr: np.ndarray, encoding: str) -> np.ndarray:
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    return {
        "bgr8": bgr,
        "rgb8": bgr[:, :, ::-1],
        "bgra8": cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA),
        "rgba8": cv2.cvtColor(bgr, cv2.COLOR_BGR2RGBA),
        "mono8": gray,
        "mono16": gray.astype(np.uint16) * 257,
    }[encoding]


def stamp_of(msg) -> tuple[int, int]:
    if isinstance(msg, String):
        s = json.loads(msg.data)["stamp"]
        return s["sec"], s["nanosec"]
    return msg.header.stamp.sec, msg.header.stamp.nanosec


class Probe:
    """The other end of one camera of a node, its topics under ``ns``: publishes images, collects every output."""

    def __init__(self, node, ns: str):
        self.node, self.ns, self.sent = node, ns, 0
        self.image_pub = node.create_publisher(Image, f"{ns}/image", qos_profile_sensor_data)
        self.compressed_pub = node.create_publisher(CompressedImage, f"{ns}/image/compressed", qos_profile_sensor_data)
        self.got: dict[str, queue.Queue] = {}
        self.subs = {}
        for name in ("label_map", "class_map", "segments"):
            self.listen(name)

    def connected(self, cam: Camera) -> bool:
        image = self.compressed_pub if cam.topic.endswith("/compressed") else self.image_pub
        outputs = [cam.pubs[name] for name in self.subs]
        return bool(image.get_subscription_count()) and all(p.get_subscription_count() for p in outputs)

    def listen(self, name: str) -> None:
        self.got[name] = q = queue.Queue()
        self.subs[name] = self.node.create_subscription(OUTPUTS[name], f"{self.ns}/{name}", q.put, 10)

    def header(self) -> Header:
        self.sent += 1
        return Header(stamp=Time(sec=1000 + self.sent, nanosec=123), frame_id=f"{self.ns}_camera")

    def send(self, pixels: np.ndarray, encoding: str) -> Header:
        msg = fill_image(Image(header=self.header()), pixels, encoding)
        self.image_pub.publish(msg)
        return msg.header

    def send_jpeg(self, data: bytes) -> Header:
        msg = CompressedImage(header=self.header(), format="jpeg", data=data)
        self.compressed_pub.publish(msg)
        return msg.header

    def wait(self, name: str, header: Header, timeout: float = TIMEOUT):
        """The ``name`` output of the frame sent with ``header``; outputs of earlier frames are passed over."""
        want, deadline = (header.stamp.sec, header.stamp.nanosec), time.monotonic() + timeout
        while True:
            try:
                msg = self.got[name].get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {self.ns}/{name} for the frame stamped {want} within {timeout:.0f} s")
            if stamp_of(msg) == want:
                return msg


@pytest.fixture(scope="module")
def ros(tmp_path_factory):
    """An rclpy context of this module's own, its executor spinning on a thread, and a probe node."""
    env = {
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "FASTDDS_BUILTIN_TRANSPORTS": "SHM",
        "ROS_DOMAIN_ID": str(60 + os.getpid() % 40),  # concurrent runs on one host stay apart
        "ROS_LOG_DIR": str(tmp_path_factory.mktemp("ros_log")),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    context = Context()
    rclpy.init(context=context, signal_handler_options=SignalHandlerOptions.NO)
    executor = SingleThreadedExecutor(context=context)
    probe = rclpy.create_node("probe", context=context)
    executor.add_node(probe)
    spinner = threading.Thread(target=_spin, args=(executor,), daemon=True)
    spinner.start()
    yield context, executor, probe, env
    rclpy.try_shutdown(context=context)
    spinner.join(TIMEOUT)
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _spin(executor) -> None:
    try:
        executor.spin()
    except ExternalShutdownException:
        pass


def start_node(ros, ns: str, bundle, **parameters) -> tuple[SegmenterNode, Probe]:
    """A node in namespace ``ns`` on the module's executor, and a probe of its first camera, connected."""
    context, executor, probe_node, _ = ros
    overrides = [Parameter(k, value=v) for k, v in {"bundle": str(bundle), "threads": 1, **parameters}.items()]
    node = SegmenterNode(context=context, namespace=ns, parameter_overrides=overrides)
    executor.add_node(node)
    cam = node.cameras[0]
    probe = Probe(probe_node, f"{ns}/{cam.name}" if cam.name else ns)
    wait_until(lambda: probe.connected(cam), f"{probe.ns}'s topics to connect")
    return node, probe


@contextlib.contextmanager
def held(node: SegmenterNode):
    """While it lasts, the node's worker waits inside each batch for ``release``; ``sizes`` records the batches."""
    entered, release, sizes = threading.Event(), threading.Event(), []
    batch = node.seg.batch

    def gated(frames, states):
        sizes.append(len(frames))
        entered.set()
        assert release.wait(TIMEOUT), "the test never released the worker"
        return batch(frames, states)

    node.seg.batch = gated  # type: ignore[method-assign]
    try:
        yield entered, release, sizes
    finally:
        release.set()
        del node.seg.batch


@pytest.fixture(scope="module")
def cam(ros, tiny_bundle):
    node, probe = start_node(ros, "/cam", tiny_bundle)
    yield node, probe
    ros[1].remove_node(node)
    node.close()


@pytest.fixture(scope="module")
def jpeg_cam(ros, tiny_bundle):
    node, probe = start_node(ros, "/jpeg", tiny_bundle, image_transport="compressed")
    yield node, probe
    ros[1].remove_node(node)
    node.close()


def set_parameters(ros, node_name: str, *params: Parameter) -> list:
    client = AsyncParameterClient(ros[2], node_name)
    assert client.wait_for_services(TIMEOUT), f"{node_name}'s parameter services did not appear"
    future = client.set_parameters(list(params))
    wait_until(future.done, f"{node_name} to answer a parameter change")
    return future.result().results


# ---- messages and arrays, no transport ----------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_encoding_reads_as_the_picture(encoding):
    bgr = picture()
    pixels = as_encoding(bgr, encoding)
    expected = {"bgr8": bgr, "rgb8": bgr, "bgra8": cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)}.get(encoding, pixels)
    if encoding == "rgba8":
        expected = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)
    msg = fill_image(Image(), pixels, encoding)
    np.testing.assert_array_equal(frame_from_image(msg), expected)
    # Rows padded to a wider step, and (16-bit) the other byte order, read as the same pixels.
    padded = np.zeros((pixels.shape[0], msg.step + 8), np.uint8)
    flipped = pixels.byteswap() if pixels.itemsize > 1 else pixels
    padded[:, : msg.step] = np.ascontiguousarray(flipped).view(np.uint8).reshape(pixels.shape[0], -1)
    msg.step, msg.data, msg.is_bigendian = padded.shape[1], padded.tobytes(), (pixels.itemsize > 1) != msg.is_bigendian
    np.testing.assert_array_equal(frame_from_image(msg), expected)


def test_unreadable_messages_say_why():
    msg = fill_image(Image(), picture(), "bgr8")
    for change, says in [
        ({"encoding": "yuv422"}, "unknown encoding 'yuv422'"),
        ({"step": msg.step - 3}, "step 357 cannot hold a row of 120 bgr8 pixels"),
        ({"data": bytes(msg.data)[:-1]}, "has 32400 bytes, the message 32399"),
        ({"width": 0}, "empty"),
    ]:
        bad = fill_image(Image(), picture(), "bgr8")
        for k, v in change.items():
            setattr(bad, k, v)
        with pytest.raises(OvsegError, match=says):
            frame_from_image(bad)
    for data in (b"", b"\xff\xd8" + bytes(300)):
        with pytest.raises(OvsegError, match="cannot decode"):
            frame_from_compressed(CompressedImage(format="jpeg", data=data))


# ---- the node -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_each_encoding_comes_back_with_its_header(cam, encoding):
    node, probe = cam
    if "overlay" not in probe.got:
        probe.listen("overlay")
        wait_until(lambda: node.cameras[0].pubs["overlay"].get_subscription_count(), "the overlay subscription")
    pixels = as_encoding(picture(), encoding)
    header = probe.send(pixels, encoding)
    label_map = probe.wait("label_map", header)
    record = json.loads(probe.wait("segments", header).data)
    overlay = probe.wait("overlay", header)
    assert label_map.header.frame_id == overlay.header.frame_id == record["frame_id"] == "/cam_camera"
    assert (label_map.encoding, label_map.height, label_map.width) == ("mono16", 90, 120)
    ids = np.unique(frame_from_image(label_map))
    assert set(ids.tolist()) == {s["id"] for s in record["segments"]}, "the label map's ids are the JSON's segments"
    assert record["timestamp"] == pytest.approx(header.stamp.sec + 123e-9)
    assert {"frame", "source", "keyframe", "change", "segments", "timings_ms"} <= set(record)
    assert record["source"] == "/cam/image" and record["classes"] is None
    assert (overlay.encoding, overlay.height, overlay.width) == ("bgr8", 90, 120)


def test_a_jpeg_comes_back_with_its_header(jpeg_cam):
    node, probe = jpeg_cam
    header = probe.send_jpeg(cv2.imencode(".jpg", picture())[1].tobytes())
    record = json.loads(probe.wait("segments", header).data)
    assert record["source"] == "/jpeg/image/compressed" and record["frame_id"] == "/jpeg_camera"
    assert probe.wait("label_map", header).width == 120


def test_overlay_is_drawn_only_while_someone_watches(ros, tiny_bundle):
    node, probe = start_node(ros, "/quiet", tiny_bundle)
    try:
        drawn = []
        render = node.seg.render
        node.seg.render = lambda *a, **k: drawn.append(1) or render(*a, **k)  # type: ignore[method-assign]
        probe.wait("segments", probe.send(picture(), "bgr8"))
        assert not drawn, "an overlay was drawn for nobody"
        probe.listen("overlay")
        wait_until(lambda: node.cameras[0].pubs["overlay"].get_subscription_count(), "the overlay subscription")
        header = probe.send(picture(), "bgr8")
        assert probe.wait("overlay", header).header.frame_id == "/quiet_camera" and drawn
    finally:
        ros[1].remove_node(node)
        node.close()


def test_a_flood_is_dropped_while_a_frame_runs_and_the_executor_answers(ros, cam):
    node, probe = cam
    camera = node.cameras[0]
    with held(node) as (entered, release, _):
        first = probe.send(picture(), "bgr8")
        assert entered.wait(TIMEOUT), "the worker never took the first frame"
        received, dropped, frames = camera.received, camera.dropped, node.frames
        for i in range(10):
            last = probe.send(picture(), "bgr8")
            wait_until(lambda i=i: camera.received == received + i + 1, f"frame {i} of the flood to arrive")
        assert camera.dropped - dropped == 9, "all but the newest frame that came while busy are dropped"
        # The executor is free while the worker holds a frame: the node's parameter service answers.
        client = AsyncParameterClient(ros[2], "/cam/ovseg")
        assert client.wait_for_services(TIMEOUT)
        future = client.get_parameters(["image_transport"])
        wait_until(future.done, "the parameter service to answer while a frame runs")
        assert future.result().values[0].string_value == "raw"
        assert node.frames == frames
    probe.wait("segments", first)
    assert json.loads(probe.wait("segments", last).data)["frame"] == camera.received - 1
    assert node.frames - frames == 2, "the first frame and the newest one; the nine between were dropped"


def test_several_cameras_share_the_encoders_in_one_batch(ros, tiny_bundle):
    node, front = start_node(ros, "/pair", tiny_bundle, cameras=["front", "rear"])
    try:
        rear = Probe(ros[2], "/pair/rear")
        wait_until(lambda: rear.connected(node.cameras[1]), "/pair/rear's topics to connect")
        assert [c.topic for c in node.cameras] == ["/pair/front/image", "/pair/rear/image"]
        with held(node) as (entered, release, sizes):
            front.send(picture(), "bgr8")
            assert entered.wait(TIMEOUT)
            headers = front.send(picture(), "bgr8"), rear.send(picture(60, 80), "mono8")
            wait_until(lambda: all(c.pending for c in node.cameras), "a frame of each camera to wait")
            release.set()
            records = [json.loads(p.wait("segments", h).data) for p, h in zip((front, rear), headers)]
        assert sizes == [1, 2], "the waiting frames of both cameras went through the encoders together"
        assert [r["source"] for r in records] == ["/pair/front/image", "/pair/rear/image"]
        assert [r["frame"] for r in records] == [1, 0], "each camera counts its own frames"
        assert (rear.wait("label_map", headers[1]).height, records[1]["frame_id"]) == (60, "/pair/rear_camera")
    finally:
        ros[1].remove_node(node)
        node.close()


def test_classes_change_from_the_next_frame_and_bad_values_are_refused(ros, cam):
    node, probe = cam
    before = json.loads(probe.wait("segments", probe.send(picture(), "bgr8")).data)
    assert before["classes"] is None
    names = ["red thing", "blue thing", "floor"]
    assert set_parameters(ros, "/cam/ovseg", Parameter("classes", value=names))[0].successful
    header = probe.send(picture(), "bgr8")
    record = json.loads(probe.wait("segments", header).data)
    assert record["classes"] == names
    assert {s["label"] for s in record["segments"]} <= {*names, "unknown"}
    class_map = probe.wait("class_map", header)
    assert class_map.encoding == "mono8" and class_map.header.frame_id == "/cam_camera"
    assert set(np.unique(frame_from_image(class_map)).tolist()) <= {0, 1, 2, 255}

    refused = {
        "classes": Parameter("classes", value=42),
        "vocabulary": Parameter("vocabulary", value="no-such-preset"),
        "threshold": Parameter("threshold", value=0.5),  # read at start only
    }
    for name, param in refused.items():
        (result,) = set_parameters(ros, "/cam/ovseg", param)
        assert not result.successful and result.reason and "\n" not in result.reason, name
    assert "string array" in set_parameters(ros, "/cam/ovseg", refused["classes"])[0].reason
    assert node.get_parameter("classes").value == names
    # Still running, still guided; then back to guidance-free with an empty array.
    assert json.loads(probe.wait("segments", probe.send(picture(), "bgr8")).data)["classes"] == names
    assert set_parameters(ros, "/cam/ovseg", Parameter("classes", Parameter.Type.STRING_ARRAY, []))[0].successful
    assert json.loads(probe.wait("segments", probe.send(picture(), "bgr8")).data)["classes"] is None


def test_bad_messages_are_logged_once_per_cause_and_counted(cam, jpeg_cam, capfd):
    node, probe = cam
    bad_before = dict(node.bad)
    for change in ({"encoding": "yuv422"}, {"step": 100}, {"encoding": "yuv422"}, {"step": 100}):
        bad = fill_image(Image(header=probe.header()), picture(), "bgr8")
        for k, v in change.items():
            setattr(bad, k, v)
        n = sum(node.bad.values())
        probe.image_pub.publish(bad)  # one at a time: while the worker is busy a newer message replaces a waiting one
        wait_until(lambda n=n: sum(node.bad.values()) > n, "the bad message to be counted")
    jpeg_node, jpeg_probe = jpeg_cam
    for _ in range(2):
        n = sum(jpeg_node.bad.values())
        jpeg_probe.send_jpeg(b"\xff\xd8" + bytes(500))
        wait_until(lambda n=n: sum(jpeg_node.bad.values()) > n, "the corrupt JPEG to be counted")
    # Both nodes still segment.
    assert probe.wait("label_map", probe.send(picture(), "bgr8")).width == 120
    assert jpeg_probe.wait("label_map", jpeg_probe.send_jpeg(cv2.imencode(".jpg", picture())[1].tobytes())).width
    new = {k: v - bad_before.get(k, 0) for k, v in node.bad.items() if v != bad_before.get(k, 0)}
    assert sorted(new.values()) == [2, 2] and any("yuv422" in k for k in new) and any("step 100" in k for k in new)
    (jpeg_cause,) = jpeg_node.bad
    assert jpeg_node.bad[jpeg_cause] == 2 and "cannot decode" in jpeg_cause
    err = capfd.readouterr().err
    for cause in (*new, jpeg_cause):
        assert err.count(f"skipped a frame: {cause}") == 1, cause


def test_bad_start_parameters_are_one_line_errors(ros, tiny_bundle):
    context = ros[0]
    for params, says in [
        ([Parameter("image_transport", value="ftp")], "choose raw or compressed"),
        ([Parameter("threshold", value="high")], "expecting type 'DOUBLE'"),
        ([Parameter("keyframe_change", value=2.0)], "keyframe"),
        ([Parameter("threads", value=0)], "threads must be 1 or more"),
        ([Parameter("cameras", value=["front cam"])], "camera 'front cam': failed to resolve name"),
        ([Parameter("bundle", value=str(tiny_bundle / "nope"))], "nope"),
    ]:
        with pytest.raises(OvsegError, match=says):
            SegmenterNode(context=context, namespace="/bad", parameter_overrides=params)


def test_close_finishes_the_frame_joins_the_worker_and_closes_the_segmenter(ros, tiny_bundle):
    node, probe = start_node(ros, "/closing", tiny_bundle)
    with held(node) as (entered, release, _):
        probe.send(picture(), "bgr8")
        assert entered.wait(TIMEOUT)
        ros[1].remove_node(node)
        closer = threading.Thread(target=node.close)
        closer.start()
        closer.join(0.2)
        assert closer.is_alive(), "close() returned while a frame was still running"
        release.set()
        closer.join(TIMEOUT)
    assert not closer.is_alive() and not node._worker.is_alive()
    assert node.seg.engines.dinov2.session is None, "the Segmenter's sessions are closed"
    assert node.frames == 1


def test_sigint_stops_the_process_cleanly(ros, tiny_bundle):
    _, _, probe_node, env = ros
    cmd = [sys.executable, "-m", "ovseg.runtime.ros", "--ros-args", "-r", "__ns:=/proc", "-p", f"bundle:={tiny_bundle}"]
    proc = subprocess.Popen(cmd, env=os.environ | env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
    reader.start()
    try:
        probe = Probe(probe_node, "/proc")
        wait_until(lambda: probe.image_pub.get_subscription_count(), "the node to subscribe", timeout=2 * TIMEOUT)
        wait_until(lambda: probe.node.count_publishers("/proc/segments"), "the node to publish")
        for _ in range(30):  # a frame sent just as discovery matches either way can be lost: send until one comes back
            try:
                probe.wait("segments", probe.send(picture(), "bgr8"), timeout=TIMEOUT / 30)
                break
            except pytest.fail.Exception:
                continue
        else:
            pytest.fail("the node's process segmented none of 30 frames")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT) == 0
    finally:
        proc.kill()
        proc.wait()
    reader.join(TIMEOUT)
    err = "".join(lines)
    assert "reading /proc/image" in err and re.search(r"ovseg-ros: stopped: [1-9]\d* frames segmented", err), err
    assert "Traceback" not in err, err


def test_the_console_script_helps_and_says_what_is_missing_in_one_line():
    entry = "import sys\nfrom ovseg.cli import ovseg_ros\nsys.argv = ['ovseg-ros', *sys.argv[1:]]\novseg_ros()"
    run = [sys.executable, "-c", entry]
    out = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "image_transport" in out.stdout and "cameras" in out.stdout
    out = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['rclpy'] = None\n" + entry],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (out.returncode, out.stderr.count("\n")) == (2, 1)
    assert out.stderr.startswith("ovseg-ros: error: no ROS 2 here (rclpy is missing): pip install 'ovseg[ros]'")


def test_the_node_leaves_torch_out_and_the_runtime_leaves_rclpy_out():
    probe = (
        "import sys, ovseg.runtime.segmenter, ovseg.runtime.tools.run; print('rclpy' in sys.modules);"
        "import ovseg.runtime.ros.node; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["False", "False"]
