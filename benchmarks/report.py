"""Turning ovseg-bench results (one JSON-able dict) into targets, a terminal table, CSV and docs/performance.md."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ovseg.constants import STAGES
from ovseg.runtime.bundle.manifest import common_size, describe_sizes

from .targets import NAIVE_MIN_AGREEMENT, NAIVE_MIN_SPEEDUP, OVERHEAD_MAX, TARGET_SIZE

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


def _why(doc: dict, section: str, default: str = "not run") -> str:
    return (doc.get("errors") or {}).get(section) or (doc.get("skipped") or {}).get(section) or default


def targets(doc: dict) -> list[Target]:
    return [_overhead(doc), _naive(doc)]


def _overhead(doc: dict) -> Target:
    name, goal = "runtime overhead", f"total <= {OVERHEAD_MAX:.2f} x (DINOv2 + CLIP) at {TARGET_SIZE}"
    lat = doc.get("latency")
    if not lat or common_size(lat["image_sizes"]) != TARGET_SIZE or not lat.get("overhead_ratio"):
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


# ---- the report model: what both formatters show, read once from the results ------------------------------------


@dataclass
class Report:
    """One run's results and the rows both formatters share; ``table`` and ``markdown`` render it, each in its order."""

    doc: dict
    sweeps: dict
    naive_stages: list[tuple[str, float | None, float | None]]  # stage, ovseg p50, naive p50


def model(doc: dict) -> Report:
    n = doc.get("naive") or {"ovseg": {}, "naive": {}}
    rows = [(s, n["ovseg"].get(s, {}).get("p50"), n["naive"].get(s, {}).get("p50")) for s in STAGE_ORDER]
    return Report(doc, doc.get("sweeps") or {}, [(s, o, v) for s, o, v in rows if o is not None or v is not None])


def _p50s(stages: dict, *names: str) -> list[float]:
    return [stages[s]["p50"] for s in names]


def _opt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# ---- terminal ------------------------------------------------------------------------------------------------


def _row(stats: dict) -> str:
    return f"{stats['mean']:9.2f} {stats['std']:8.2f} {stats['p50']:9.2f} {stats['p90']:9.2f} {stats['p99']:9.2f} {stats['fps']:8.2f} {stats['n']:5d}"


def _text_header(r: Report) -> list[str]:
    env = r.doc["environment"]
    return [
        f"ovseg-bench  {env['cpu_model']} ({env['logical_cpus']} CPUs, {env['threads']} threads, "
        f"{', '.join(env['cpu_flags'])})  ovseg {env['ovseg']}  onnxruntime {env['onnxruntime']}  "
        f"load {env['load_average_start']} -> {env.get('load_average_end')}"
    ]


def _text_latency(r: Report) -> list[str]:
    lat = r.doc.get("latency")
    if not lat:
        return []
    return [
        f"\nper stage, ms  ({lat['backend']} {lat['precision']}, {size_text(lat)}, "
        f"frames {lat['frame'][0]}x{lat['frame'][1]}, peak RSS {lat['peak_rss_mb']:.0f} MiB)",
        f"{'stage':<12} {'mean':>9} {'std':>8} {'p50':>9} {'p90':>9} {'p99':>9} {'FPS':>8} {'n':>5}",
        *(f"{stage:<12} {_row(s)}" for stage, s in lat["stages"].items()),
    ]


def _text_naive(r: Report) -> list[str]:
    n = r.doc.get("naive")
    if not n:
        return []
    return [
        f"\novseg vs naive TAG on a {n['frame'][0]}x{n['frame'][1]} frame, p50 ms (paired runs, {n['speedup']['n']} pairs)",
        f"  {'stage':<12} {'ovseg':>10} {'naive':>10}",
        *(f"  {s:<12} {_opt(o, '10.2f'):>10} {_opt(v, '10.2f'):>10}" for s, o, v in r.naive_stages),
        f"  speed-up {n['speedup']['p50']:.2f}x (fastest vs fastest {n['speedup_fastest']:.2f}x), "
        f"same labels on {n['agreement']:.2%} of pixels",
    ]


def _text_segments(r: Report) -> list[str]:
    if not r.sweeps.get("segments"):
        return []
    lines = ["\nK     k-means  pooling  lookup   render  (p50 ms, encoders replayed)"]
    for p in r.sweeps.get("segments") or []:
        km, po, lo, re = _p50s(p["stages"], "kmeans", "pooling", "lookup", "render")
        lines.append(f"  {p['k']:<4} {km:7.2f} {po:8.2f} {lo:7.3f} {re:8.2f}")
    return lines


