"""Sinks: annotated video (finalised even when the run is interrupted), PNG label maps + JSON, JSON lines."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from ovseg.errors import OvsegError
from ovseg.runtime.io.sinks import FrameDirSink, JsonLinesSink, VideoSink
from ovseg.runtime.io.sources import Frame, VideoFileSource
from ovseg.runtime.result import Result, Segment


def make_result(ids: tuple[int, int] = (0, 1), shape: tuple[int, int] = (48, 64)) -> Result:
    h, w = shape
    label_map = np.full(shape, ids[0], np.int32)
    label_map[:, w // 2 :] = ids[1]
    segments = [
        Segment(ids[0], "sky", np.float32(0.31), h * (w // 2), (0, 0, w // 2, h), [("cloud", 0.2)]),
        Segment(ids[1], "grass", 0.27, h * (w - w // 2), (w // 2, 0, w, h)),
    ]
    return Result(label_map, segments, {ids[0]: "sky", ids[1]: "grass"}, {"dinov2": 1.5, "total": 3.25}, frame_index=0)


def frame(index: int = 0, shape=(48, 64)) -> Frame:
    return Frame(index, index / 15, np.zeros((*shape, 3), np.uint8), "test")


def overlay(i: int, shape=(48, 64)) -> np.ndarray:
    return np.full((*shape, 3), i * 8, np.uint8)


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


# --- VideoSink ---------------------------------------------------------------------------------------------


def test_video_sink_writes_a_playable_video_only_on_close(tmp_path):
    path = tmp_path / "out.mp4"
    sink = VideoSink(path, fps=15)
    for i in range(10):
        sink.write(frame(i), make_result(), overlay(i))
    assert not path.exists()  # still under its temporary name
    sink.close()
    assert path.exists() and leftovers(tmp_path) == []
    frames = list(VideoFileSource(path))
    assert len(frames) == 10 and frames[0].image.shape == (48, 64, 3)
    assert VideoFileSource(path).fps == 15


def test_video_is_finalised_when_the_run_is_interrupted(tmp_path):
    path = tmp_path / "out.mp4"
    with pytest.raises(KeyboardInterrupt):
        with VideoSink(path, fps=10) as sink:
            for i in range(20):
                if i == 7:
                    raise KeyboardInterrupt  # Ctrl-C in the middle of the loop
                sink.write(frame(i), make_result(), overlay(i))
    assert len(list(VideoFileSource(path))) == 7
    assert leftovers(tmp_path) == []


def test_video_frames_of_other_sizes_are_resized_to_the_first(tmp_path):
    path = tmp_path / "mixed.mp4"
    with VideoSink(path, fps=5) as sink:
        sink.write(frame(0), make_result(), overlay(1))
        sink.write(frame(1), make_result(), overlay(2, shape=(100, 80)))
    assert [f.image.shape for f in VideoFileSource(path)] == [(48, 64, 3)] * 2


def test_video_sink_without_frames_leaves_no_file(tmp_path):
    VideoSink(tmp_path / "empty.mp4", fps=5).close()
    assert list(tmp_path.iterdir()) == []


def test_unwritable_video_path_fails_at_construction(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    with pytest.raises(OvsegError, match="cannot write video"):
        VideoSink(blocker / "out.mp4", fps=10)
    with pytest.raises(OvsegError, match="use .mp4"):
        VideoSink(tmp_path / "out.unknownext", fps=10)


def test_video_sink_creates_missing_parent_directories(tmp_path):
    with VideoSink(tmp_path / "a" / "b" / "out.mp4", fps=5) as sink:
        sink.write(frame(0), make_result(), overlay(0))
    assert (tmp_path / "a" / "b" / "out.mp4").is_file()


# --- FrameDirSink ------------------------------------------------------------------------------------------


def test_frame_dir_sink_writes_uint8_label_maps_and_json(tmp_path):
    with FrameDirSink(tmp_path / "frames") as sink:
        sink.write(frame(3), make_result(), None)
    d = tmp_path / "frames"
    assert sorted(p.name for p in d.iterdir()) == ["frame_000003.json", "frame_000003.png"]
    label_map = cv2.imread(str(d / "frame_000003.png"), cv2.IMREAD_UNCHANGED)
    assert label_map.dtype == np.uint8
    np.testing.assert_array_equal(label_map, make_result().label_map)
    record = json.loads((d / "frame_000003.json").read_text())
    assert record["frame"] == 3 and record["timestamp"] == pytest.approx(0.2)
    assert record["labels"] == {"0": "sky", "1": "grass"}
    assert record["label_map"] == "frame_000003.png"
    assert record["segments"][0]["label"] == "sky"
    assert record["segments"][0]["score"] == pytest.approx(0.31)
    assert record["segments"][0]["bbox"] == [0, 0, 32, 48]
    assert record["timings_ms"]["total"] == 3.25


def test_ids_over_255_are_written_as_uint16(tmp_path):
    with FrameDirSink(tmp_path) as sink:
        sink.write(frame(0), make_result(ids=(0, 300)), None)
    label_map = cv2.imread(str(tmp_path / "frame_000000.png"), cv2.IMREAD_UNCHANGED)
    assert label_map.dtype == np.uint16 and label_map.max() == 300


def test_label_ids_a_png_cannot_hold_are_an_error(tmp_path):
    with pytest.raises(OvsegError, match="0..65535"):
        FrameDirSink(tmp_path).write(frame(0), make_result(ids=(-1, 2)), None)
    assert leftovers(tmp_path) == []


def test_unwritable_save_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OvsegError, match="cannot create --save-dir"):
        FrameDirSink(blocker / "frames")


# --- JsonLinesSink -----------------------------------------------------------------------------------------


class CountingStream(io.StringIO):
    flushes = 0

    def flush(self):
        self.flushes += 1
        super().flush()


def test_json_lines_one_object_per_frame_flushed_per_line():
    stream = CountingStream()
    sink = JsonLinesSink(stream)
    for i in range(3):
        sink.write(frame(i), make_result(), None)
        assert stream.flushes == i + 1
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["frame"] for r in records] == [0, 1, 2]
    assert records[1]["timestamp"] == pytest.approx(1 / 15)
    assert {"label", "score", "area", "bbox"} <= set(records[0]["segments"][0])
    assert records[0]["source"] == "test"
