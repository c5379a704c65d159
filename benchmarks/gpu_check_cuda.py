"""The Python side of benchmarks/gpu_check.sh: the CUDA entry points of ovseg._native (every `*_cuda` function).

    python -m ovseg.benchmarks.gpu_check_cuda device                     # "ok", or why CUDA cannot be used (exit 1)
    python -m ovseg.benchmarks.gpu_check_cuda call                       # each *_cuda entry point, small inputs
    python -m ovseg.benchmarks.gpu_check_cuda time [--json OUT] [--rounds N]   # CUDA vs the CPU path, with ratios
    python -m ovseg.benchmarks.gpu_check_cuda bundle DIR                 # the tests' tiny bundle (torch, open_clip)

`call` is what compute-sanitizer runs (memcheck, racecheck): every entry point at least once, on inputs small enough
for the sanitizer, and it fails when the module has a `*_cuda` function it does not know, so a new kernel is not left
out silently. `time` compares what the runtime's CPU path does with the same work on the GPU, host arrays in and out
(the transfers count), in alternating rounds (bench_native's `alternate`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ovseg import _native as nat


def device_reason() -> str:
    """'' when the CUDA kernels can run here, else the module's reason (no GPU, no driver, built without CUDA)."""
    if nat.cuda_available():
        return ""
    try:
        nat.render_cuda(np.zeros((1, 1, 1), np.float32), 1, 1)
    except RuntimeError as e:
        return str(e)
    return "cuda_available() is False, yet render_cuda ran"


# ---- call: each entry point once (for compute-sanitizer) ----


def call_pool_segments_cuda(rng: np.random.Generator) -> int:
    calls = 0
    for h, w, grid, k, d in [(48, 64, 6, 5, 16), (64, 64, 8, 64, 64)]:
        labels = rng.integers(-1, k + 1, (h, w)).astype(np.int32)  # -1 and k: ignored labels
        features = rng.standard_normal((grid, grid, d)).astype(np.float32)
        emb, areas = nat.pool_segments_cuda(labels, features, k)
        assert emb.shape == (k, d) and areas.shape == (k,), (emb.shape, areas.shape)
        assert np.isfinite(emb).all() and np.isfinite(areas).all()
        calls += 1
    return calls


def call_render_cuda(rng: np.random.Generator) -> int:
    calls = 0
    h, w = 48, 64
    frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    for dtype, limit in [("int32", None), ("uint16", 65536), ("uint8", 256)]:
        for k in (1, 15, 300, 1500):  # 1500: no blend table
            if limit is not None and k > limit:
                continue
            scores = rng.standard_normal((k, 8, 8)).astype(np.float32)
            palette = rng.integers(0, 256, (k, 3), dtype=np.uint8)
            labels, overlay = nat.render_cuda(scores, h, w, frame, palette, 0.4, dtype)
            assert labels.shape == (h, w) and overlay is not None and overlay.shape == (h, w, 3)
            labels_only, none = nat.render_cuda(scores, h, w, label_dtype=dtype)
            assert none is None and np.array_equal(labels_only, labels)
            calls += 2
    return calls


CALLS = {"pool_segments_cuda": call_pool_segments_cuda, "render_cuda": call_render_cuda}


def call_all() -> int:
    names = sorted(n for n in dir(nat) if n.endswith("_cuda"))
    unknown = [n for n in names if n not in CALLS]
    if unknown:
        print(f"gpu_check_cuda: entry points not exercised here (add them to CALLS): {', '.join(unknown)}")
        return 2
    reason = device_reason()
    if reason:
        print(f"gpu_check_cuda: no CUDA device: {reason}")
        return 1
    rng = np.random.default_rng(0)
    for name in names:
        print(f"{name}: {CALLS[name](rng)} calls")
    return 0


# ---- time: CUDA vs the CPU path ----


@dataclass
class Row:
    name: str
    cpu: str
    cuda: str
    cpu_ms: float
    cuda_ms: float
    ratio: float  # cpu / cuda from the medians: > 1 means the GPU is faster
    best_ratio: float  # from the fastest rounds
    note: str


