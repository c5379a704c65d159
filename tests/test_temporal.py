"""Video state in the known world (benchmarks/synthetic/temporal.py's clips and measures): after a cut no frame names
a class of the scene before, a still camera keeps its labels, an object that enters is named within ENTER_FRAMES."""

from __future__ import annotations

import numpy as np
import pytest

from ovseg.benchmarks.synthetic import quality, temporal
from ovseg.runtime.pipeline.features import CUT_FRACTION, Keyframe, unit_rows
from ovseg.runtime.pipeline.labels import SAME_SEGMENT, LabelHysteresis
from ovseg.runtime.segmenter import Segmenter, VideoStream

ENTER_FRAMES = 4  # frames from an object's entry to its label: hysteresis (3) + 1
STILL_FLICKER = 0.05  # share of pixels per steady frame of a still camera with sensor noise


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return quality.export_world_bundle(tmp_path_factory.mktemp("world") / "bundle", "gem")


@pytest.fixture(scope="module")
def clips():
    return temporal.make_clips(scenes=4, frames=6)


def runs(bundle, clips, mode: str, kind: str) -> list[temporal.Run]:
    with quality.open_world(bundle, mode, precision="fp32") as seg:
        return [temporal.run_clip(seg, c) for c in clips if c.kind == kind]


def test_a_large_change_starts_the_stream_afresh():
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(8, 8, 16)).astype(np.float32)
    stream = VideoStream(centres=np.ones((3, 16), np.float32), keyframe=Keyframe(uses=2))
    stream.labels = object()  # type: ignore[assignment]  # any history
    Segmenter._follow(stream, grid)  # the first frame: nothing to compare with
    assert stream.change is None and stream.centres is not None
    Segmenter._follow(stream, grid + rng.normal(scale=0.01, size=grid.shape).astype(np.float32))
    assert stream.change == 0.0 and stream.centres is not None and stream.labels is not None
    moved = grid.copy()
    moved[:4] = rng.normal(size=(4, 8, 16))  # half the picture is new
    Segmenter._follow(stream, moved)
    assert stream.change is not None and stream.change > CUT_FRACTION
    assert stream.centres is None and stream.labels is None and stream.keyframe.expired
    assert np.allclose(stream.tokens, unit_rows(moved))


@pytest.mark.parametrize("mode", temporal.MODES)
def test_no_stale_labels_after_a_cut(bundle, clips, mode):
    (run,) = runs(bundle, clips, mode, "cuts")
    assert len(run.lags) == 4
    stale = [t for t, n in enumerate(run.stale) if n]
    assert stale == [], f"frames naming a class of the scene before: {stale}"


@pytest.mark.parametrize("mode", temporal.MODES)
def test_a_still_camera_keeps_its_labels(bundle, clips, mode):
    steady = [f for r in runs(bundle, clips, mode, "still") for t, f in enumerate(r.flicker, 1) if t >= temporal.SETTLE]
    assert steady and max(steady) <= STILL_FLICKER


def test_an_object_that_enters_is_named_within_enter_frames(bundle, clips):
    for run in runs(bundle, clips, "free", "enter/leave"):
        assert run.lags[1] <= ENTER_FRAMES, run.lags


def test_a_segment_keeps_its_label_only_while_it_is_the_same_thing():
    h = LabelHysteresis(2, frames=3)
    ids, first = np.array([0, 1]), np.eye(2, 4, dtype=np.float32)
    assert h.update(ids, np.array([5, 5]), first).tolist() == [5, 5]
    close = first + np.float32(0.05) * np.eye(2, 4, 2, dtype=np.float32)  # the same segments, a little moved
    assert h.update(ids, np.array([7, 7]), close).tolist() == [5, 5]  # a new label must win 3 frames in a row
    turned = close.copy()
    turned[1] = np.eye(4, dtype=np.float32)[3]  # segment 1 now shows something else: cosine 0 with its anchor
    assert np.einsum("d,d->", turned[1], first[1]) < SAME_SEGMENT
    assert h.update(ids, np.array([7, 7]), turned).tolist() == [5, 7]
