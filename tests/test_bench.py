"""ovseg-bench on the tiny bundle: every section runs, the JSON has its schema, every stage was timed."""

from __future__ import annotations

import json

import numpy as np
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
        "--sizes",
        f"{112},518",
        "--segments",
        "5,15",
        "--vocab-sizes",
        "500,2000",
        "--efs",
        "16,64",
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
        "--csv",
        str(out / "r.csv"),
        "--plot",
        str(out / "plots"),
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
    for key in ("environment", "plan", "latency", "roofline", "sweeps", "naive", "video", "targets", "elapsed_s"):
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
    sizes = {p["size"]: p for p in sweeps["input_size"]}
    assert sizes[112]["latency"]["stages"]["total"]["p50"] > 0
    assert sizes[518]["latency"] is None and "not a multiple of CLIP's patch size 16" in sizes[518]["skipped"]
    assert [p["k"] for p in sweeps["segments"]] == [5, 15]
    assert all(_is_stats(p["stages"][s]) for p in sweeps["segments"] for s in ("kmeans", "pooling", "lookup", "render"))
    backends = {(p["backend"], p["precision"]): p for p in sweeps["backends"]}
    assert backends[("cpu", "fp32")]["latency"] is not None
    assert backends[("cpu", "fp16")]["latency"] is not None  # the fixture has fp16 variants
    assert "no GPU" in backends[("cuda", "fp32")]["skipped"]
    vocab = sweeps["vocabulary"]
    assert [p["size"] for p in vocab["points"]] == [500, 2000]
    for p in vocab["points"]:
        assert _is_stats(p["exact"]) and set(p["hnsw"]) == {"16", "64"}
        assert all(0 <= r <= 1 for r in p["recall"].values())
    assert vocab["crossover_note"]


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


def test_roofline_video_targets_and_files(bench):
    _, doc, out = bench
    roof = doc["roofline"]
    assert roof["gemm_gflops"] > 0 and 0 < roof["fraction_of_peak"]["p50"]
    assert all(e["gflop"] > 0 and e["unresolved"] == [] for e in roof["encoders"].values())
    assert all(e["profile"]["run_ms"] > 0 and "MatMul" in e["profile"]["by_op_ms"] for e in roof["encoders"].values())
    video = doc["video"]
    assert [r["keyframe_interval"] for r in video["runs"]] == [1, 2]
    assert all(r["frames"] == 3 and r["fps"] > 0 and r["peak_rss_mb"] > 0 for r in video["runs"])
    assert 0 <= video["agreement"] <= 1
    assert [t["name"] for t in doc["targets"]] == [
        "runtime overhead",
        "vs naive TAG",
        "encoders vs GEMM peak",
        "HNSW at 1M",
    ]
    assert all(t["verdict"] in ("PASS", "MISS", "n/a") for t in doc["targets"])
    assert doc["targets"][3]["verdict"] == "n/a"  # no 1M vocabulary in this run
    rows = (out / "r.csv").read_text().splitlines()
    assert rows[0] == "section,key,value" and any(r.startswith("latency,stages.total.p50,") for r in rows)
    md = (out / "perf.md").read_text()
    assert md.startswith("## Performance") and "### GPU" in md and "--out" not in md
    for name in ("stage_breakdown", "latency_vs_size", "latency_vs_k", "lookup_vs_vocabulary", "hnsw_recall_vs_ef"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_flops_of_the_tiny_dinov2_match_a_hand_count(tiny_bundle):
    from ovseg.benchmarks.roofline import count_flops

    t, d, mlp, layers, patch = 8 * 8 + 1, 32, 128, 2, 14  # 112 / 14 = 8: 64 patches + the class token
    conv = 2 * 64 * d * 3 * patch * patch
    per_layer = 2 * t * d * d * 4 + 2 * 2 * t * t * d + 2 * 2 * t * d * mlp  # q, k, v, out; QK^T and AV; MLP
    count = count_flops(tiny_bundle / "dinov2.onnx", 112)
    assert count.unresolved == []
    assert count.gflop * 1e9 == pytest.approx(conv + layers * per_layer)


def test_crossover_is_interpolated_in_log_size():
    from ovseg.benchmarks.sweeps import VocabPoint, _crossover

    def point(size, exact, hnsw):
        def s(ms):
            return Stats(1, ms, 0, ms, ms, ms, ms, 1000 / ms)

        return VocabPoint(size, {}, None, s(exact), {64: s(hnsw)}, {})

    at, note = _crossover([point(1000, 0.1, 0.2), point(10000, 0.4, 0.2)], 64)
    assert 1000 < at < 10000 and "overtakes" in note
    assert at == pytest.approx(10**3.5)  # the log ratio goes from -log 2 to +log 2: zero halfway in log size
    assert _crossover([point(1000, 0.3, 0.2)], 64)[0] is None


def test_injected_weights_cannot_be_rebuilt(tiny_bundle):
    from ovseg.benchmarks.naive import NaiveError, rebuild
    from ovseg.runtime.bundle.manifest import read_manifest

    with pytest.raises(NaiveError, match="injected"):
        rebuild(read_manifest(tiny_bundle))


def test_vocabulary_phrases_are_distinct_nested_and_kept_isometric():
    from ovseg.benchmarks.phrases import phrases, to_clip_width
    from ovseg.runtime.pipeline.vocabulary import DEFAULT_CONCEPTS, load_vocabulary

    concepts = len(load_vocabulary(DEFAULT_CONCEPTS))
    big = phrases(concepts + 5000)
    assert len(set(big)) == len(big) and phrases(300) == big[:300]  # every size is a prefix of the larger ones
    assert all(" " in p for p in big[concepts:]) and set(big[:concepts]) == set(load_vocabulary(DEFAULT_CONCEPTS))
    x = np.random.default_rng(0).standard_normal((50, 384)).astype(np.float32)
    y = to_clip_width(x, 512)
    assert y.shape == (50, 512)
    np.testing.assert_allclose(y @ y.T, x @ x.T, rtol=1e-4, atol=1e-3)  # cosines and norms unchanged


def test_default_sizes_can_all_run():
    """One S x S input feeds both encoders: every default size is a multiple of DINOv2's 14 and CLIP's 16."""
    assert all(size % 14 == 0 and size % 16 == 0 for size in cli.DEFAULT_SIZES)
