"""Turning ovseg-bench results (one JSON-able dict) into targets, a terminal table, CSV and PNG charts."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ovseg.constants import STAGES
from ovseg.runtime.bundle.manifest import common_size, describe_sizes

from .roofline import GEMM_CLASS
from .targets import (
    HNSW_MAX_MS,
    HNSW_MIN_RECALL,
    HNSW_SIZE,
    NAIVE_MIN_AGREEMENT,
    NAIVE_MIN_SPEEDUP,
    OVERHEAD_MAX,
    PEAK_FRACTION_MIN,
    TARGET_SIZE,
)

IDLE_LOAD = 0.25  # load average per CPU at the start under which the machine counts as otherwise idle
# Table order: the Segmenter's stages, and the naive reference's "assign" (pixels to k-means centres; naive.NAIVE_STAGES)
# right after k-means.
STAGE_ORDER = tuple(s for stage in STAGES for s in ((stage, "assign") if stage == "kmeans" else (stage,)))


@dataclass
class Target:
    name: str
    target: str
    measured: str
    ratio: float | None  # the number the target bounds
    passed: bool | None  # None: not measured in this run
    reason: str = ""

    @property
    def verdict(self) -> str:
        return "n/a" if self.passed is None else ("PASS" if self.passed else "MISS")


def size_text(lat: dict) -> str:
    """A latency record's input sizes: "448x448", or "CLIP 448x448, DINOv2 224x224"."""
    return describe_sizes(lat["image_sizes"])


def _latency_at(doc: dict, size: int) -> dict | None:
    main = doc.get("latency")
    if main and common_size(main["image_sizes"]) == size:
        return main
    for point in (doc.get("sweeps") or {}).get("input_size") or []:
        if point["size"] == size and point.get("latency"):
            return point["latency"]
    return None


def _why(doc: dict, section: str, default: str = "not run") -> str:
    return (doc.get("errors") or {}).get(section) or (doc.get("skipped") or {}).get(section) or default


def targets(doc: dict) -> list[Target]:
    return [_overhead(doc), _naive(doc), _roofline(doc), _hnsw(doc)]


def _overhead(doc: dict) -> Target:
    name, goal = "runtime overhead", f"total <= {OVERHEAD_MAX:.2f} x (DINOv2 + CLIP) at {TARGET_SIZE}"
    lat = _latency_at(doc, TARGET_SIZE)
    if lat is None or not lat.get("overhead_ratio"):
        return Target(name, goal, "-", None, None, f"no guidance-free measurement at {TARGET_SIZE} in this run")
    ratio = lat["overhead_ratio"]["p50"]
    st = lat["stages"]
    rest = {s: st[s]["p50"] for s in ("preprocess", "kmeans", "pooling", "lookup", "render", "refine") if s in st}
    top = ", ".join(f"{s} {v:.1f} ms" for s, v in sorted(rest.items(), key=lambda kv: -kv[1])[:3])
    measured = f"{ratio:.3f}x (median per frame; DINOv2 {st['dinov2']['p50']:.0f} + CLIP {st['clip']['p50']:.0f} ms, total {st['total']['p50']:.0f} ms)"
    passed = ratio <= OVERHEAD_MAX
    return Target(name, goal, measured, ratio, passed, "" if passed else f"the stages outside the encoders: {top}")