def _text_backends(r: Report) -> list[str]:
    lines = ["\nbackend / precision   total p50 ms"] if r.sweeps.get("backends") else []
    for p in r.sweeps.get("backends") or []:
        what = f"{p['latency']['stages']['total']['p50']:.1f}" if p.get("latency") else f"skipped: {p['skipped']}"
        lines.append(f"  {p['backend']:<8} {p['precision']:<6}  {what}" + (f"  ({p['note']})" if p.get("note") else ""))
    return lines


def _text_video(r: Report) -> list[str]:
    vid = r.doc.get("video")
    if not vid:
        return []
    lines = [
        f"\novseg-run --keyframe-interval {run['keyframe_interval']}: {run['fps']:.2f} FPS over {run['frames']} frames "
        f"({vid['frame'][0]}x{vid['frame'][1]}, wall {run['wall_s']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MiB)"
        for run in vid["runs"]
    ]
    lines.append(
        f"  keyframe reuse: {vid['speedup']:.2f}x the frame rate, same labels on {vid['agreement']:.2%} of pixels"
    )
    return lines


def _text_targets(r: Report) -> list[str]:
    lines = ["\ntargets"]
    for t in r.doc.get("targets") or []:
        lines.append(f"  {t['verdict']:<4} {t['name']:<22} {t['target']}")
        lines.append(f"       measured: {t['measured']}")
        if t["reason"]:
            lines.append(f"       {'why' if t['verdict'] == 'MISS' else 'note'}: {t['reason']}")
    lines += [f"skipped {section}: {message}" for section, message in (r.doc.get("skipped") or {}).items()]
    lines += [f"error in {section}: {message}" for section, message in (r.doc.get("errors") or {}).items()]
    return lines


TEXT_SECTIONS = (
    _text_header,
    _text_latency,
    _text_naive,
    _text_segments,
    _text_backends,
    _text_video,
    _text_targets,
)


def table(doc: dict) -> str:
    r = model(doc)
    return "\n".join(line for section in TEXT_SECTIONS for line in section(r))


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


def _md_header(r: Report, reproduce: list[str]) -> list[str]:
    env = r.doc["environment"]
    return [
        "## Performance",
        "",
        f"Measured by `ovseg-bench` on {env['cpu_model']} ({env['logical_cpus']} logical CPUs, "
        f"{', '.join(env['cpu_flags'])}; no GPU), {env['threads']} threads, onnxruntime {env['onnxruntime']}, "
        f"ovseg {env['ovseg']}, in {r.doc.get('elapsed_s', 0) / 60:.0f} min. "
        + _load_sentence(env)
        + " Every ratio below compares runs interleaved in one loop (ovseg and the naive reference in pairs).",
        "",
        "```sh",
        *reproduce,
        "```",
        "",
    ]


def _md_table(title: str, head: str, align: str, rows: list[str], after: list[str] | None = None) -> list[str]:
    return [title, "", head, align, *rows, *(after if after is not None else [""])]


def _md_latency(r: Report) -> list[str]:
    lat = r.doc.get("latency")
    if not lat:
        return []
    w, h = lat["frame"]
    total = lat["stages"]["total"]
    return _md_table(
        f"### One frame, {lat['backend'].upper()} {lat['precision']}, {size_text(lat)} "
        f"(guidance-free, K=15, {w}x{h} frames of the sample clip)",
        "| stage | p50 ms | p90 ms | p99 ms | mean ± std ms |",
        "|---|---:|---:|---:|---:|",
        [
            f"| {stage} | {s['p50']:.1f} | {s['p90']:.1f} | {s['p99']:.1f} | {s['mean']:.1f} ± {s['std']:.1f} |"
            for stage, s in lat["stages"].items()
        ],
        [
            "",
            f"{total['n']} timed frames: {1000 / total['p50']:.2f} FPS at the median. Peak RSS of the "
            f"process after the main measurement: {r.doc.get('peak_rss_mb_ovseg', 0):.0f} MiB.",
            "",
        ],
    )


def _md_targets(r: Report) -> list[str]:
    return _md_table(
        "### Targets (ratios within this run)",
        "| target | measured | result |",
        "|---|---|---|",
        [
            f"| {t['target']} | {t['measured']}{' — ' + t['reason'] if t['reason'] else ''} | {t['verdict']} |"
            for t in r.doc.get("targets") or []
        ],
    )


