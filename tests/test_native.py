"""ovseg._native against the plain numpy references in native_reference.py."""

from __future__ import annotations

import ast
import multiprocessing
import re
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ovseg import _native as nat
from ovseg.benchmarks.bench_native import smooth_scores

import native_reference as ref

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def restore_threads():
    before = nat.get_num_threads()
    yield
    nat.set_num_threads(before)


def block_labels(shape: tuple[int, int], k: int, cells: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, k, (cells, cells)).astype(np.uint8)
    return cv2.resize(small, shape[::-1], interpolation=cv2.INTER_NEAREST).astype(np.int32)


def pool_labels(labels: np.ndarray, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """pool_segments_from_scores for a given label map (values in [0, k)): its one-hot maps,
    upsampled to their own size, arg-max to exactly those labels."""
    emb, areas, got = nat.pool_segments_from_scores(ref.one_hot(labels, k), features, *labels.shape)
    np.testing.assert_array_equal(got, labels)
    return emb, areas


def assert_pooling_matches(labels, features, k, emb, areas):
    want, want_areas = ref.pool_segments(labels, features, k)
    np.testing.assert_array_equal(areas, want_areas)
    for j in range(k):
        if want_areas[j] == 0 or not want[j].any():
            assert not emb[j].any(), f"segment {j}: expected a zero row"
        else:
            cos = float(emb[j].astype(np.float64) @ want[j])
            assert cos >= 0.99999, f"segment {j}: cosine {cos}"
            assert abs(np.linalg.norm(emb[j]) - 1.0) < 1e-5


# ---- the bilinear convention itself ----


@pytest.mark.parametrize("out", [(20, 33), (64, 100), (7, 9), (3, 4)])
def test_reference_bilinear_is_cv2_and_torch(out):
    torch = pytest.importorskip("torch")
    a = np.random.default_rng(0).standard_normal((7, 9, 5)).astype(np.float32)
    got = ref.upsample_bilinear(a, *out)
    np.testing.assert_allclose(got, cv2.resize(a, out[::-1], interpolation=cv2.INTER_LINEAR), atol=1e-5)
    t = torch.nn.functional.interpolate(
        torch.from_numpy(a).permute(2, 0, 1)[None], size=out, mode="bilinear", align_corners=False
    )
    np.testing.assert_allclose(got, t[0].permute(1, 2, 0).numpy(), atol=1e-5)


# ---- upsample_argmax ----


@SETTINGS
@given(
    k=st.integers(1, 64),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    out_h=st.integers(1, 64),
    out_w=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
)
def test_upsample_argmax_matches_reference(k, h, w, out_h, out_w, seed):
    scores = np.random.default_rng(seed).standard_normal((k, h, w)).astype(np.float32)
    labels = nat.upsample_argmax(scores, out_h, out_w)
    assert labels.dtype == np.int32 and labels.shape == (out_h, out_w)
    assert ((labels >= 0) & (labels < k)).all()
    up = ref.upsample_bilinear(scores.transpose(1, 2, 0), out_h, out_w)
    assert ref.near_tie_mismatches(labels, up) == 0


@pytest.mark.parametrize("kind", ["smooth", "noise"])
def test_upsample_argmax_at_frame_size_matches_opencv(kind):
    rng = np.random.default_rng(1)
    scores = smooth_scores(15, 32, 32) if kind == "smooth" else rng.standard_normal((15, 32, 32)).astype(np.float32)
    labels = nat.upsample_argmax(scores, 720, 1280)
    want_labels, up = ref.upsample_argmax(scores, 720, 1280)
    assert ref.near_tie_mismatches(labels, up) == 0
    assert (labels != want_labels).mean() < 1e-4


def test_exact_ties_take_the_lowest_index():
    base = np.random.default_rng(2).standard_normal((1, 6, 7)).astype(np.float32)
    scores = np.concatenate([base - 1, base, base, base - 2])  # channels 1 and 2 tie everywhere
    assert (nat.upsample_argmax(scores, 30, 40) == 1).all()
    assert (nat.upsample_argmax(np.zeros((5, 3, 3), np.float32), 9, 9) == 0).all()
    assert (nat.upsample_argmax(np.ones((1, 4, 4), np.float32), 17, 3) == 0).all()


def test_default_palette_is_the_voc_colour_map_in_bgr():
    np.testing.assert_array_equal(nat.default_palette(300), ref.voc_palette_bgr(300))


# ---- pooling ----


@SETTINGS
@given(
    h=st.integers(1, 96),
    w=st.integers(1, 96),
    hf=st.integers(1, 12),
    wf=st.integers(1, 12),
    d=st.integers(1, 16),
    k=st.integers(1, 64),
    blocky=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_pool_segments_matches_literal_tag(h, w, hf, wf, d, k, blocky, seed):
    rng = np.random.default_rng(seed)
    if blocky:
        labels = block_labels((h, w), k, 1 + seed % 9, seed)
    else:
        labels = rng.integers(0, k, (h, w)).astype(np.int32)
    features = rng.standard_normal((hf, wf, d)).astype(np.float32)
    emb, areas = pool_labels(labels, features, k)
    assert emb.shape == (k, d) and emb.dtype == np.float32 and areas.dtype == np.float32
    assert_pooling_matches(labels, features, k, emb, areas)


@pytest.mark.parametrize("grid", [28, 32])  # ViT /16 and /14 at 448
def test_pool_segments_from_scores_at_448_is_argmax_then_pool(grid):
    scores = smooth_scores(15, 32, 32, seed=grid)
    features = np.random.default_rng(grid).standard_normal((grid, grid, 24)).astype(np.float32)
    emb, areas, labels = nat.pool_segments_from_scores(scores, features, 448, 448)
    np.testing.assert_array_equal(labels, nat.upsample_argmax(scores, 448, 448))
    assert_pooling_matches(labels, features, 15, emb, areas)
    same_labels = pool_labels(labels, features, 15)  # the pooling sees nothing but the label map
    np.testing.assert_array_equal(emb, same_labels[0])
    np.testing.assert_array_equal(areas, same_labels[1])


@pytest.mark.parametrize(
    "scores_grid,features_grid,out",
    [
        ((8, 8), (7, 7), (40, 56)),  # the tiny bundles' grids, pooled at a non-square size
        ((7, 7), (8, 8), (57, 31)),  # features finer than the scores
        ((16, 16), (28, 28), (448, 448)),  # DINOv2 at 224 + CLIP /16 at 448, pooled at CLIP's input size
        ((32, 32), (7, 7), (224, 224)),  # DINOv2 at 448 + CLIP /32 at 224
        ((6, 9), (5, 3), (23, 47)),  # neither grid square
    ],
)
def test_pool_segments_from_scores_on_mixed_grids(scores_grid, features_grid, out):
    """Each encoder at its own input size: scores on DINOv2's grid and features on CLIP's are each upsampled to
    the pooling size on their own; the result is TAG's literal computation on that label map."""
    k = 9
    scores = smooth_scores(k, *scores_grid, seed=sum(scores_grid))
    features = np.random.default_rng(sum(features_grid)).standard_normal((*features_grid, 12)).astype(np.float32)
    emb, areas, labels = nat.pool_segments_from_scores(scores, features, *out)
    assert labels.shape == out and emb.shape == (k, 12)
    np.testing.assert_array_equal(labels, nat.upsample_argmax(scores, *out))
    up = ref.upsample_bilinear(scores.transpose(1, 2, 0), *out)
    assert ref.near_tie_mismatches(labels, up) == 0
    assert (labels != ref.upsample_argmax(scores, *out)[0]).mean() < 1e-3
    assert_pooling_matches(labels, features, k, emb, areas)
    assert areas.sum() == out[0] * out[1]


def test_pool_single_segment_and_empty_segments():
    features = np.random.default_rng(6).standard_normal((5, 7, 8)).astype(np.float32)
    emb, areas = pool_labels(np.zeros((40, 56), np.int32), features, 3)
    mean = ref.upsample_bilinear(features, 40, 56).reshape(-1, 8).mean(0)
    np.testing.assert_allclose(emb[0], mean / np.linalg.norm(mean), atol=1e-6)
    assert areas.tolist() == [40 * 56, 0, 0] and not emb[1:].any()


def test_pool_more_segments_than_patches():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 64, (37, 29)).astype(np.int32)
    features = rng.standard_normal((2, 2, 6)).astype(np.float32)
    emb, areas = pool_labels(labels, features, 64)
    assert_pooling_matches(labels, features, 64, emb, areas)


def test_pool_zero_features_give_zero_rows():
    emb, areas = pool_labels(np.zeros((8, 8), np.int32), np.zeros((2, 2, 4), np.float32), 2)
    assert not emb.any() and np.isfinite(emb).all() and areas.tolist() == [64, 0]


def test_pool_does_not_materialise_the_upsampled_features():
    scores = smooth_scores(15, 32, 32)
    features = np.random.default_rng(8).standard_normal((28, 28, 512)).astype(np.float32)
    nat.set_num_threads(2)  # the label pass's scratch grows with the threads
    nat.peak_allocated_bytes(reset=True)
    nat.pool_segments_from_scores(scores, features, 448, 448)
    peak = nat.peak_allocated_bytes()
    labels_accumulator_and_outputs = 448 * 448 * 4 + 15 * 28 * 28 * 4 + 15 * 512 * 4 + 15 * 4
    # Per-thread scratch adds 35-92 KB, depending on whether the two threads' scratch is alive at the same moment
    # (it varies from run to run); U(F) would be 448*448*512*4 = 411 MB.
    assert peak < labels_accumulator_and_outputs + 256 * 1024, peak


# ---- spherical k-means ----


def clustered(n: int, d: int, k: int, seed: int, spread: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d))
    return (centres[rng.integers(0, k, n)] + spread * rng.standard_normal((n, d))).astype(np.float32)