def _naive(doc: dict) -> Target:
    name, goal = (
        "vs naive TAG",
        f">= {NAIVE_MIN_SPEEDUP:.0f}x faster end to end at {TARGET_SIZE}, >= {NAIVE_MIN_AGREEMENT:.0%} same labels",
    )
    n = doc.get("naive")
    lat = doc.get("latency") or {}
    if not n:
        return Target(name, goal, "-", None, None, _why(doc, "naive"))
    if not lat or common_size(lat["image_sizes"]) != TARGET_SIZE:
        at = size_text(lat) if lat else "an unmeasured size"
        return Target(
            name,
            goal,
            f"{n['speedup']['p50']:.2f}x at {at}",
            n["speedup"]["p50"],
            None,
            f"the bundle is at {at}, the target is at {TARGET_SIZE}",
        )
    speedup, agree = n["speedup"]["p50"], n["agreement"]
    measured = (
        f"{speedup:.2f}x (median of {n['speedup']['n']} paired runs; {n['speedup_fastest']:.2f}x fastest vs fastest), "
        f"labels agree on {agree:.2%} of pixels"
    )
    if agree < NAIVE_MIN_AGREEMENT:
        return Target(
            name, goal, measured, speedup, False, f"labels differ on {1 - agree:.2%} of pixels: no speed-up is claimed"
        )
    passed = speedup >= NAIVE_MIN_SPEEDUP
    reason = ""
    if not passed:
        o, v = n["ovseg"], n["naive"]
        enc_o = o["dinov2"]["p50"] + o["clip"]["p50"]
        enc_v = v["dinov2"]["p50"] + v["clip"]["p50"]
        rest_v = v["total"]["p50"] - enc_v
        rest_o = o["total"]["p50"] - enc_o
        reason = (
            f"the encoders dominate both pipelines: ONNX Runtime {enc_o:.0f} ms vs torch eager {enc_v:.0f} ms; "
            f"everything else {rest_o:.0f} ms vs {rest_v:.0f} ms"
        )
    return Target(name, goal, measured, speedup, passed, reason)


def _roofline(doc: dict) -> Target:
    name, goal = "encoders vs GEMM peak", f">= {PEAK_FRACTION_MIN:.0%} of the measured fp32 GEMM peak"
    r = doc.get("roofline")
    if not r:
        return Target(name, goal, "-", None, None, _why(doc, "roofline"))
    frac = r["fraction_of_peak"]["p50"]
    per = ", ".join(f"{k} {v['gflops']:.0f} GFLOP/s ({v['fraction_of_peak']:.0%})" for k, v in r["encoders"].items())
    measured = f"{frac:.1%} (median per frame; {per}; GEMM {r['gemm_gflops']:.0f} GFLOP/s)"
    passed = frac >= PEAK_FRACTION_MIN
    reason = "" if passed else _profile_reason(r)
    return Target(name, goal, measured, frac, passed, reason)


def _profile_reason(r: dict) -> str:
    """Where the encoders' time goes, from the profiled run: MatMul-class kernels' own rate and the other kernels' share."""
    parts = []
    for role, e in r["encoders"].items():
        p = e.get("profile")
        if not p or not p["run_ms"]:
            continue
        others = [(k, v) for k, v in p["by_op_ms"].items() if k not in GEMM_CLASS][:3]
        parts.append(
            f"{role}: MatMul/Gemm/Conv kernels take {p['gemm_class_ms'] / p['run_ms']:.0%} of the profiled run at "
            f"{p['gemm_class_fraction_of_peak']:.0%} of peak; the rest is "
            + ", ".join(f"{k} {v / p['run_ms']:.0%}" for k, v in others)
        )
    return "; ".join(parts) or "no op profile in this run"


def _hnsw(doc: dict) -> Target:
    name, goal = (
        "HNSW at 1M",
        f"{15} segments in {HNSW_SIZE:,} entries <= {HNSW_MAX_MS} ms, recall@1 >= {HNSW_MIN_RECALL}",
    )
    vocab = (doc.get("sweeps") or {}).get("vocabulary")
    point = next((p for p in (vocab or {}).get("points", []) if p["size"] == HNSW_SIZE), None)
    if point is None:
        return Target(
            name,
            goal,
            "-",
            None,
            None,
            _why(doc, "vocabulary", f"no {HNSW_SIZE:,}-entry vocabulary in this run (--quick stops at 10k)"),
        )
    ef = str(vocab["default_ef"])
    ms, recall = point["hnsw"][ef]["p50"], point["recall"][ef]
    measured = f"{ms:.3f} ms, recall@1 {recall:.3f} at ef={ef} (M={point['hnsw_params']['M']})"
    passed = ms <= HNSW_MAX_MS and recall >= HNSW_MIN_RECALL
    reason = ""
    if not passed:
        fast_enough = [int(e) for e, s in point["hnsw"].items() if s["p50"] <= HNSW_MAX_MS]
        good_enough = [int(e) for e, r in point["recall"].items() if r >= HNSW_MIN_RECALL]
        parts = []
        if recall < HNSW_MIN_RECALL:
            parts.append(
                f"recall@1 {recall:.3f} < {HNSW_MIN_RECALL}"
                + (
                    f"; ef={min(good_enough)} reaches it in {point['hnsw'][str(min(good_enough))]['p50']:.2f} ms"
                    if good_enough
                    else f"; no ef measured (up to {max(map(int, point['recall']))}) reaches it"
                )
            )
        if ms > HNSW_MAX_MS:
            parts.append(
                f"{ms:.2f} ms > {HNSW_MAX_MS} ms" + (f"; ef <= {max(fast_enough)} fits" if fast_enough else "")
            )
        reason = "; ".join(parts)
    return Target(name, goal, measured, ms, passed, reason)


