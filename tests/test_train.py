"""ovseg-train: Sinkhorn, EMA, mask pooling, targets, data, trained parameters, loss drop, resume, export to a bundle."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_colour_regions

from ovseg.export import dinov2 as dino
from ovseg.export.bundle import ExportConfig, export_bundle
from ovseg.export.clip import ClipDenseVisual, _load_state, _read_checkpoint, tiny_clip
from ovseg.export.errors import ExportError
from ovseg.export.train import cli
from ovseg.export.train.data import CropConfig, DinoMasker, InfiniteDraws, MaskDataset, collate, find_images
from ovseg.export.train.engine import TrainConfig, lr_factor, train
from ovseg.export.train.losses import cluster_targets, mask_loss, own_targets, pool_masks, sinkhorn
from ovseg.export.train.model import ClassPrompts, DenseClip, ema_update, make_teacher, set_trainable
from ovseg.runtime.bundle.manifest import read_manifest
from ovseg.runtime.tools import run as run_cli

SMALL = CropConfig(short_side=96, max_size=200, crop=64, clip_size=64, mask_size=32)
ALIGNED = CropConfig(short_side=96, max_size=200, crop=64, clip_size=64, mask_size=64)  # one mask pixel per image pixel


def small_config(data, out, **kw) -> TrainConfig:
    base = dict(data=data, out=out, iters=2, batch=4, prompts=8, workers=0, vocab=None, crop=SMALL, save_every=1000)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and lose a lot to it on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_colour_regions(tmp_path_factory.mktemp("synthetic"), count=12)


def test_sinkhorn_equalises_cluster_marginals():
    g = torch.Generator().manual_seed(0)
    n, k = 600, 12
    logits = torch.randn(n, k, generator=g) * 3 + torch.linspace(0, 4, k)  # clusters of very unequal appeal
    before = torch.softmax(logits, dim=1).sum(0) / (n / k)
    assert before.max() / before.min() > 5
    q = sinkhorn(logits, iters=3)
    assert torch.allclose(q.sum(1), torch.ones(n), atol=1e-5)
    marginals = q.sum(0) / (n / k)
    assert marginals.min() > 0.85 and marginals.max() < 1.15
    assert torch.bincount(q.argmax(1), minlength=k).min() > 0.6 * n / k
    converged = sinkhorn(logits, iters=50).sum(0) / (n / k)
    assert torch.allclose(converged, torch.ones(k), atol=1e-3)


def test_sinkhorn_survives_scaled_cosines_and_no_samples():
    g = torch.Generator().manual_seed(1)
    cos = F.normalize(torch.randn(50, 8, generator=g), dim=1) @ F.normalize(torch.randn(64, 8, generator=g), dim=1).T
    assert torch.isfinite(sinkhorn(100 * cos)).all()
    assert sinkhorn(torch.zeros(0, 5)).shape == (0, 5)


def test_ema_update_is_exact():
    teacher, student = tiny_clip().visual, tiny_clip().visual
    with torch.no_grad():  # dyadic values: every product and sum below is exact in float32
        for i, (t, s) in enumerate(zip(teacher.parameters(), student.parameters())):
            t.copy_(torch.randint(-64, 64, t.shape, generator=torch.Generator().manual_seed(i)) / 8)
            s.copy_(torch.randint(-64, 64, s.shape, generator=torch.Generator().manual_seed(1000 + i)) / 8)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.75)
    for name, s in student.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], 0.75 * before[name] + 0.25 * s), name
    student = tiny_clip().visual
    before = {k: v.clone().double() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.999)
    for name, s in student.state_dict().items():
        expected = 0.999 * before[name] + 0.001 * s.double()
        assert torch.allclose(teacher.state_dict()[name].double(), expected, rtol=2e-7, atol=1e-12), name
    ema_update(teacher, student, 0.0)  # --ema 0: no momentum teacher, the student of the step
    assert all(torch.equal(teacher.state_dict()[k], s) for k, s in student.state_dict().items())


def test_mask_pooling_equals_upsample_then_average():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(8, 5, 5, generator=g)
    masks = torch.rand(3, 32, 32, generator=g) > 0.6
    up = F.interpolate(features[None], size=(32, 32), mode="bilinear", align_corners=False)[0]
    literal = torch.stack([(up * m).sum(dim=(1, 2)) / m.sum() for m in masks.float()])
    assert torch.allclose(pool_masks(features, masks), literal, atol=1e-5)


def test_targets_are_unions_of_the_masks_of_each_cluster():
    g = torch.Generator().manual_seed(3)
    masks = [torch.rand(6, 16, 16, generator=g) > 0.7, torch.rand(4, 16, 16, generator=g) > 0.7]
    teacher, prompts = torch.randn(2, 12, 4, 4, generator=g), torch.randn(5, 12, generator=g)
    out = cluster_targets(masks, teacher, prompts, scale=100.0, iters=3)
    assert out.targets.shape == (2, 5, 16, 16) and out.assignment.shape == (10,)
    start = 0
    for b, mk in enumerate(masks):
        assign = out.assignment[start : start + len(mk)]
        for k in range(5):
            union = mk[assign == k].any(dim=0) if (assign == k).any() else torch.zeros(16, 16, dtype=torch.bool)
            assert torch.equal(out.targets[b, k].bool(), union)
        start += len(mk)
    logits = torch.zeros(2, 5, 16, 16, requires_grad=True)
    loss = mask_loss(logits, out.targets)
    assert loss.item() == pytest.approx(np.log(2), abs=1e-6)
    loss.backward()
    uncovered = out.targets.sum(1) == 0  # pixels no mask covers carry no loss
    assert (logits.grad.permute(0, 2, 3, 1)[uncovered] == 0).all() and logits.grad.abs().sum() > 0


def test_without_clustering_every_mask_is_its_own_target():
    masks = [torch.rand(3, 8, 8) > 0.5, torch.rand(2, 8, 8) > 0.5]
    out = own_targets(masks)
    assert out.targets.shape == (2, 5, 8, 8) and out.clusters_used == 5
    assert torch.equal(out.targets[0, :3].bool(), masks[0]) and not out.targets[0, 3:].any()
    assert torch.equal(out.targets[1, 3:].bool(), masks[1]) and not out.targets[1, :3].any()


def test_prompt_ablations_freeze_the_prompts(data, tmp_path):
    """--no-clustering and --frozen-prompts leave the prompts as initialised (the student still learns)."""
    initial = ClassPrompts(tiny_clip(), 8, 4, 0).tokens.detach()
    for kw in ({"cluster": False}, {"learn_prompts": False}, {}):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        result = train(small_config(data, out, **kw), clip_model=tiny_clip())
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert torch.equal(ckpt["prompt_tokens"], initial) == bool(kw), kw
        assert np.isfinite(result.losses).all()


def test_prompts_start_from_tokens_that_have_an_embedding():
    """A CLIP whose unused vocabulary rows are zero (the synthetic world's) must not start every prompt alike."""
    clip = tiny_clip()
    with torch.no_grad():
        clip.token_embedding.weight[20:] = 0
    tokens = ClassPrompts(clip, k=8, words=4).tokens
    assert (tokens.abs().sum(dim=-1) > 0).all() and len(torch.unique(tokens, dim=0)) == 8


def test_crops_masks_and_views_line_up(data):
    images = find_images(data, "sa1b")
    dataset = MaskDataset(images, "sa1b", ALIGNED, seed=0)
    for draw in range(6):
        s = dataset[draw]
        assert s.teacher.shape == (3, 64, 64) and s.masks.shape[1:] == (64, 64) and s.teacher.dtype == torch.uint8
        cover = s.masks.sum(0)
        assert cover.max() <= 1 and (cover.bool() & ~s.keep).sum() == 0  # regions partition the frame, cut-out removed
        assert cover.sum() > 0.9 * s.keep.sum() - 2 * len(s.masks)
        for m in s.masks:  # every mask covers one colour region (+-12 noise) of the un-augmented view
            colours = s.teacher[:, m].float()
            assert (colours - colours.median(dim=1, keepdim=True).values).abs().max() <= 24
        assert not torch.equal(s.teacher, s.student)
        again = dataset[draw]
        assert torch.equal(again.student, s.student) and torch.equal(again.masks, s.masks)
    plain = MaskDataset(images, "sa1b", CropConfig(**{**SMALL.__dict__, "strong": False}))[0]
    assert torch.equal(plain.teacher, plain.student) and plain.keep.all()


def test_annotations_may_live_in_a_mirrored_tree(data, tmp_path):
    (tmp_path / "images" / "part").mkdir(parents=True)
    (tmp_path / "annotations" / "part").mkdir(parents=True)
    for png in sorted(data.glob("*.png"))[:2]:
        (tmp_path / "images" / "part" / png.name).write_bytes(png.read_bytes())
        (tmp_path / "annotations" / "part" / png.with_suffix(".json").name).write_bytes(
            png.with_suffix(".json").read_bytes()
        )
    items = find_images(tmp_path / "images", "sa1b", tmp_path / "annotations")
    assert [i.annotation.parent.name for i in items] == ["part", "part"]
    assert len(MaskDataset(items, "sa1b", SMALL)[0].masks) > 0
    with pytest.raises(ExportError, match="no annotation JSON"):
        find_images(tmp_path / "images", "sa1b")


def test_draws_split_across_ranks_and_resume_where_they_left_off():
    def take(sampler, n):
        return [d for _, d in zip(range(n), iter(sampler))]

    r0, r1 = take(InfiniteDraws(10, 0, 2, seed=1), 10), take(InfiniteDraws(10, 1, 2, seed=1), 10)
    assert sorted(d % 10 for d in r0[:5] + r1[:5]) == list(range(10))
    assert take(InfiniteDraws(10, 1, 2, seed=1, skip=3), 7) == r1[3:]


def test_dino_masks_come_from_the_runtime_kmeans():
    masker = DinoMasker(dino.random_dinov2(dino.tiny_dinov2_config()), image_size=56, clusters=4, mask_size=32)
    images = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8)
    keep = torch.ones(2, 32, 32, dtype=torch.bool)
    keep[1, :8] = False
    masks = masker(images, keep)
    assert len(masks) == 2 and all(1 <= len(m) <= 4 for m in masks)
    assert torch.equal(masks[0].sum(0), torch.ones(32, 32, dtype=torch.long))  # one label per pixel
    assert masks[1][:, :8].sum() == 0