@pytest.mark.parametrize("tol", [0.0, 1e-4])
def test_kmeans_equals_reference_from_the_same_init(tol):
    x = clustered(500, 48, 8, seed=10)
    init = x[np.random.default_rng(10).choice(500, 8, replace=False)] * 3.0
    centres, assign, scores = nat.spherical_kmeans(x, 8, max_iter=10, init=init, tol=tol)
    want_c, want_a, want_s = ref.spherical_kmeans(x, init, max_iter=10, tol=tol)
    np.testing.assert_array_equal(assign, want_a)
    np.testing.assert_allclose(centres, want_c, atol=2e-6)
    np.testing.assert_allclose(scores, want_s, atol=2e-6)


def test_kmeans_reseeds_empty_clusters_like_the_reference():
    x = clustered(300, 16, 3, seed=11)
    init = np.concatenate([x[:3], -x[:300].mean(0, keepdims=True), -x[:1]])  # far centres start empty
    centres, assign, _ = nat.spherical_kmeans(x, 5, max_iter=5, init=init, tol=0.0)
    want_c, want_a, _ = ref.spherical_kmeans(x, init, max_iter=5, tol=0.0)
    np.testing.assert_array_equal(assign, want_a)
    np.testing.assert_allclose(centres, want_c, atol=2e-6)