# ---- terminal ------------------------------------------------------------------------------------------------


def _row(stats: dict) -> str:
    return f"{stats['mean']:9.2f} {stats['std']:8.2f} {stats['p50']:9.2f} {stats['p90']:9.2f} {stats['p99']:9.2f} {stats['fps']:8.2f} {stats['n']:5d}"


def table(doc: dict) -> str:
    env, lines = doc["environment"], []
    lines.append(
        f"ovseg-bench  {env['cpu_model']} ({env['logical_cpus']} CPUs, {env['threads']} threads, "
        f"{', '.join(env['cpu_flags'])})  ovseg {env['ovseg']}  onnxruntime {env['onnxruntime']}  "
        f"load {env['load_average_start']} -> {env.get('load_average_end')}"
    )
    lat = doc.get("latency")
    if lat:
        lines.append(
            f"\nper stage, ms  ({lat['backend']} {lat['precision']}, {size_text(lat)}, "
            f"frames {lat['frame'][0]}x{lat['frame'][1]}, peak RSS {lat['peak_rss_mb']:.0f} MiB)"
        )
        lines.append(f"{'stage':<12} {'mean':>9} {'std':>8} {'p50':>9} {'p90':>9} {'p99':>9} {'FPS':>8} {'n':>5}")
        for stage, s in lat["stages"].items():
            lines.append(f"{stage:<12} {_row(s)}")
    n = doc.get("naive")
    if n:
        lines.append(
            f"\novseg vs naive TAG on a {n['frame'][0]}x{n['frame'][1]} frame, p50 ms (paired runs, {n['speedup']['n']} pairs)"
        )
        lines.append(f"  {'stage':<12} {'ovseg':>10} {'naive':>10}")
        for stage in sorted(
            set(n["ovseg"]) | set(n["naive"]), key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else 99
        ):
            o, v = n["ovseg"].get(stage, {}).get("p50"), n["naive"].get(stage, {}).get("p50")
            lines.append(
                f"  {stage:<12} {'-' if o is None else f'{o:10.2f}':>10} {'-' if v is None else f'{v:10.2f}':>10}"
            )
        lines.append(
            f"  speed-up {n['speedup']['p50']:.2f}x (fastest vs fastest {n['speedup_fastest']:.2f}x), "
            f"same labels on {n['agreement']:.2%} of pixels"
        )
    sweeps = doc.get("sweeps") or {}
    if sweeps.get("input_size"):
        lines.append("\ninput size   DINOv2     CLIP    total  p50 ms   FPS")
        for p in sweeps["input_size"]:
            if p.get("latency"):
                st = p["latency"]["stages"]
                lines.append(
                    f"  {p['size']:<9} {st['dinov2']['p50']:8.1f} {st['clip']['p50']:8.1f} {st['total']['p50']:8.1f}"
                    f"        {1000 / st['total']['p50']:5.2f}"
                )
            else:
                lines.append(f"  {p['size']:<9} skipped: {p['skipped']}")
    if sweeps.get("segments"):
        lines.append("\nK     k-means  pooling  lookup   render  (p50 ms, encoders replayed)")
        for p in sweeps["segments"]:
            st = p["stages"]
            lines.append(
                f"  {p['k']:<4} {st['kmeans']['p50']:7.2f} {st['pooling']['p50']:8.2f} {st['lookup']['p50']:7.3f} {st['render']['p50']:8.2f}"
            )
    if sweeps.get("backends"):
        lines.append("\nbackend / precision   total p50 ms")
        for p in sweeps["backends"]:
            what = f"{p['latency']['stages']['total']['p50']:.1f}" if p.get("latency") else f"skipped: {p['skipped']}"
            lines.append(
                f"  {p['backend']:<8} {p['precision']:<6}  {what}" + (f"  ({p['note']})" if p.get("note") else "")
            )
    for role, r in ((sweeps.get("int8_encoders") or {}).get("encoders") or {}).items():
        lines.append(
            f"  int8 {role}: {r['speedup_p50']:.2f}x fp32 by medians ({r['speedup_min']:.2f}x by fastest runs), "
            f"{r['verdict']} (bench_int8)"
        )
    vocab = sweeps.get("vocabulary")
    if vocab:
        ef = str(vocab["default_ef"])
        lines.append(f"\nvocabulary   exact ms p50 (fastest)   HNSW ef={ef} ms p50 (fastest)   recall@1")
        for p in vocab["points"]:
            e, h = p["exact"], p["hnsw"][ef]
            lines.append(
                f"  {p['size']:>9,}  {e['p50']:9.3f} ({e['min']:8.3f})   {h['p50']:9.3f} ({h['min']:8.3f})"
                f"        {p['recall'][ef]:8.3f}"
            )
        lines.append(f"  {vocab['crossover_note']}; {vocab['crossover_fastest_note']}")
    r = doc.get("roofline")
    if r:
        lines.append(
            f"\nroofline: GEMM {r['gemm_size']}^3 fp32 {r['gemm_gflops']:.0f} GFLOP/s (median, interleaved with the frames)"
        )
        for k, v in r["encoders"].items():
            lines.append(
                f"  {k:<7} {v['gflop']:8.3g} GFLOP/frame  {v['ms']:8.1f} ms  {v['gflops']:6.1f} GFLOP/s  {v['fraction_of_peak']:.0%} of peak"
            )
            p = v.get("profile")
            if p and p["run_ms"]:
                top = ", ".join(f"{op} {ms / p['run_ms']:.0%}" for op, ms in list(p["by_op_ms"].items())[:5])
                lines.append(
                    f"          profiled run {p['run_ms']:.1f} ms: {top}; MatMul-class kernels at "
                    f"{p['gemm_class_gflops']:.1f} GFLOP/s ({p['gemm_class_fraction_of_peak']:.0%} of peak)"
                )
    vid = doc.get("video")
    if vid:
        for run in vid["runs"]:
            lines.append(
                f"\novseg-run --keyframe-interval {run['keyframe_interval']}: {run['fps']:.2f} FPS over {run['frames']} frames "
                f"({vid['frame'][0]}x{vid['frame'][1]}, wall {run['wall_s']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MiB)"
            )
        lines.append(
            f"  keyframe reuse: {vid['speedup']:.2f}x the frame rate, same labels on {vid['agreement']:.2%} of pixels"
        )
    lines.append("\ntargets")
    for t in doc.get("targets", []):
        lines.append(f"  {t['verdict']:<4} {t['name']:<22} {t['target']}")
        lines.append(f"       measured: {t['measured']}")
        if t["reason"]:
            lines.append(f"       {'why' if t['verdict'] == 'MISS' else 'note'}: {t['reason']}")
    for section, message in (doc.get("skipped") or {}).items():
        lines.append(f"skipped {section}: {message}")
    for section, message in (doc.get("errors") or {}).items():
        lines.append(f"error in {section}: {message}")
    return "\n".join(lines)


