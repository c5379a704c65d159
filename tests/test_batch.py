"""Segmenter.batch: frames of several streams through the encoders at once, each result the one its stream gets alone."""

from __future__ import annotations

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
