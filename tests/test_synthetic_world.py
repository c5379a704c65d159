"""The synthetic world: its scenes, its on-disk layout, and the tiny CLIP fixture's proof that it learned the world."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ovseg.benchmarks.eval.datasets import open_dataset
from ovseg.benchmarks.synthetic import pretrain, scenes
from ovseg.benchmarks.synthetic.dataset import split_layouts, video_frames, write_dataset
from ovseg.benchmarks.synthetic.world import CLASSES, HELD_OUT, HELD_OUT_OBJECTS, OBJECTS, SEEN_OBJECTS, STUFF
from ovseg.errors import OvsegError


def test_scenes_are_deterministic_by_seed():
    a = scenes.render(scenes.sample_layout(np.random.default_rng(7)))
    b = scenes.render(scenes.sample_layout(np.random.default_rng(7)))
    c = scenes.render(scenes.sample_layout(np.random.default_rng(8)))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image)


def test_labels_masks_and_caption_agree():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = scenes.render(scenes.sample_layout(rng, objects=(2, 4)))
        objects, floor = scene.names[:-1], scene.names[-1]
        assert floor in STUFF and all(n in OBJECTS for n in objects)
        assert all(n in scene.caption for n in scene.names)
        # the masks tile the frame: every pixel in exactly one, the floor's mask is where the label is the floor
        assert np.array_equal(np.sum(scene.masks, axis=0), np.ones(scene.labels.shape))
        assert np.array_equal(scene.masks[-1], scene.labels == CLASSES.index(floor))
        present = {CLASSES[v] for v in np.unique(scene.labels)}
        assert present == set(scene.names)
        for mask in scene.masks[:-1]:  # each object's visible part carries one object label
            assert mask.sum() > 0 and len(np.unique(scene.labels[mask])) == 1


def test_objects_keep_enough_of_themselves_visible():
    rng = np.random.default_rng(1)
    for _ in range(20):
        layout = scenes.sample_layout(rng, objects=(4, 5))
        full = scenes.object_masks(layout.objects, layout.size)
        for f, v in zip(full, scenes.visible_masks(full)):
            assert v.sum() >= scenes.MIN_VISIBLE * f.sum()


def test_training_never_sees_the_held_out_combinations():
    assert len(HELD_OUT_OBJECTS) == len(HELD_OUT) and not set(HELD_OUT_OBJECTS) & set(SEEN_OBJECTS)
    seen = {n for layout in split_layouts("train", 300) for n in (p.name for p in layout.objects)}
    assert seen and not seen & set(HELD_OUT_OBJECTS)
    batch = next(iter(pretrain.CaptionedScenes(64, seed=0)))
    assert not any(n in c for c in batch[1] for n in HELD_OUT_OBJECTS)
    val = {n for layout in split_layouts("val", 300) for n in (p.name for p in layout.objects)}
    assert set(HELD_OUT_OBJECTS) <= val  # held-out scenes do show them


def test_captions_naming_the_same_things_are_positives_not_negatives():
    """Two images of the same things, captioned in two word orders: with one key both captions should embed alike
    (a negative pair would instead push each caption towards its own image only)."""
    import torch
    import torch.nn.functional as F

    e = torch.eye(3)
    images = F.normalize(torch.stack([e[0] + 0.5 * e[1], e[0] - 0.5 * e[1], e[2]]), dim=1)
    apart = images.clone()  # each caption at its own image
    together = torch.stack([e[0], e[0], e[2]])  # both captions at what the images share
    scale = torch.tensor(10.0)

    def loss(text, keys):
        return pretrain.contrastive_loss(images, text, scale, torch.tensor(keys))

    assert loss(together, [5, 5, 2]) < loss(apart, [5, 5, 2])
    assert loss(apart, [0, 1, 2]) < loss(together, [0, 1, 2])


def test_batches_hold_hard_negatives_and_shape_only_captions():
    from ovseg.benchmarks.synthetic.world import COLOURS, SHAPES

    images, captions, keys = next(iter(pretrain.CaptionedScenes(32, seed=3)))
    singles = captions[:16]
    shape_only = [c for c in singles if not any(f" {colour} " in c for colour in COLOURS)]
    assert shape_only and len(shape_only) < len(singles)
    # captions naming one shape on one floor share a key whatever the painted colour
    by_caption = {}
    for c, k in zip(captions, keys.tolist()):
        assert by_caption.setdefault(c, k) == k
    # a colour's group holds several shapes: colour alone cannot tell its captions apart
    coloured = [c for c in singles if c not in shape_only]
    assert any(sum(f" {colour} " in c for c in coloured) > 1 for colour in COLOURS)
    assert {s for c in singles for s in SHAPES if f" {s} " in c} == set(SHAPES)
    assert images.shape == (32, 3, 224, 224)


def test_moving_clips_move_and_keep_their_objects():
    clip = video_frames(1, 6)[0]
    assert len(clip) == 6 and all(f.names == clip[0].names for f in clip)
    assert not np.array_equal(clip[0].labels, clip[-1].labels)


def test_the_layout_ovseg_eval_reads(tmp_path):
    root = write_dataset(tmp_path / "world", split_layouts("val", 3))
    dataset = open_dataset("synthetic", root)
    assert dataset.classes == list(CLASSES) and len(dataset) == 3
    sample = dataset.samples[0]
    scene = scenes.render(split_layouts("val", 1)[0])
    assert np.array_equal(dataset.label(sample), scene.labels)
    assert np.array_equal(dataset.image(sample)[..., ::-1], scene.image)
    record = json.loads((root / "masks" / f"{sample.name}.json").read_text())
    assert len(record["annotations"]) == len(scene.masks)
    assert json.loads((root / "captions.json").read_text())[sample.name] == scene.caption
    (root / "classes.txt").unlink()
    with pytest.raises(OvsegError, match="classes.txt"):
        open_dataset("synthetic", root)


# The proof that the shipped fixture learned the world (docs/evaluation.md, "Quality without downloaded weights"): colour alone
# scores about 0.3 (one of the 3-4 shapes seen in each colour), so this much means shape was learned too.
FIXTURE_TOP1 = 0.9


def test_the_fixture_learned_the_world():
    """Zero-shot top-1 on held-out single-object images (new layouts), from the shipped weights."""
    import open_clip

    model = pretrain.load_fixture()
    tokenizer = open_clip.get_tokenizer(pretrain.register())
    images, targets = pretrain.single_object_set(SEEN_OBJECTS, 120, pretrain.EVAL_SEED + 7)
    assert pretrain.zero_shot(model, tokenizer, images, targets, SEEN_OBJECTS) >= FIXTURE_TOP1
    record = json.loads(pretrain.RECORD.read_text())
    assert record["seen_top1"] >= FIXTURE_TOP1 and record["steps"] == sum(r["steps"] for r in record["runs"])


def test_clip_spec_takes_an_open_clip_model_config(tmp_path):
    from ovseg.export.clip import parse_clip_spec
    from ovseg.export.onnx_io import ExportError

    assert parse_clip_spec(f"{pretrain.CONFIG}:local") == (pretrain.MODEL, "local")
    with pytest.raises(ExportError, match="no such open_clip model config"):
        parse_clip_spec(str(tmp_path / "missing.json"))


def test_resume_adds_to_the_record_of_runs(tmp_path, monkeypatch):
    record = tmp_path / "training.json"
    monkeypatch.setattr(pretrain, "RECORD", record)
    record.write_text(json.dumps({"command": "first", "steps": 3000, "wall_seconds": 2000.0}))
    assert pretrain.previous_runs() == [{"command": "first", "steps": 3000, "wall_seconds": 2000.0}]
    runs = [
        {"command": "first", "steps": 3000, "wall_seconds": 2000.0},
        {"command": "again", "steps": 500, "wall_seconds": 300.0},
    ]
    record.write_text(json.dumps({"command": "again", "steps": 3500, "wall_seconds": 2300.0, "runs": runs}))
    assert pretrain.previous_runs() == runs