# ---- files -----------------------------------------------------------------------------------------------------


def flatten(value, prefix: str = ""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
        for i, v in enumerate(value):
            yield from flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, value


def write_csv(doc: dict, path: Path) -> None:
    """Every scalar of the results as one row: section, key (a dotted path), value."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "key", "value"])
        for section, value in doc.items():
            for key, v in flatten(value):
                w.writerow([section, key, ";".join(map(str, v)) if isinstance(v, (list, tuple)) else v])


# ---- docs section --------------------------------------------------------------------------------------------------


def _load_sentence(env: dict) -> str:
    """What the load average says about the machine; at the end it includes the benchmark's own threads."""
    start, cpus = env.get("load_average_start"), env["logical_cpus"]
    if start is None:
        return "The load of the machine was not recorded."
    if start < IDLE_LOAD * cpus:
        return f"The machine was otherwise idle (load average {start} at the start, on {cpus} CPUs)."
    return (
        f"The machine was busy when the run started (load average {start} on {cpus} CPUs), so absolute times "
        "may be inflated and noisy."
    )


def markdown(doc: dict, reproduce: list[str]) -> str:
    """docs/performance.md's tables from one run; ``reproduce`` holds the commands that produce it."""
    env, lat = doc["environment"], doc.get("latency")
    out = ["## Performance", ""]
    out.append(
        f"Measured by `ovseg-bench` on {env['cpu_model']} ({env['logical_cpus']} logical CPUs, "
        f"{', '.join(env['cpu_flags'])}; no GPU), {env['threads']} threads, onnxruntime {env['onnxruntime']}, "
        f"ovseg {env['ovseg']}, in {doc.get('elapsed_s', 0) / 60:.0f} min. "
        + _load_sentence(env)
        + " Every ratio below compares runs interleaved in one loop (GEMM before each frame, ovseg and the naive "
        "reference in pairs)."
    )
    out += ["", "```sh", *reproduce, "```", ""]
    if lat:
        w, h = lat["frame"]
        out += [
            f"### One frame, {lat['backend'].upper()} {lat['precision']}, {size_text(lat)} "
            f"(guidance-free, K=15, {w}x{h} frames of the sample clip)",
            "",
            "| stage | p50 ms | p90 ms | p99 ms | mean ± std ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for stage, s in lat["stages"].items():
            out.append(
                f"| {stage} | {s['p50']:.1f} | {s['p90']:.1f} | {s['p99']:.1f} | {s['mean']:.1f} ± {s['std']:.1f} |"
            )
        total = lat["stages"]["total"]
        out += [
            "",
            f"{total['n']} timed frames: {1000 / total['p50']:.2f} FPS at the median. Peak RSS of the "
            f"process after the main measurement: {doc.get('peak_rss_mb_ovseg', 0):.0f} MiB.",
            "",
        ]
    out += ["### Targets (ratios within this run)", "", "| target | measured | result |", "|---|---|---|"]
    for t in doc.get("targets", []):
        why = f" — {t['reason']}" if t["reason"] else ""
        out.append(f"| {t['target']} | {t['measured']}{why} | {t['verdict']} |")
    out.append("")
    n = doc.get("naive")
    if n:
        out += [
            f"### ovseg vs the naive TAG pipeline ({n['frame'][0]}x{n['frame'][1]} frame, {n['speedup']['n']} paired runs)",
            "",
            "| stage | ovseg p50 ms | naive p50 ms |",
            "|---|---:|---:|",
        ]
        for stage in STAGE_ORDER:
            if stage in n["ovseg"] or stage in n["naive"]:
                o, v = n["ovseg"].get(stage, {}).get("p50"), n["naive"].get(stage, {}).get("p50")
                out.append(f"| {stage} | {'-' if o is None else f'{o:.1f}'} | {'-' if v is None else f'{v:.1f}'} |")
        out += [
            "",
            f"Same labels on {n['agreement']:.2%} of pixels; speed-up {n['speedup']['p50']:.2f}x (median of pairs). "
            "The naive side is PyTorch eager on the same weights (checked: min token cosine "
            f"{min(n['same_weights_cosine'].values()):.6f}), features upsampled to full resolution and averaged per mask, "
            "brute-force retrieval; k-means is ovseg's kernel on both sides.",
            "",
        ]
    sweeps = doc.get("sweeps") or {}
    if sweeps.get("input_size"):
        out += [
            "### Input size (p50)",
            "",
            "| S | DINOv2 ms | CLIP ms | total ms | FPS | note |",
            "|---:|---:|---:|---:|---:|---|",
        ]
        for p in sweeps["input_size"]:
            if p.get("latency"):
                st = p["latency"]["stages"]
                note = "this bundle" if p["bundle"] == (lat or {}).get("bundle") else "random-weights sweep bundle"
                out.append(
                    f"| {p['size']} | {st['dinov2']['p50']:.0f} | {st['clip']['p50']:.0f} | {st['total']['p50']:.0f} | "
                    f"{1000 / st['total']['p50']:.2f} | {note} |"
                )
            else:
                out.append(f"| {p['size']} | — | — | — | — | not measured: {p['skipped']} |")
        out.append("")
    if sweeps.get("backends"):
        out += [
            "### Backend and precision",
            "",
            "| backend | precision | DINOv2 ms | CLIP ms | total ms p50 | note |",
            "|---|---|---:|---:|---:|---|",
        ]
        for p in sweeps["backends"]:
            if p.get("latency"):
                st = p["latency"]["stages"]
                out.append(
                    f"| {p['backend']} | {p['precision']} | {st['dinov2']['p50']:.0f} | {st['clip']['p50']:.0f} | "
                    f"{st['total']['p50']:.0f} | {p.get('note', '')} |"
                )
            else:
                out.append(f"| {p['backend']} | {p['precision']} | — | — | — | not measured: {p['skipped']} |")
        out.append("")
    if sweeps.get("segments"):
        out += [
            "### Segments K (encoder outputs replayed; p50 ms)",
            "",
            "| K | k-means | pooling | lookup | render |",
            "|---:|---:|---:|---:|---:|",
        ]
        for p in sweeps["segments"]:
            st = p["stages"]
            out.append(
                f"| {p['k']} | {st['kmeans']['p50']:.2f} | {st['pooling']['p50']:.2f} | {st['lookup']['p50']:.3f} | {st['render']['p50']:.2f} |"
            )
        out.append("")
    vocab = sweeps.get("vocabulary")
    if vocab:
        ef = str(vocab["default_ef"])
        out += [
            f"### Label lookup: {vocab['queries_per_frame']} segments, top-{vocab['top_k']}, phrase embeddings D={vocab['dim']}",
            "",
            f"| vocabulary | exact ms p50 (fastest) | HNSW ef={ef} ms p50 (fastest) | recall@1 | index |",
            "|---:|---:|---:|---:|---|",
        ]
        for p in vocab["points"]:
            e, hn = p["exact"], p["hnsw"][ef]
            out.append(
                f"| {p['size']:,} | {e['p50']:.3f} ({e['min']:.3f}) | {hn['p50']:.3f} ({hn['min']:.3f}) | "
                f"{p['recall'][ef]:.3f} | M={p['hnsw_params']['M']}, "
                f"ef_construction={p['hnsw_params']['ef_construction']} |"
            )
        out += [
            "",
            f"{vocab['crossover_note']}; {vocab['crossover_fastest_note']}. "
            + " ".join(f"{n_}." for n_ in vocab["notes"]),
            "",
        ]
    vid = doc.get("video")
    if vid:
        out += [
            f"### Video (`ovseg-run` on the {vid['frame'][0]}x{vid['frame'][1]} sample clip: decode, segment, overlay, save)",
            "",
            "| keyframe interval | frames | FPS | wall s | peak RSS MiB |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in vid["runs"]:
            out.append(
                f"| {r['keyframe_interval']} | {r['frames']} | {r['fps']:.2f} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} |"
            )
        out += [
            "",
            f"Keyframe reuse: {vid['speedup']:.2f}x the frame rate; the labels agree with every-frame CLIP on "
            f"{vid['agreement']:.2%} of pixels (random weights: labels are decided by tiny score differences).",
            "",
        ]
    out += [
        "### GPU",
        "",
        "For measurements on a GPU (`ovseg-bench --bundle DIR --backend cuda --precision fp16`, "
        "or `--backend tensorrt`); none were made for this table.",
        "",
        "| GPU | backend | precision | S | DINOv2 ms | CLIP ms | total ms | FPS |",
        "|---|---|---|---:|---:|---:|---:|---:|",
        "| | | | | | | | |",
        "",
    ]
    return "\n".join(out)
