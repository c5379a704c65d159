"""Native core vs the numpy/OpenCV way of doing the same per-frame work.

    python -m ovseg.benchmarks.bench_native [--json OUT] [--rounds N]

Each comparison runs baseline and native alternately, so both see the same
machine load, and reports the median time per call. The native side is what
the Segmenter calls: pool_segments_from_scores, upsample_argmax,
spherical_kmeans. The targets are in benchmarks/targets.py (the overlay is
cv2.addWeighted in the Segmenter, not native).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from ovseg import _native as nat
from ovseg.benchmarks.targets import (
    KMEANS_MIN_SPEEDUP,
    LABELS_MIN_SPEEDUP,
    POOLING_MAX_VS_MATMUL,
    POOLING_MIN_MEMORY_RATIO,
    POOLING_MIN_SPEEDUP,
)
from ovseg.cli import positive_int


@dataclass
class Row:
    name: str
    baseline: str
    baseline_value: float
    native_value: float
    unit: str
    ratio: float  # baseline / native from the medians: higher is better for the native side
    target: str
    passed: bool
    note: str = ""
    best_ratio: float | None = None  # from the fastest rounds


@dataclass
class Timing:
    median: float  # seconds per call
    best: float  # the fastest round: closest to an idle machine


def alternate(baseline, native, rounds: int, native_calls: int = 20, baseline_calls: int = 1) -> tuple[Timing, Timing]:
    """Seconds per call of each, timed in alternating rounds."""
    baseline(), native()  # warm-up
    b, n = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(baseline_calls):
            baseline()
        b.append((time.perf_counter() - t) / baseline_calls)
        t = time.perf_counter()
        for _ in range(native_calls):
            native()
        n.append((time.perf_counter() - t) / native_calls)
    return Timing(statistics.median(b), min(b)), Timing(statistics.median(n), min(n))


def traced_peak(fn) -> int:
    """Peak bytes numpy (and OpenCV, through numpy's allocator) hold while fn runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def smooth_scores(k: int, h: int, w: int, seed: int = 0, dim: int = 32) -> np.ndarray:
    """Scores shaped like k-means patch scores: cosine of spatially smooth tokens with k centres."""
    rng = np.random.default_rng(seed)
    f = cv2.GaussianBlur(rng.standard_normal((h, w, dim)).astype(np.float32), (0, 0), 2.0)
    f /= np.linalg.norm(f, axis=2, keepdims=True)
    centres = f.reshape(-1, dim)[rng.choice(h * w, k, replace=k > h * w)]
    return np.ascontiguousarray((f.reshape(-1, dim) @ centres.T).T.reshape(k, h, w))


# ---- baselines ----


def labels_opencv(scores: np.ndarray, h: int, w: int) -> np.ndarray:
    """cv2.resize of the K score maps + argmax over K."""
    return cv2.resize(np.ascontiguousarray(scores.transpose(1, 2, 0)), (w, h), interpolation=cv2.INTER_LINEAR).argmax(
        axis=2
    )


def tag_pooling_literal(scores: np.ndarray, features: np.ndarray, h: int, w: int) -> np.ndarray:
    """TAG: the label map (labels_opencv), the features upsampled to it (bilinear, cv2 in
    chunks of <= 128 channels), the mean inside each mask, L2-normalised."""
    labels, k, d = labels_opencv(scores, h, w), len(scores), features.shape[2]
    up = np.empty((h, w, d), np.float32)
    for c in range(0, d, 128):
        up[..., c : c + 128] = cv2.resize(features[..., c : c + 128], (w, h), interpolation=cv2.INTER_LINEAR)
    emb = np.zeros((k, d), np.float32)
    for j in range(k):
        mask = labels == j
        if mask.any():
            emb[j] = up[mask].mean(axis=0)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def kmeans_numpy(x: np.ndarray, k: int, iters: int, seed: int = 0):
    """Spherical k-means, k-means++ seeding, fixed iterations, BLAS for the heavy parts."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(xn)
    rng = np.random.default_rng(seed)
    picks = [int(rng.integers(n))]
    dist = np.maximum(0.0, 1.0 - xn @ xn[picks[0]])
    for _ in range(1, k):
        cum = np.cumsum(dist)
        picks.append(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")))
        dist = np.minimum(dist, np.maximum(0.0, 1.0 - xn @ xn[picks[-1]]))
    centres = xn[picks]
    onehot = np.zeros((n, k), np.float32)
    rows = np.arange(n)
    for _ in range(iters):
        assign = (xn @ centres.T).argmax(axis=1)
        onehot[:] = 0.0
        onehot[rows, assign] = 1.0
        sums = onehot.T @ xn
        norm = np.linalg.norm(sums, axis=1, keepdims=True)
        centres = np.where(norm > 0, sums / np.where(norm > 0, norm, 1.0), centres)
    scores = xn @ centres.T
    return centres, scores.argmax(axis=1), scores


# ---- benchmarks ----


def speed_row(name: str, baseline: str, b: Timing, n: Timing, minimum: float | None, note: str) -> Row:
    """A speed comparison: ratio = baseline / native, met at ``minimum`` or more (None: informational)."""
    ratio = b.median / n.median
    target, passed = (f">= {minimum:.0f}x", ratio >= minimum) if minimum else ("(info)", True)
    return Row(name, baseline, b.median * 1e3, n.median * 1e3, "ms", ratio, target, passed, note, b.best / n.best)


def bench_pooling(rounds: int) -> list[Row]:
    k, d, size = 15, 512, 448
    scores = smooth_scores(k, 32, 32, seed=1)
    features = np.random.default_rng(1).standard_normal((28, 28, d)).astype(np.float32)
    n = 28 * 28

    def native():
        return nat.pool_segments_from_scores(scores, features, size, size)

    def literal():
        return tag_pooling_literal(scores, features, size, size)

    emb, lit = native()[0], literal()
    worst_cos = float(min((emb[j] * lit[j]).sum() for j in range(k) if lit[j].any()))
    lit_t, nat_t = alternate(literal, native, rounds, native_calls=50)
    mem_lit = traced_peak(literal)
    nat.peak_allocated_bytes(reset=True)
    native()
    mem_nat = nat.peak_allocated_bytes()

    a, f2 = np.random.default_rng(2).random((k, n)).astype(np.float32), features.reshape(n, d)
    mm_t, nat2_t = alternate(
        lambda: (nat.upsample_argmax(scores, size, size), a @ f2),
        native,
        rounds * 4,
        native_calls=50,
        baseline_calls=50,
    )
    shape = "15 maps 32x32 -> 448x448 labels, 28x28x512 features"
    return [
        speed_row(
            "pooling time",
            "literal TAG (cv2 upsample + argmax + masked means)",
            lit_t,
            nat_t,
            POOLING_MIN_SPEEDUP,
            f"{shape}; worst cosine vs literal {worst_cos:.7f}",
        ),
        Row(
            "pooling peak memory",
            "literal TAG (tracemalloc peak)",
            mem_lit / 2**20,
            mem_nat / 2**20,
            "MiB",
            mem_lit / mem_nat,
            f">= {POOLING_MIN_MEMORY_RATIO:.0f}x",
            mem_lit / mem_nat >= POOLING_MIN_MEMORY_RATIO,
            f"native: measured peak of its own allocations (labels {size * size * 4} B, accumulator K*N*4 = "
            f"{k * n * 4} B, outputs, tables)",
        ),
        Row(
            "pooling vs one matmul",
            "upsample_argmax + numpy (K x N)(N x D) float32",
            mm_t.median * 1e3,
            nat2_t.median * 1e3,
            "ms",
            mm_t.median / nat2_t.median,
            f"native <= {POOLING_MAX_VS_MATMUL:g}x matmul",
            nat2_t.median <= POOLING_MAX_VS_MATMUL * mm_t.median,
            "both sides make the label map (upsample_argmax); the matmul alone, dense A; the native call "
            "adds the pass over the labels and the normalisation",
            mm_t.best / nat2_t.best,
        ),
    ]


def bench_labels(rounds: int) -> list[Row]:
    rng = np.random.default_rng(3)
    rows = []
    cases = [
        ("smooth", smooth_scores(15, 32, 32, seed=3), LABELS_MIN_SPEEDUP),
        ("iid noise", rng.standard_normal((15, 32, 32)).astype(np.float32), None),
    ]
    for kind, scores, minimum in cases:
        agree = float((nat.upsample_argmax(scores, 720, 1280) == labels_opencv(scores, 720, 1280)).mean())
        cv_t, nat_t = alternate(
            lambda s=scores: labels_opencv(s, 720, 1280),
            lambda s=scores: nat.upsample_argmax(s, 720, 1280),
            rounds * 2,
            native_calls=5,
        )
        note = f"1280x720 labels from 15 maps at 32x32 ({kind} scores); agree on {agree:.6f} of pixels"
        if minimum is None:
            note += "; informational: every 2x2 source cell is mixed, so no shortcut applies"
        rows.append(speed_row(f"label map ({kind})", "cv2.resize + argmax", cv_t, nat_t, minimum, note))
    return rows


def bench_kmeans(rounds: int) -> list[Row]:
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((15, 384))
    x = (centres[rng.integers(0, 15, 1024)] + 2.0 * rng.standard_normal((1024, 384))).astype(np.float32)
    np_t, nat_t = alternate(
        lambda: kmeans_numpy(x, 15, 10),
        lambda: nat.spherical_kmeans(x, 15, max_iter=10, tol=0.0),
        rounds * 2,
        native_calls=5,
        baseline_calls=2,
    )
    baseline = "vectorised numpy (BLAS), k-means++ + 10 iterations"
    note = "N=1024, D=384, K=15, 10 iterations (tol=0)"
    return [speed_row("k-means", baseline, np_t, nat_t, KMEANS_MIN_SPEEDUP, note)]


def print_table(rows: list[Row]) -> None:
    print("times are medians per call; 'best' is the ratio of the fastest rounds")
    print(f"{'benchmark':<24} {'baseline':>11} {'native':>10} {'ratio':>8} {'best':>8}  {'target':<36} result")
    for r in rows:
        verdict = "-" if r.target == "(info)" else "PASS" if r.passed else "MISS"
        best = f"{r.best_ratio:>7.1f}x" if r.best_ratio is not None else f"{'':>8}"
        print(
            f"{r.name:<24} {r.baseline_value:>8.3f}{r.unit:>3} {r.native_value:>7.3f}{r.unit:>3} "
            f"{r.ratio:>7.1f}x {best}  {r.target:<36} {verdict}"
        )
        print(f"{'':<24} baseline: {r.baseline}; {r.note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--rounds", type=positive_int, default=7, help="alternating rounds per comparison (default 7)")
    args = parser.parse_args(argv)
    env = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "native_threads": nat.get_num_threads(),
        "load_average_before": round(os.getloadavg()[0], 2),
    }
    print("ovseg native core benchmark  " + "  ".join(f"{k}={v}" for k, v in env.items()))
    rows = bench_pooling(args.rounds) + bench_labels(args.rounds) + bench_kmeans(args.rounds)
    env["load_average_after"] = round(os.getloadavg()[0], 2)
    print_table(rows)
    if max(env["load_average_before"], env["load_average_after"]) > (os.cpu_count() or 1):
        print(
            f"warning: the machine was busy (load average {env['load_average_before']} -> "
            f"{env['load_average_after']} on {os.cpu_count()} CPUs): absolute times are inflated, "
            "and multi-threaded code (BLAS, the native pool) suffers most"
        )
    misses = [r.name for r in rows if not r.passed]
    print("all targets met" if not misses else "missed: " + ", ".join(misses))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "results": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