def test_kmeans_is_deterministic_for_a_seed_and_thread_count_free():
    x = clustered(1024, 64, 15, seed=12, spread=1.0)
    before = x.copy()
    runs = []
    for threads in (1, 2, 1):
        nat.set_num_threads(threads)
        runs.append(nat.spherical_kmeans(x, 15, seed=5))
    for c, a, s in runs[1:]:
        np.testing.assert_array_equal(c, runs[0][0])
        np.testing.assert_array_equal(a, runs[0][1])
        np.testing.assert_array_equal(s, runs[0][2])
    np.testing.assert_array_equal(x, before)
    other = nat.spherical_kmeans(x, 15, seed=6, max_iter=0)[0]
    assert not np.array_equal(other, nat.spherical_kmeans(x, 15, seed=5, max_iter=0)[0])


def test_kmeans_seeding_picks_distinct_points():
    x = clustered(200, 12, 6, seed=13)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    centres, assign, scores = nat.spherical_kmeans(x, 6, max_iter=0, seed=3)
    picked = [int(np.argmin(np.abs(xn - c).max(axis=1))) for c in centres]
    np.testing.assert_allclose(centres, xn[picked], atol=1e-6)
    assert len(set(picked)) == 6


@SETTINGS
@given(
    n=st.integers(1, 200),
    d=st.integers(1, 40),
    k=st.integers(1, 20),
    max_iter=st.integers(0, 12),
    seed=st.integers(0, 2**64 - 1),
)
def test_kmeans_properties(n, d, k, max_iter, seed):
    rng = np.random.default_rng(seed % 2**32)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[np.abs(x).sum(1) == 0, 0] = 1.0
    centres, assign, scores = nat.spherical_kmeans(x, k, max_iter=max_iter, seed=seed)
    assert centres.shape == (k, d) and assign.shape == (n,) and scores.shape == (n, k)
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 1.0, atol=1e-5)
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(scores, xn @ centres.T.astype(np.float64), atol=1e-5)
    np.testing.assert_array_equal(assign, scores.argmax(axis=1))


