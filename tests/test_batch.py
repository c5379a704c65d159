"""Segmenter.batch: frames of several streams through the encoders at once, each result the one its stream gets alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ovseg.runtime import Segmenter, SegmenterConfig, SegmenterError
from ovseg.runtime.segmenter import VideoStream


def moving_frames(seed: int, n: int, shape: tuple[int, int]) -> list[np.ndarray]:
    """A textured picture panning sideways: a video whose frames continue each other."""
    rng = np.random.default_rng(seed)
    h, w = shape
    wide = rng.integers(0, 256, (h // 8, (w + 8 * n) // 8, 3), np.uint8).repeat(8, 0).repeat(8, 1)
    return [np.ascontiguousarray(wide[:h, 8 * i : 8 * i + w]) for i in range(n)]


def same(a, b) -> None:
    assert np.array_equal(a.label_map, b.label_map)
    assert a.labels == b.labels
    assert a.keyframe == b.keyframe and a.frame_index == b.frame_index
    assert len(a.segments) == len(b.segments)
    for x, y in zip(a.segments, b.segments):
        assert (x.id, x.label, x.area, x.bbox) == (y.id, y.label, y.area, y.bbox)
        assert x.score == pytest.approx(y.score, abs=1e-5)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"config": SegmenterConfig(keyframe_interval=3)},
        {"classes": ["cat", "dog", "person"], "config": SegmenterConfig(refine="segments", keyframe_interval=2)},
    ],
    ids=["free", "keyframes", "guided-voting"],
)
def test_batched_streams_equal_each_stream_alone(tiny_bundle, settings) -> None:
    videos = [moving_frames(s, 5, shape) for s, shape in enumerate([(96, 128), (120, 90), (96, 128)])]
    with Segmenter.from_bundle(tiny_bundle, threads=1, **settings) as seg:
        alone = []
        for video in videos:
            stream = VideoStream()
            alone.append([seg.batch([f], [stream])[0] for f in video])
        streams = [VideoStream() for _ in videos]
        for t in range(5):
            together = seg.batch([v[t] for v in videos], streams)
            for k in range(len(videos)):
                same(together[k], alone[k][t])


def test_call_is_a_batch_of_the_threads_stream(tiny_bundle) -> None:
    video = moving_frames(7, 3, (80, 80))
    with Segmenter.from_bundle(tiny_bundle, threads=1) as seg:
        called = [seg(f) for f in video]
        stream = VideoStream()
        for f, r in zip(video, called):
            same(seg.batch([f], [stream])[0], r)


def test_batch_refuses_a_stream_twice_and_mismatched_lists(tiny_bundle) -> None:
    frame = moving_frames(0, 1, (64, 64))[0]
    with Segmenter.from_bundle(tiny_bundle, threads=1) as seg:
        stream = VideoStream()
        with pytest.raises(SegmenterError, match="one frame per stream"):
            seg.batch([frame, frame], [stream, stream])
        with pytest.raises(SegmenterError, match="one stream per frame"):
            seg.batch([frame, frame], [stream])
        assert stream.frame_index == 0  # refused before anything ran


def test_a_stream_continues_whichever_thread_calls_it(tiny_bundle) -> None:
    """An executor hands one camera's frames to whichever thread is free: a stream's state follows the stream, not the
    thread, so each frame gets what one serial stream gives it (the thread's own stream would start over)."""
    rng = np.random.default_rng(3)
    still = moving_frames(3, 1, (80, 96))[0]  # a still camera: each moving frame would be a cut to the change measure
    video = [np.clip(still + rng.normal(0, 3, still.shape), 0, 255).astype(np.uint8) for _ in range(4)]
    with Segmenter.from_bundle(tiny_bundle, threads=1, config=SegmenterConfig(keyframe_interval=2)) as seg:
        serial = VideoStream()
        expected = [seg.batch([f], [serial])[0] for f in video]
        stream, got = seg.stream(), []
        for frame in video:  # every frame on a thread of its own
            worker = threading.Thread(target=lambda f=frame: got.append(stream(f)))
            worker.start()
            worker.join()
        for a, b in zip(got, expected):
            same(a, b)
        assert [r.frame_index for r in got] == [0, 1, 2, 3] and [r.keyframe for r in got] == [True, False, True, False]
        stream.reset()
        assert stream(video[0]).frame_index == 0


def test_streams_called_at_once_from_threads_each_equal_their_serial_run(tiny_bundle) -> None:
    videos = [moving_frames(s, 4, (72, 72)) for s in range(3)]
    with Segmenter.from_bundle(tiny_bundle, threads=1) as seg:
        expected = []
        for video in videos:
            serial = VideoStream()
            expected.append([seg.batch([f], [serial])[0] for f in video])
        streams = [seg.stream() for _ in videos]
        got: list[list] = [[] for _ in videos]

        def play(k: int) -> None:
            for frame in videos[k]:
                got[k].append(streams[k](frame))

        workers = [threading.Thread(target=play, args=(k,)) for k in range(len(videos))]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        for k in range(len(videos)):
            for a, b in zip(got[k], expected[k], strict=True):
                same(a, b)