def test_training_on_dino_masks(data, tmp_path):
    for json_file in data.glob("*.json"):  # DINOv2 masks need no annotations: train on bare images
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "images" / json_file.with_suffix(".png").name).write_bytes(
            json_file.with_suffix(".png").read_bytes()
        )
    cfg = small_config(tmp_path / "images", tmp_path / "run", masks="dino", dino_size=56, dino_clusters=4)
    result = train(cfg, clip_model=tiny_clip(), dinov2_model=dino.random_dinov2(dino.tiny_dinov2_config()))
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert all(int(r["masks"]) > 0 for r in csv.DictReader((tmp_path / "run" / "log.csv").open()))


def test_prompts_fill_the_template_and_learn_through_the_frozen_text_tower():
    clip = tiny_clip()
    prompts = ClassPrompts(clip, k=3, words=4)
    assert prompts.slots.tolist() == [5, 6, 7, 8] and prompts.ids.shape[1] == 13
    out = prompts()
    assert out.shape == (3, 48)
    out.sum().backward()
    assert prompts.tokens.grad.abs().sum() > 0 and clip.token_embedding.weight.grad is None


def test_only_the_intended_parameters_change(data, tmp_path):
    clip = tiny_clip()
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    expected = {f"visual.{n}" for n in set_trainable(tiny_clip().visual, "attention")}
    assert expected and all(".attn." in n or n == "visual.positional_embedding" for n in expected)
    train(small_config(data, tmp_path / "run", iters=2), clip_model=clip)
    changed = {k for k, v in clip.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == expected
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    teacher_changed = {k for k, v in ckpt["teacher"].items() if not torch.equal(v, before[k])}
    assert teacher_changed == expected  # the EMA moved the teacher towards the trained student only
    assert {n for n in set_trainable(tiny_clip().visual, "full")} == {
        n for n, _ in tiny_clip().visual.named_parameters()
    }


def test_dense_student_matches_the_export_and_trains_the_position_embedding():
    visual = tiny_clip().visual
    dense = DenseClip(visual, 96, "pixelclip")
    teacher = make_teacher(dense)
    image = torch.randn(1, 3, 96, 96)
    assert torch.allclose(dense(image)[1], ClipDenseVisual(visual, 96, "pixelclip")(image)[1], atol=1e-6)
    dense.dense(image).sum().backward()
    assert visual.positional_embedding.grad.abs().sum() > 0
    assert teacher.visual.positional_embedding is not visual.positional_embedding


def test_schedule_is_warmup_then_cosine_to_lr_end():
    cfg = TrainConfig(data=".", out=".", iters=100, warmup=10)
    assert lr_factor(0, cfg) == pytest.approx(0.001)
    assert lr_factor(10, cfg) == pytest.approx(0.5 + 0.5 * 0.5 * (1 + np.cos(np.pi * 0.1)))
    assert lr_factor(100, TrainConfig(data=".", out=".", iters=100)) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    clip = tiny_clip()
    result = train(small_config(data, out, iters=24, lr=1e-3, vocab="voc21", save_every=12), clip_model=clip)
    return out, result, clip


def test_training_drives_the_loss_down(trained):
    out, result, _ = trained
    losses = result.losses
    assert np.mean(losses[-3:]) < 0.6 * losses[0], losses
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 25))
    assert float(rows[-1]["loss"]) == pytest.approx(losses[-1], abs=1e-5)