def test_kmeans_more_centres_than_points_and_zero_rows():
    x = np.random.default_rng(14).standard_normal((5, 8)).astype(np.float32)
    x[2] = 0.0
    centres, assign, scores = nat.spherical_kmeans(x, 9, seed=1)
    assert np.isfinite(centres).all() and np.isfinite(scores).all()
    assert ((assign >= 0) & (assign < 9)).all()


# ---- threads, concurrency, fork ----


def test_results_do_not_depend_on_the_thread_count():
    scores = smooth_scores(15, 32, 32, seed=15)
    features = np.random.default_rng(15).standard_normal((28, 28, 64)).astype(np.float32)
    outs = []
    for threads in (1, 2, 3):
        nat.set_num_threads(threads)
        assert nat.get_num_threads() == threads
        outs.append(
            (*nat.pool_segments_from_scores(scores, features, 448, 448), nat.upsample_argmax(scores, 720, 1280))
        )
    for out in outs[1:]:
        for a, b in zip(out, outs[0]):
            np.testing.assert_array_equal(a, b)


def test_concurrent_calls_from_python_threads():
    scores = smooth_scores(15, 32, 32, seed=16)
    features = np.random.default_rng(16).standard_normal((28, 28, 32)).astype(np.float32)
    want = nat.pool_segments_from_scores(scores, features, 448, 448)
    errors = []

    def work():
        try:
            for _ in range(10):
                got = nat.pool_segments_from_scores(scores, features, 448, 448)
                for a, b in zip(got, want):
                    np.testing.assert_array_equal(a, b)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _render_in_child(_):
    return int(nat.upsample_argmax(smooth_scores(4, 8, 8), 64, 64).sum())


def test_kernels_work_in_a_forked_child():
    nat.set_num_threads(2)
    want = _render_in_child(None)  # the pool has workers now
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_render_in_child, (None,)).get(timeout=60) == want


# ---- bad arguments ----

