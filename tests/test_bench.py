"""ovseg-bench on the tiny bundle: every section runs, the JSON has its schema, every stage was timed."""

from __future__ import annotations

import json

import pytest

from ovseg.benchmarks import cli
from ovseg.benchmarks.naive import NAIVE_STAGES
from ovseg.benchmarks.report import STAGE_ORDER
from ovseg.benchmarks.timing import Stats
from ovseg.constants import STAGES

STAT_KEYS = set(Stats.__dataclass_fields__)


@pytest.fixture(scope="module")
def bench(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--bundle",
        str(tiny_bundle),
        "--quick",
        "--tiny-models",
        "--seconds",
        "0.5",
        "--min-runs",
        "3",
        "--segments",
        "5,15",
        "--video-frames",
        "3",
        "--keyframe-interval",
        "2",
        "--threads",
        "2",
        "--cache",
        str(out / "cache"),
        "--out",
        str(out / "r.json"),
        "--markdown",
        str(out / "perf.md"),
    ]
    code = cli.main(argv)
    return code, json.loads((out / "r.json").read_text()), out


def _is_stats(d: dict) -> bool:
    return set(d) == STAT_KEYS and d["n"] >= 1 and d["p50"] >= 0 and d["p50"] <= d["p99"] + 1e-9


def test_runs_every_section_without_errors(bench):
    code, doc, _ = bench
    assert doc["errors"] == {} and doc["skipped"] == {}
    assert code == 0
    assert doc["schema"] == "ovseg-bench/1" and doc["command"][:3] == [
        "ovseg-bench",
        "--bundle",
        doc["latency"]["bundle"],
    ]
    for key in ("environment", "plan", "latency", "sweeps", "naive", "video", "targets", "elapsed_s"):
        assert key in doc, key
    env = doc["environment"]
    for key in ("device", "cpu_model", "threads", "ovseg", "onnxruntime", "load_average_start", "load_average_end"):
        assert env[key] not in (None, ""), key
    assert env["threads"] == 2


def test_every_stage_was_timed(bench):
    _, doc, _ = bench
    lat = doc["latency"]
    assert (lat["image_sizes"], lat["backend"], lat["precision"]) == ({"clip": 112, "dinov2": 112}, "cpu", "fp32")
    for stage in (s for s in STAGES if s not in ("refine", "keyframe")):  # only with refine=, keyframe_change=
        assert _is_stats(lat["stages"][stage]), stage
        assert lat["stages"][stage]["n"] >= 3 and lat["stages"][stage]["p50"] > 0, stage
    assert lat["overhead_ratio"]["p50"] > 1.0  # the total includes both encoders
    assert lat["peak_rss_mb"] > 0 and doc["peak_rss_mb_ovseg"] > 0


def test_sweeps(bench):
    _, doc, _ = bench
    sweeps = doc["sweeps"]
    assert [p["k"] for p in sweeps["segments"]] == [5, 15]
    assert all(_is_stats(p["stages"][s]) for p in sweeps["segments"] for s in ("kmeans", "pooling", "lookup", "render"))
    backends = {(p["backend"], p["precision"]): p for p in sweeps["backends"]}
    assert backends[("cpu", "fp32")]["latency"] is not None
    assert backends[("cpu", "fp16")]["latency"] is not None  # the fixture has fp16 variants
    assert "no GPU" in backends[("cuda", "fp32")]["skipped"]


def test_naive_reference_agrees(bench):
    _, doc, _ = bench
    naive = doc["naive"]
    assert min(naive["same_weights_cosine"].values()) > 0.999
    assert naive["agreement"] >= 0.99
    assert naive["speedup"]["n"] >= 2 and naive["speedup"]["p50"] > 0
    assert set(naive["naive"]) == {*NAIVE_STAGES, "total"}
    assert set(STAGE_ORDER) >= set(naive["naive"]) | set(
        naive["ovseg"]
    )  # the report lists every stage either side timed
    for stage in ("dinov2", "kmeans", "assign", "clip", "pooling", "lookup", "render", "total"):
        assert naive["naive"][stage]["p50"] >= 0, stage


def test_video_targets_and_files(bench):
    _, doc, out = bench
    video = doc["video"]
    assert [r["keyframe_interval"] for r in video["runs"]] == [1, 2]
    assert all(r["frames"] == 3 and r["fps"] > 0 and r["peak_rss_mb"] > 0 for r in video["runs"])
    assert 0 <= video["agreement"] <= 1
    assert [t["name"] for t in doc["targets"]] == ["runtime overhead", "vs naive TAG"]
    assert [t["verdict"] for t in doc["targets"]] == ["n/a", "n/a"]  # the tiny bundle is at 112, the targets at 448
    md = (out / "perf.md").read_text()
    assert md.startswith("## Performance") and "### GPU" in md and "--out" not in md


def test_injected_weights_cannot_be_rebuilt(tiny_bundle):
    from ovseg.benchmarks.naive import rebuild
    from ovseg.errors import OvsegError
    from ovseg.runtime.bundle.manifest import read_manifest

    with pytest.raises(OvsegError, match="injected"):
        rebuild(read_manifest(tiny_bundle))


def test_the_cameras_benchmark_times_every_mode(tiny_bundle, capsys):
    from ovseg.benchmarks import cameras

    assert cameras.main(["--bundle", str(tiny_bundle), "--cameras", "2", "--frames", "2", "--rounds", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(rows) == 6 and len({r[0] for r in rows}) == 6
    assert all(float(fps) > 0 for _, fps, _ in rows)
    assert any("process per camera" in r[0] for r in rows) and any("batch" in r[0] for r in rows)
