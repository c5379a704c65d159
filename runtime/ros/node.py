"""ovseg-ros: a ROS 2 node that segments an image topic and names every segment (docs/ros.md).

Threads: the executor's thread only hands a message to the worker (one slot per camera: a message still waiting when
a newer one arrives is dropped and counted) and checks parameter changes; the worker thread decodes, segments the
newest frame of every camera that has one at once (``Segmenter.batch``), publishes, and applies accepted
``classes``/``vocabulary`` changes between two batches, so the executor never waits for a frame.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections import Counter
from collections.abc import Callable
from functools import partial

import numpy as np

from ovseg.cli import first_line, run_cli, say
from ovseg.errors import OvsegError

try:
    import rclpy
    from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
    from rclpy.exceptions import NameValidationException, ParameterException
    from rclpy.executors import ExternalShutdownException
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, qos_profile_sensor_data
    from rclpy.utilities import remove_ros_args
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import String
except ImportError as e:
    raise OvsegError(
        f"no ROS 2 here ({e.name} is missing): pip install 'ovseg[ros]' (x86-64), or source a ROS 2 distribution"
    ) from None

from ..bundle.integrity import read_names
from ..config import SegmenterConfig
from ..io.sinks import frame_record, to_json
from ..io.sources import Frame
from ..pipeline.vocabulary import load_vocabulary, parse_class_list
from ..result import Result
from ..segmenter import Segmenter, VideoStream
from .images import fill_image, frame_from_compressed, frame_from_image, label_map_encoding

PROG = "ovseg-ros"
TRANSPORTS = ("raw", "compressed")
# name -> (default, or the type of a parameter that is unset by default; description). Read at start, except LIVE.
PARAMETERS: dict[str, tuple[object, str]] = {
    "bundle": ("", "bundle directory (empty: the default bundle)"),
    "backend": ("auto", "auto, cpu, cuda or tensorrt"),
    "precision": ("", "auto, fp32, fp16 or int8 (empty: the profile's)"),
    "profile": ("", "accurate, balanced or fast (empty: the bundle's)"),
    "segments": (Parameter.Type.INTEGER, "segment candidates per frame (unset: the profile's)"),
    "keyframe_interval": (Parameter.Type.INTEGER, "CLIP at least every N-th frame (unset: the profile's)"),
    "keyframe_change": (Parameter.Type.DOUBLE, "or once this fraction of the picture changed (unset: the profile's)"),
    "threshold": (Parameter.Type.DOUBLE, "segments scoring under it are 'unknown' (unset: none)"),
    "threads": (Parameter.Type.INTEGER, "CPU threads for inference (unset: all cores)"),
    "image_transport": ("raw", "raw: sensor_msgs/Image on image; compressed: CompressedImage on image/compressed"),
    "cameras": ([], "several cameras, each's topics under its name (front/image, front/label_map, ...); [] one"),
    "classes": ([], "guided mode with these names (string array; empty: guidance-free); live"),
    "vocabulary": ("", "guidance-free names: a preset or a file (empty: the bundle's); live"),
}
LIVE = ("classes", "vocabulary")  # changed at run time (ros2 param set), applied from the next frame
OUTPUT_QOS = QoSProfile(depth=2)  # reliable: rviz2 and best-effort readers both connect
OUTPUTS = {"label_map": Image, "class_map": Image, "segments": String, "overlay": Image}


class Camera:
    """One camera's topics, video state and counts; ``name`` prefixes its topic names (empty: the node's own)."""

    def __init__(self, node: Node, name: str, compressed: bool):
        prefix = f"{name}/" if name else ""
        self.name = name
        try:
            self.topic = node.resolve_topic_name(f"{prefix}image") + ("/compressed" if compressed else "")
        except RuntimeError as e:  # rclpy's RCLError: not a valid name
            raise OvsegError(f"camera {name!r}: {first_line(e)}") from None
        self.pubs = {out: node.create_publisher(kind, f"{prefix}{out}", OUTPUT_QOS) for out, kind in OUTPUTS.items()}
        self.state = VideoStream()
        self.pending: tuple[int, Image | CompressedImage] | None = None  # the newest message not yet taken
        self.received = self.dropped = 0


class SegmenterNode(Node):
    """The node; ``node_options`` go to rclpy's Node (context, namespace, parameter_overrides, ...). Raises an
    OvsegError for parameters or a bundle it cannot start with. ``close()`` joins the worker and closes the
    Segmenter."""

    def __init__(self, **node_options):
        super().__init__("ovseg", **node_options)
        try:
            for name, (default, description) in PARAMETERS.items():
                descriptor = ParameterDescriptor(
                    description=description, read_only=name not in LIVE, dynamic_typing=isinstance(default, list)
                )
                self.declare_parameter(name, default, descriptor)
            value = {name: self.get_parameter_or(name).value for name in PARAMETERS}
            if value["image_transport"] not in TRANSPORTS:
                raise OvsegError(f"image_transport {value['image_transport']!r}: choose raw or compressed")
            compressed = value["image_transport"] == "compressed"
            self.cameras = [Camera(self, name, compressed) for name in _names(value["cameras"], "cameras") or [""]]
            self.seg = self._open(value)
        except BaseException as e:
            self.destroy_node()
            if isinstance(e, (ParameterException, NameValidationException)):
                raise OvsegError(first_line(e)) from None
            raise
        self.frames = 0
        self.bad: Counter[str] = Counter()  # cause (one line) -> frames skipped for it
        self._changes: list[tuple[str, Callable[[], None]]] = []  # (parameter, what applies it)
        self._stopping = False
        self._wake = threading.Condition()
        self._decode = frame_from_compressed if compressed else frame_from_image
        self.add_on_set_parameters_callback(self._on_parameters)
        self._worker = threading.Thread(target=self._work, name="ovseg-ros worker", daemon=True)
        self._worker.start()
        for cam in self.cameras:
            kind = CompressedImage if compressed else Image
            self.create_subscription(kind, cam.topic, partial(self._on_image, cam), qos_profile_sensor_data)
        topics = ", ".join(cam.topic for cam in self.cameras)
        self.get_logger().info(
            f"{self.seg.mode} mode, backend {self.seg.backend}, {self.seg.precision}; reading {topics}"
        )

    def _open(self, value: dict) -> Segmenter:
        classes = _names(value["classes"], "classes")
        if value["threads"] is not None and value["threads"] < 1:
            raise OvsegError(f"threads must be 1 or more, got {value['threads']}")
        if value["threads"] is not None:
            from ovseg import _native  # this process is the node's: the native kernels take the threads too

            _native.set_num_threads(value["threads"])
        config = SegmenterConfig(
            profile=value["profile"] or None,
            precision=value["precision"] or None,
            num_segments=value["segments"],
            keyframe_interval=value["keyframe_interval"],
            keyframe_change=value["keyframe_change"],
            score_threshold=value["threshold"],
        )
        return Segmenter.from_bundle(
            value["bundle"] or None,
            classes=classes,
            vocab=value["vocabulary"] or None,
            config=config,
            backend=value["backend"],
            threads=value["threads"],
        )

    # ---- the executor's thread: nothing here waits for a frame ------------------------------------------------

    def _on_image(self, cam: Camera, msg: Image | CompressedImage) -> None:
        with self._wake:
            if cam.pending is not None:
                cam.dropped += 1
            cam.pending = (cam.received, msg)
            cam.received += 1
            self._wake.notify()

    def _on_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Check ``classes`` and ``vocabulary`` here, apply them on the worker before its next frames."""
        changes = []
        for p in params:
            try:
                if p.name == "classes":
                    changes.append((p.name, partial(self.seg.set_classes, _names(p.value, "classes"))))
                elif p.name == "vocabulary":  # empty: the bundle's names again (embedded anew)
                    info = self.seg.manifest.vocabulary
                    names_file = self.seg.bundle_dir / info.names
                    names = load_vocabulary(p.value) if p.value else read_names(names_file, info.size)
                    changes.append((p.name, partial(self.seg.set_vocabulary, names)))
            except OvsegError as e:
                return SetParametersResult(successful=False, reason=f"{p.name}: {first_line(e)}")
        with self._wake:
            self._changes += changes
            self._wake.notify()
        return SetParametersResult(successful=True)

    # ---- the worker ------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(
                    lambda: self._stopping or self._changes or any(c.pending is not None for c in self.cameras)
                )
                if self._stopping:
                    return
                taken = [(cam, *cam.pending) for cam in self.cameras if cam.pending is not None]
                for cam in self.cameras:
                    cam.pending = None
                changes, self._changes = self._changes, []
            for name, apply in changes:
                try:
                    apply()
                except Exception as e:  # the parameter was accepted; the node goes on with what it had
                    self.get_logger().error(f"cannot apply the new {name}: {first_line(e)}")
            frames = []
            for cam, index, msg in taken:
                try:
                    frames.append((cam, index, msg, self._decode(msg)))
                except OvsegError as e:
                    self._skip(first_line(e))
            if frames:
                self._segment(frames)

    def _segment(self, frames: list[tuple[Camera, int, Image | CompressedImage, np.ndarray]]) -> None:
        """The newest frame of each camera that has one, through the encoders at once (``Segmenter.batch``)."""
        try:
            results = self.seg.batch([f[3] for f in frames], [f[0].state for f in frames])
            self.frames += len(results)
            classes = self.seg.labels if self.seg.mode == "guided" else None
            for (cam, index, msg, frame), result in zip(frames, results):
                self._publish(cam, index, msg, frame, result, classes)
        except Exception as e:  # the node never dies of its input; frames that fail are logged once per cause
            if self._stopping or not self.context.ok():
                return  # shutting down: the publishers may be gone
            cause = first_line(e) if isinstance(e, OvsegError) else f"{type(e).__name__}: {first_line(e)}"
            self._skip(cause, len(frames))

    def _publish(self, cam: Camera, index: int, msg, frame: np.ndarray, result: Result, classes: list[str] | None):
        label_map, encoding = label_map_encoding(result.label_map)
        cam.pubs["label_map"].publish(fill_image(Image(header=msg.header), label_map, encoding))
        if classes is not None:
            class_map = result.class_map(classes)
            mono = "mono8" if class_map.itemsize == 1 else "mono16"
            cam.pubs["class_map"].publish(fill_image(Image(header=msg.header), class_map, mono))
        stamp = msg.header.stamp
        record = frame_record(Frame(index, stamp.sec + stamp.nanosec * 1e-9, frame, cam.topic), result)
        record |= {"stamp": {"sec": stamp.sec, "nanosec": stamp.nanosec}, "frame_id": msg.header.frame_id}
        cam.pubs["segments"].publish(String(data=to_json(record | {"classes": classes})))
        if cam.pubs["overlay"].get_subscription_count():
            overlay = self.seg.render(frame, result)
            cam.pubs["overlay"].publish(fill_image(Image(header=msg.header), overlay, "bgr8"))

    def _skip(self, cause: str, frames: int = 1) -> None:
        self.bad[cause] += frames
        if self.bad[cause] == frames:
            self.get_logger().warning(f"skipped a frame: {cause} (logged once, every such frame counted)")

    def summary(self) -> str:
        dropped, bad = sum(c.dropped for c in self.cameras), sum(self.bad.values())
        return f"{self.frames} frames segmented, {dropped} dropped while busy, {bad} skipped"

    def close(self) -> None:
        """Stop the worker (after the frames it is on), close the Segmenter, destroy the node."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._worker.join()
        self.seg.close()
        self.destroy_node()


def _names(value: object, what: str) -> list[str] | None:
    """A string-array parameter as names, None where empty (an empty array of any type, an empty string); a
    comma-separated string works too."""
    if isinstance(value, str):
        return parse_class_list(value) if value.strip() else None
    if value is None or (hasattr(value, "__len__") and len(value) == 0):
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(n, str) for n in value):
        raise OvsegError(f"{what} takes a string array, got {value!r}")
    return list(dict.fromkeys(n.strip() for n in value if n.strip())) or None


def build_parser() -> argparse.ArgumentParser:
    lines = [f"  {name}: {description}" for name, (_, description) in PARAMETERS.items()]
    return argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A ROS 2 node: sensor_msgs/Image on 'image' (with cameras, on each's '<name>/image') in; "
        "label_map, class_map (guided mode), segments (JSON) and overlay out. "
        "Run: ovseg-ros --ros-args -r image:=/camera/image_raw -p classes:='[person, chair]'",
        epilog="parameters (-p name:=value):\n" + "\n".join(lines) + "\n\ndocs/ros.md has the rest.",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the node until Ctrl-C, SIGTERM or rclpy.shutdown; exits 0 when it stopped cleanly (ros2 launch reads any
    other status as a crash)."""
    argv = sys.argv if argv is None else [PROG, *argv]

    def body() -> int:
        try:
            build_parser().parse_args(remove_ros_args(argv)[1:])
        except RuntimeError as e:  # rclpy's RCLInvalidROSArgsError
            raise OvsegError(first_line(e)) from None
        rclpy.init(args=argv)
        try:
            node = SegmenterNode()
            try:
                rclpy.spin(node)
            except (KeyboardInterrupt, ExternalShutdownException):
                pass
            finally:
                node.close()
                say(PROG, f"stopped: {node.summary()}")
        finally:
            rclpy.try_shutdown()
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
