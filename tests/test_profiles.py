"""Profiles: ovseg-export --profile picks the CLIP model and both sizes and records the name; the Segmenter, ovseg-run
and ovseg-eval take K, the keyframe policy and the precision from the bundle's profile where they are not given."""

from __future__ import annotations

import pytest

from ovseg.cli import by_profile
from ovseg.constants import NUM_SEGMENTS
from ovseg.errors import OvsegError
from ovseg.export.bundle import ExportConfig
from ovseg.export.cli import build_parser as export_parser
from ovseg.export.cli import main as export_main
from ovseg.profiles import ACCURATE, DEFAULT_PROFILE, FAST, PROFILES, get_profile
from ovseg.runtime import Segmenter, SegmenterConfig, SegmenterError
from ovseg.runtime.bundle.manifest import read_manifest
from ovseg.runtime.tools import run as run_cli

from assertions import one_line


def test_accurate_is_what_ovseg_did_before_profiles():
    assert DEFAULT_PROFILE == "accurate" and get_profile(None) is ACCURATE
    assert (ACCURATE.num_segments, ACCURATE.keyframe_interval, ACCURATE.keyframe_change) == (NUM_SEGMENTS, 1, None)
    assert (ACCURATE.clip, ACCURATE.clip_size, ACCURATE.dinov2_size, ACCURATE.precision) == (
        "ViT-B-16:openai",
        448,
        448,
        "auto",
    )
    for p in PROFILES.values():  # each a valid configuration
        assert SegmenterConfig(profile=p.name).resolve(DEFAULT_PROFILE).num_segments == p.num_segments
        assert p.describe().startswith(f"{p.name}: ")
    assert by_profile("keyframe_change") == ", ".join(
        f"{p.name} {'none' if p.keyframe_change is None else p.keyframe_change}" for p in PROFILES.values()
    )


def test_unknown_profile_is_a_one_line_error():
    with pytest.raises(OvsegError) as err:
        get_profile("fastest")
    one_line(err, "unknown profile 'fastest'", "accurate, balanced, fast")
    with pytest.raises(OvsegError):
        ExportConfig(profile="fastest")


def test_export_config_takes_the_profiles_model_and_sizes_unless_given():
    cfg = ExportConfig(profile="fast")
    assert cfg.clip == FAST.clip
    assert cfg.sizes() == {"clip": (224, "--profile fast"), "dinov2": (224, "--profile fast")}
    cfg = ExportConfig(profile="fast", clip="ViT-B-16:openai", image_size=112, dinov2_size=98)
    assert cfg.clip == "ViT-B-16:openai"
    assert cfg.sizes() == {"clip": (112, "--image-size"), "dinov2": (98, "--dinov2-size")}
    default = ExportConfig()
    assert default.profile == "accurate" and default.clip == ACCURATE.clip
    assert default.sizes() == {"clip": (448, "--profile accurate"), "dinov2": (448, "--profile accurate")}


def test_export_cli_passes_the_profile(monkeypatch, tmp_path):
    import ovseg.export.bundle as bundle_module

    seen = []
    monkeypatch.setattr(bundle_module, "export_bundle", lambda cfg: seen.append(cfg))
    assert export_main(["--out", str(tmp_path / "b"), "--profile", "fast", "--random-weights"]) == 0
    assert seen[0].profile == "fast" and seen[0].clip == FAST.clip and seen[0].sizes()["dinov2"][0] == 224
    assert export_main(["--out", str(tmp_path / "b"), "--random-weights"]) == 0
    assert seen[1].profile == "accurate"
    help_text = export_parser().format_help()
    assert all(p.describe().split(":")[0] in help_text for p in PROFILES.values())


def test_export_cli_size_errors_name_the_profile_model(tmp_path, capsys):
    assert (
        export_main(["--out", str(tmp_path / "b"), "--random-weights", "--profile", "fast", "--clip-size", "100"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err == "ovseg-export: error: --clip-size 100 is not a multiple of CLIP's patch size 32: use 96 or 128"
    with pytest.raises(SystemExit) as exit_:
        export_main(["--out", str(tmp_path / "b"), "--profile", "fastest"])
    assert exit_.value.code == 2


@pytest.fixture(scope="module")
def fast_bundle(tmp_path_factory):
    """The tiny models exported with --profile fast (at the tiny size, so only the runtime defaults are fast's)."""
    from conftest import TINY_SIZE, _export

    return _export(tmp_path_factory.mktemp("fast") / "bundle", image_size=TINY_SIZE, vocab="voc21", profile="fast")


def test_the_manifest_records_the_profile(fast_bundle, tiny_bundle):
    assert read_manifest(fast_bundle).profile == "fast"
    assert read_manifest(tiny_bundle).profile == "accurate"


def test_a_manifest_without_a_profile_runs_as_accurate(bundle_copy):
    out = bundle_copy(lambda m: m.pop("profile", None))
    assert read_manifest(out, verify=False).profile == "accurate"
    with Segmenter.from_bundle(out, backend="cpu") as seg:
        assert seg.config.keyframe_interval == 1 and seg.config.keyframe_change is None


def test_the_segmenter_takes_unset_settings_from_the_bundles_profile(fast_bundle, tiny_bundle):
    with Segmenter.from_bundle(fast_bundle, backend="cpu") as seg:
        c = seg.config
        assert (c.num_segments, c.keyframe_interval, c.keyframe_change) == (15, 30, 0.1)
        assert seg.precision == "fp32"  # auto: no gate recorded
        given = seg.with_config(SegmenterConfig(profile=FAST.name, num_segments=6, keyframe_change=0.3))
        assert (given.config.num_segments, given.config.keyframe_change) == (6, 0.3)
    with Segmenter.from_bundle(fast_bundle, backend="cpu", config=SegmenterConfig(keyframe_interval=1)) as every_frame:
        assert every_frame.config.keyframe_change is None  # an interval of 1 leaves nothing for the change to skip
    with Segmenter.from_bundle(
        tiny_bundle, backend="cpu", config=SegmenterConfig(profile="fast", num_segments=5)
    ) as seg:
        assert (seg.config.num_segments, seg.config.keyframe_interval) == (5, 30)  # another profile's runtime settings


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(profile="fastest"), "unknown profile 'fastest'"),
        (dict(keyframe_change=0.2), "keyframe_change needs keyframe_interval > 1"),  # accurate runs CLIP on every frame
    ],
)
def test_settings_the_profile_cannot_take_are_one_line_errors(tiny_bundle, kwargs, message):
    with pytest.raises(SegmenterError) as err:
        Segmenter.from_bundle(tiny_bundle, backend="cpu", config=SegmenterConfig(**kwargs))
    one_line(err, message)


def test_ovseg_run_and_eval_leave_the_profile_settings_to_the_bundle():
    from ovseg.benchmarks.eval.cli import build_parser as eval_parser

    args = run_cli.build_parser().parse_args(["--sample"])
    assert (args.segments, args.precision, args.keyframe_interval, args.keyframe_change) == (None, None, None, None)
    args = eval_parser().parse_args(["--dataset", "voc21", "--data", "."])
    assert (args.segments, args.precision) == (None, None)
    help_text = " ".join(run_cli.build_parser().format_help().split())
    assert f"(default: the bundle's profile's: {by_profile('keyframe_interval')})" in help_text