def test_outputs_load_in_the_export_and_run_in_a_bundle(trained, tmp_path):
    out, _, trained_clip = trained
    prompts = np.load(out / "prompts.npy", allow_pickle=False)
    assert prompts.shape == (8, 48) and np.allclose(np.linalg.norm(prompts, axis=1), 1, atol=1e-5)
    names = json.loads((out / "prompt_names.json").read_text())
    assert names["vocabulary"] == "voc21" and len(names["prompts"]) == 8 and len(names["prompts"][0]["nearest"]) == 5
    for path in (out / "student_visual.safetensors", out / "checkpoint.pt"):
        clip = tiny_clip()
        _load_state(clip, _read_checkpoint(path), path, full=False)
        for key, value in trained_clip.visual.state_dict().items():
            assert torch.equal(clip.visual.state_dict()[key], value), (path.name, key)
    bundle = export_bundle(
        ExportConfig(
            out=tmp_path / "bundle", clip_weights=out / "student_visual.safetensors", image_size=112, vocab="voc21"
        ),
        clip_model=clip,
        dinov2_model=dino.random_dinov2(dino.tiny_dinov2_config()),
    )
    manifest = read_manifest(bundle)
    assert (
        manifest.dense_method == "pixelclip"
        and "student_visual.safetensors" in manifest.clip.weights
        or manifest.clip.weights == "injected"
    )
    segmenter = pytest.importorskip("ovseg.runtime.segmenter", reason="the runtime Segmenter has not landed yet")
    frame = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    result = segmenter.Segmenter.from_bundle(bundle)(frame)
    assert result.label_map.shape == (90, 120)
    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), frame)
    assert (
        run_cli.main(
            ["--bundle", str(bundle), "--image", str(image), "--no-show", "--max-frames", "1", "--threads", "1"]
        )
        == 0
    )