def time_all(rounds: int) -> list[Row]:
    import cv2

    from ovseg.benchmarks.bench_native import alternate, smooth_scores

    rng = np.random.default_rng(0)
    k, h, w = 15, 720, 1280
    scores = smooth_scores(k, 32, 32, seed=1)
    frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    palette = nat.default_palette(k)
    rows = []

    def row(name, cpu_desc, cuda_desc, cpu, cuda, note):
        cpu_t, cuda_t = alternate(cpu, cuda, rounds, native_calls=10, baseline_calls=3)
        rows.append(
            Row(
                name,
                cpu_desc,
                cuda_desc,
                cpu_t.median * 1e3,
                cuda_t.median * 1e3,
                cpu_t.median / cuda_t.median,
                cpu_t.best / cuda_t.best,
                note,
            )
        )

    agree = float((nat.render_cuda(scores, h, w)[0] == nat.upsample_argmax(scores, h, w)).mean())
    row(
        "label map",
        "upsample_argmax",
        "render_cuda, labels only",
        lambda: nat.upsample_argmax(scores, h, w),
        lambda: nat.render_cuda(scores, h, w),
        f"{k} maps 32x32 -> {w}x{h} int32 labels; agree on {agree:.6f} of pixels",
    )

    def cpu_overlay():
        labels = nat.upsample_argmax(scores, h, w)
        return cv2.addWeighted(frame, 0.6, palette[labels], 0.4, 0.0)

    row(
        "labels + overlay",
        "upsample_argmax + cv2.addWeighted (the Segmenter's)",
        "render_cuda with frame and palette",
        cpu_overlay,
        lambda: nat.render_cuda(scores, h, w, frame, palette, 0.4),
        f"{w}x{h} BGR frame, alpha 0.4",
    )

    size, d = 448, 512
    features = rng.standard_normal((28, 28, d)).astype(np.float32)

    def cuda_pool():
        labels, _ = nat.render_cuda(scores, size, size)
        return nat.pool_segments_cuda(labels, features, k)

    cpu_emb = nat.pool_segments_from_scores(scores, features, size, size)[0]
    cuda_emb = cuda_pool()[0]
    norms = np.linalg.norm(cpu_emb, axis=1) * np.linalg.norm(cuda_emb, axis=1)
    used = norms > 0
    worst = float(((cpu_emb * cuda_emb).sum(axis=1)[used] / norms[used]).min()) if used.any() else float("nan")
    row(
        "pooling",
        "pool_segments_from_scores",
        "render_cuda (labels) + pool_segments_cuda",
        lambda: nat.pool_segments_from_scores(scores, features, size, size),
        cuda_pool,
        f"{k} maps 32x32 -> {size}x{size} labels, 28x28x{d} features; worst cosine CPU vs CUDA {worst:.6f}",
    )
    return rows


def print_rows(rows: list[Row]) -> None:
    print(
        "median ms per call, host arrays in and out; ratio = CPU / CUDA (> 1: the GPU is faster); best: fastest rounds"
    )
    print(f"{'kernel':<18} {'CPU ms':>9} {'CUDA ms':>9} {'ratio':>8} {'best':>8}")
    for r in rows:
        print(f"{r.name:<18} {r.cpu_ms:>9.3f} {r.cuda_ms:>9.3f} {r.ratio:>7.2f}x {r.best_ratio:>7.2f}x")
        print(f"{'':<18} CPU: {r.cpu}; CUDA: {r.cuda}; {r.note}")


# ---- bundle: the tests' tiny bundle ----


def export_tiny_bundle(out: Path) -> None:
    from ovseg.export import dinov2 as dino
    from ovseg.export.bundle import ExportConfig, export_bundle
    from ovseg.export.clip import tiny_clip

    config = ExportConfig(out=out, force=True, image_size=112, vocab="voc21", fp16=True)
    export_bundle(config, clip_model=tiny_clip(), dinov2_model=dino.random_dinov2(dino.tiny_dinov2_config()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("device", help="print 'ok' or why CUDA cannot be used (exit 1)")
    sub.add_parser("call", help="each *_cuda entry point once, small inputs (for compute-sanitizer)")
    timing = sub.add_parser("time", help="CUDA vs the CPU path")
    timing.add_argument("--json", type=Path, metavar="OUT", help="also write the rows as JSON")
    timing.add_argument("--rounds", type=int, default=7, help="alternating rounds per comparison (default 7)")
    bundle = sub.add_parser("bundle", help="export the tests' tiny bundle (needs torch and open_clip)")
    bundle.add_argument("out", type=Path)
    args = parser.parse_args(argv)

    if args.command == "device":
        reason = device_reason()
        print(reason or "ok")
        return 1 if reason else 0
    if args.command == "call":
        return call_all()
    if args.command == "time":
        reason = device_reason()
        if reason:
            print(f"gpu_check_cuda: no CUDA device: {reason}")
            return 1
        rows = time_all(max(1, args.rounds))
        print_rows(rows)
        if args.json:
            args.json.write_text(json.dumps({"results": [asdict(r) for r in rows]}, indent=2))
        return 0
    export_tiny_bundle(args.out)
    print(f"tiny bundle written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