F = np.zeros((2, 3, 3), np.float32)
FEAT = np.zeros((2, 2, 4), np.float32)
X = np.ones((10, 4), np.float32)
NAN = np.full((2, 3, 3), np.nan, np.float32)
BAD = [
    (lambda: nat.upsample_argmax(F.astype(np.float64), 4, 4), TypeError, "scores must have dtype float32, got float64"),
    (lambda: nat.upsample_argmax(F[0], 4, 4), ValueError, r"scores must be 3-D \[K, h, w\], got shape \(3, 3\)"),
    (lambda: nat.upsample_argmax(np.zeros((2, 3, 6), np.float32)[:, :, ::2], 4, 4), ValueError, "C-contiguous"),
    (lambda: nat.upsample_argmax(np.zeros((0, 3, 3), np.float32), 4, 4), ValueError, "must not be empty"),
    (lambda: nat.upsample_argmax(F.tolist(), 4, 4), TypeError, "scores must be a numpy array"),
    (lambda: nat.upsample_argmax(F, 0, 4), ValueError, "out_h must be >= 1, got 0"),
    (lambda: nat.upsample_argmax(F, 4, 2.5), TypeError, "out_w must be an int, got float"),
    (lambda: nat.upsample_argmax(NAN, 4, 4), ValueError, "scores contains NaN or Inf"),
    (
        lambda: nat.pool_segments_from_scores(F, FEAT.astype(np.float64), 4, 4),
        TypeError,
        "features must have dtype float32, got float64",
    ),
    (lambda: nat.pool_segments_from_scores(F, FEAT[0], 4, 4), ValueError, r"features must be 3-D \[hf, wf, D\]"),
    (
        lambda: nat.pool_segments_from_scores(F, FEAT.transpose(1, 0, 2), 4, 4),
        ValueError,
        "features must be C-contiguous",
    ),
    (lambda: nat.pool_segments_from_scores(F, FEAT, 0, 4), ValueError, "out_h must be >= 1"),
    (
        lambda: nat.pool_segments_from_scores(F, np.full((2, 2, 4), np.inf, np.float32), 4, 4),
        ValueError,
        "features contains NaN or Inf",
    ),
    (lambda: nat.pool_segments_from_scores(NAN, FEAT, 4, 4), ValueError, "scores contains NaN or Inf"),
    (lambda: nat.spherical_kmeans(X, 0), ValueError, "k must be >= 1, got 0"),
    (lambda: nat.spherical_kmeans(X[0], 2), ValueError, r"x must be 2-D \[N, D\]"),
    (
        lambda: nat.spherical_kmeans(X, 2, init=np.ones((3, 4), np.float32)),
        ValueError,
        r"init must have shape \(k, D\) = \(2, 4\), got \(3, 4\)",
    ),
    (lambda: nat.spherical_kmeans(X, 2, init=np.zeros((2, 4), np.float32)), ValueError, "init row 0 is all zeros"),
    (lambda: nat.spherical_kmeans(X, 2, tol=-1.0), ValueError, "tol must be >= 0"),
    (lambda: nat.spherical_kmeans(X, 2, max_iter=-1), ValueError, "max_iter must be >= 0"),
    (lambda: nat.spherical_kmeans(X, 2, seed=-1), ValueError, "seed must be >= 0, got -1"),
    (lambda: nat.spherical_kmeans(X, 2, seed=2**64), ValueError, r"seed must be < 2\*\*64"),
    (lambda: nat.spherical_kmeans(X * np.nan, 2), ValueError, "x contains NaN or Inf"),
    (lambda: nat.set_num_threads(0), ValueError, "n must be >= 1, got 0"),
    (lambda: nat.default_palette(0), ValueError, "k must be >= 1"),
]


@pytest.mark.parametrize("call,error,message", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_arguments_raise_one_line_errors(call, error, message):
    with pytest.raises(error, match=message) as info:
        call()
    assert "\n" not in str(info.value)


# ---- the stub ----

STUB = Path(__file__).resolve().parents[1] / "runtime" / "native" / "_native.pyi"


def parameters(fn: ast.FunctionDef) -> list[tuple]:
    """(name,) or (name, default) per parameter."""
    a = fn.args
    plain = len(a.args) - len(a.defaults)
    return [(p.arg, *([] if i < plain else [ast.literal_eval(a.defaults[i - plain])])) for i, p in enumerate(a.args)]


def test_stub_matches_the_module():
    body = ast.parse(STUB.read_text()).body
    stub = {f.name: parameters(f) for f in body if isinstance(f, ast.FunctionDef)}
    aliases = {t.id for a in body if isinstance(a, ast.Assign) for t in a.targets}
    assert all(n.startswith("_") for n in aliases), "stub-only names must be private"
    assert set(stub) == {n for n in dir(nat) if not n.startswith("_")}
    for name, params in stub.items():
        ((text, _, defaults),) = getattr(nat, name).__nb_signature__  # the text holds the defaults as \0, \1, ...
        text = re.sub(r"\\(\d+)", lambda m, d=defaults: repr(d[int(m[1])]), text)
        assert parameters(ast.parse(text + ": ...").body[0]) == params, name