def _md_naive(r: Report) -> list[str]:
    n = r.doc.get("naive")
    if not n:
        return []
    return _md_table(
        f"### ovseg vs the naive TAG pipeline ({n['frame'][0]}x{n['frame'][1]} frame, {n['speedup']['n']} paired runs)",
        "| stage | ovseg p50 ms | naive p50 ms |",
        "|---|---:|---:|",
        [f"| {s} | {_opt(o, '.1f')} | {_opt(v, '.1f')} |" for s, o, v in r.naive_stages],
        [
            "",
            f"Same labels on {n['agreement']:.2%} of pixels; speed-up {n['speedup']['p50']:.2f}x (median of pairs). "
            "The naive side is PyTorch eager on the same weights (checked: min token cosine "
            f"{min(n['same_weights_cosine'].values()):.6f}), features upsampled to full resolution and averaged per mask, "
            "brute-force retrieval; k-means is ovseg's kernel on both sides.",
            "",
        ],
    )


def _md_sweep(points: list[dict], head: list[str], lead, cells, measured: int) -> list[str]:
    """A sweep's rows: ``lead`` cells, then the measured ``cells`` or dashes and why the point was not measured."""
    if not points:
        return []
    rows = []
    for p in points:
        if p.get("latency"):
            rows.append(f"| {lead(p)} | {cells(p, *_p50s(p['latency']['stages'], 'dinov2', 'clip', 'total'))} |")
        else:
            rows.append(f"| {lead(p)} | {' | '.join('—' * measured)} | not measured: {p['skipped']} |")
    return _md_table(*head, rows)


def _md_backends(r: Report) -> list[str]:
    return _md_sweep(
        r.sweeps.get("backends") or [],
        [
            "### Backend and precision",
            "| backend | precision | DINOv2 ms | CLIP ms | total ms p50 | note |",
            "|---|---|---:|---:|---:|---|",
        ],
        lambda p: f"{p['backend']} | {p['precision']}",
        lambda p, d, c, t: f"{d:.0f} | {c:.0f} | {t:.0f} | {p.get('note', '')}",
        measured=3,
    )


def _md_segments(r: Report) -> list[str]:
    if not r.sweeps.get("segments"):
        return []
    rows = []
    for p in r.sweeps.get("segments") or []:
        km, po, lo, re = _p50s(p["stages"], "kmeans", "pooling", "lookup", "render")
        rows.append(f"| {p['k']} | {km:.2f} | {po:.2f} | {lo:.3f} | {re:.2f} |")
    return _md_table(
        "### Segments K (encoder outputs replayed; p50 ms)",
        "| K | k-means | pooling | lookup | render |",
        "|---:|---:|---:|---:|---:|",
        rows,
    )


def _md_video(r: Report) -> list[str]:
    vid = r.doc.get("video")
    if not vid:
        return []
    return _md_table(
        f"### Video (`ovseg-run` on the {vid['frame'][0]}x{vid['frame'][1]} sample clip: decode, segment, overlay, save)",
        "| keyframe interval | frames | FPS | wall s | peak RSS MiB |",
        "|---:|---:|---:|---:|---:|",
        [
            f"| {run['keyframe_interval']} | {run['frames']} | {run['fps']:.2f} | {run['wall_s']:.1f} | {run['peak_rss_mb']:.0f} |"
            for run in vid["runs"]
        ],
        [
            "",
            f"Keyframe reuse: {vid['speedup']:.2f}x the frame rate; the labels agree with every-frame CLIP on "
            f"{vid['agreement']:.2%} of pixels (random weights: labels are decided by tiny score differences).",
            "",
        ],
    )


def _md_gpu(r: Report) -> list[str]:
    return _md_table(
        "### GPU\n\nFor measurements on a GPU (`ovseg-bench --bundle DIR --backend cuda --precision fp16`, "
        "or `--backend tensorrt`); none were made for this table.",
        "| GPU | backend | precision | S | DINOv2 ms | CLIP ms | total ms | FPS |",
        "|---|---|---|---:|---:|---:|---:|---:|",
        ["| | | | | | | | |"],
    )


MARKDOWN_SECTIONS = (
    _md_latency,
    _md_targets,
    _md_naive,
    _md_backends,
    _md_segments,
    _md_video,
    _md_gpu,
)


def markdown(doc: dict, reproduce: list[str]) -> str:
    """docs/performance.md's tables from one run; ``reproduce`` holds the commands that produce it."""
    r = model(doc)
    return "\n".join(_md_header(r, reproduce) + [line for section in MARKDOWN_SECTIONS for line in section(r)])