def test_resume_continues_the_run(data, tmp_path):
    out = tmp_path / "run"
    train(small_config(data, out, iters=2), clip_model=tiny_clip())
    with pytest.raises(ExportError, match="exists: pass --resume"):
        train(small_config(data, out, iters=3), clip_model=tiny_clip())
    with pytest.raises(ExportError, match="prompts=8"):
        train(small_config(data, out, iters=3, prompts=4, resume=True), clip_model=tiny_clip())
    with pytest.raises(ExportError, match="cluster=True"):  # an ablation flag is part of the run too
        train(small_config(data, out, iters=3, cluster=False, resume=True), clip_model=tiny_clip())
    result = train(small_config(data, out, iters=3, resume=True), clip_model=tiny_clip())
    assert len(result.losses) == 1
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    assert len((out / "log.csv").read_text().splitlines()) == 1 + 3


def test_cli_defaults_are_the_config_defaults():
    """ovseg-train's flags take their defaults from TrainConfig and CropConfig: nothing restated that could drift."""
    args = cli.build_parser().parse_args(["--data", "d", "--out", "o"])
    assert cli.config_from_args(args) == TrainConfig(data=Path("d"), out=Path("o"))
    args = cli.build_parser().parse_args(
        ["--data", "d", "--out", "o", "--no-names", "--fp32", "--no-strong-aug", "--crop", "32", "--no-hue"]
        + ["--no-clustering", "--frozen-prompts"]
    )
    config = cli.config_from_args(args)
    assert (config.vocab, config.amp, config.crop.strong, config.crop.crop) == (None, False, False, 32)
    assert (config.crop.hue, config.cluster, config.learn_prompts) == (False, False, False)


