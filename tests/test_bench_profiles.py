"""ovseg-bench --profiles on the tiny bundles (given with --profile-bundle, so nothing is exported): the record of every
profile, the targets and the docs table. The numbers themselves are the benchmark's business, not the test's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ovseg.benchmarks import profiles
from ovseg.benchmarks.cli import main as bench_main
from ovseg.profiles import PROFILES


@pytest.fixture(scope="module")
def run(tiny_bundle, mixed_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("profiles")
    argv = ["--profiles", "--quick", "--video-frames", "4", "--scenes", "2", "--seeds", "2", "--frame", "96x64"]
    argv += ["--profile-bundle", f"accurate={tiny_bundle}", "--profile-bundle", f"balanced={mixed_bundle}"]
    argv += ["--profile-bundle", f"fast={tiny_bundle}", "--out", str(out / "p.json"), "--markdown", str(out / "p.md")]
    with pytest.MonkeyPatch.context() as m:  # the world's label quality exports DINOv2 at each profile's size: minutes
        m.setattr(profiles, "world_clip_state", lambda: (False, "not measured: left out by the test"))
        code = bench_main(argv)
    return code, json.loads((out / "p.json").read_text()), (out / "p.md").read_text()


def test_every_profile_is_measured_side_by_side(run):
    code, doc, _ = run
    assert code == 0 and doc["errors"] == {}
    assert list(doc["profiles"]) == list(PROFILES)
    for name, entry in doc["profiles"].items():
        play = entry["playback"]
        assert play["profile"] == name and play["frames"] == 4 and play["fps"] > 0
        assert play["latency_ms"]["p99"] >= play["latency_ms"]["p50"] > 0 and play["cpu_ms_per_frame"]["mean"] > 0
        assert play["peak_rss_mb"] > 0 and play["precision"] == "fp32"
        assert play["config"]["keyframe_interval"] == PROFILES[name].keyframe_interval  # the profile's runtime settings
        seg = entry["segments"]
        assert seg["k"] == PROFILES[name].num_segments and seg["synthetic"]["scenes"] == 2
        for image in ("synthetic", "voc", "arc2017"):
            assert len(seg[image]["per_seed"]) == 2 and 0 <= seg[image]["mean"] <= 100 and seg[image]["std"] >= 0
        assert 0.0 <= entry["label_agreement"] <= 1.0
    assert doc["profiles"]["accurate"]["label_agreement"] == 1.0
    accurate, fast = doc["profiles"]["accurate"], doc["profiles"]["fast"]  # one bundle, two runtime settings
    assert accurate["playback"]["keyframes"] == 4 and fast["playback"]["keyframes"] < 4  # the still half skips CLIP


def test_targets_and_the_readme_table(run):
    _, doc, md = run
    names = [t["name"] for t in doc["targets"]]
    assert names == [f"{p} {t}" for p in ("fast", "balanced") for t in ("speed", "segment quality", "label quality")]
    verdicts = {t["name"]: t for t in doc["targets"]}
    assert all(t["verdict"] in ("PASS", "MISS") for n, t in verdicts.items() if "label" not in n)
    assert verdicts["fast label quality"]["verdict"] == "n/a"
    assert verdicts["fast label quality"]["reason"] == "not measured: left out by the test"
    assert md.startswith("| " + " | ".join(profiles.HEADER) + " |")
    assert all(f"| {name} |" in md for name in PROFILES) and "ovseg-bench --profiles" in md
    assert doc["profiles"]["fast"]["labels"] == {"note": "not measured: left out by the test"}
    assert md.count("| not measured |") == 3


def test_the_world_clip_fixture_is_found():
    ready, note = profiles.world_clip_state()
    assert ready and note.startswith("the world's tiny CLIP: zero-shot top-1 ")


def test_the_video_pans_then_holds_still():
    pan = [np.full((8, 8, 3), 10 * i, np.uint8) for i in range(5)]
    video = profiles.profile_video(pan, 9)
    assert len(video) == 9 and all(np.array_equal(a, b) for a, b in zip(video[:5], pan))
    assert all(np.abs(f.astype(int) - pan[4]).max() <= 5 * profiles.STILL_NOISE for f in video[5:])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--profiles", "--profile-bundle", "fastest=/x"], "--profile-bundle takes NAME=DIR with NAME one of"),
        (["--profiles", "--profile-bundle", "fast"], "--profile-bundle takes NAME=DIR"),
        (["--scenes", "5"], "--profile-bundle, --scenes and --seeds belong to --profiles"),
        (["--profiles", "--seeds", "0"], "--seeds must be at least 1"),
    ],
)
def test_bad_profile_options_are_one_line_errors(argv, message, capsys):
    assert bench_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ovseg-bench: error:") and message.split(" must")[0] in err[0]