def test_bad_data_fails_with_one_line(tmp_path, capsys):
    def run(*argv):
        code = cli.main(["--out", str(tmp_path / "out"), "--random-weights", "--workers", "0", *argv])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        return err

    assert "does not exist" in run("--data", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert "no images" in run("--data", str(tmp_path / "empty"))
    data = write_colour_regions(tmp_path / "d", count=2, size=(40, 50))
    (data / "synthetic_0001.json").unlink()
    assert "have no annotation JSON" in run("--data", str(data))
    assert "annotation directory" in run("--data", str(data), "--annotations", str(tmp_path / "nowhere"))
    with pytest.raises(ExportError, match="unreadable annotation"):
        (data / "synthetic_0001.json").write_text("{not json")
        MaskDataset(find_images(data, "sa1b"), "sa1b", SMALL)[1]
    with pytest.raises(ExportError, match="masks of size"):
        other = write_colour_regions(tmp_path / "o", count=1, size=(30, 30))
        (data / "synthetic_0001.json").write_text((other / "synthetic_0000.json").read_text())
        MaskDataset(find_images(data, "sa1b"), "sa1b", SMALL)[1]
    assert "choose one of" in run("--data", str(data), "--clip", "NoSuchModel")


def test_collate_keeps_ragged_masks(data):
    dataset = MaskDataset(find_images(data, "sa1b"), "sa1b", SMALL)
    batch = collate([dataset[0], dataset[1]])
    assert batch.teacher.shape == (2, 3, 64, 64) and len(batch.masks) == 2 and batch.dino is None


def test_cli_trains_the_real_architecture_with_random_weights(data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "--data",
        str(data),
        "--out",
        str(out),
        "--random-weights",
        "--iters",
        "1",
        "--batch",
        "1",
        "--prompts",
        "2",
        "--short-side",
        "96",
        "--crop",
        "32",
        "--clip-size",
        "32",
        "--mask-size",
        "16",
        "--workers",
        "0",
        "--no-names",
    ]
    assert cli.main(argv) == 0
    assert "ovseg-export --clip-weights" in capsys.readouterr().out
    state = _read_checkpoint(out / "student_visual.safetensors")
    assert state["visual.positional_embedding"].shape == (197, 768)
    assert np.load(out / "prompts.npy").shape == (2, 512)
    assert json.loads((out / "config.json").read_text())["clip"] == "ViT-B-16:openai"
