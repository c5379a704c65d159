"""ovseg-bench's results (one JSON-able dict) as targets and one report model: titled tables with notes, which
two formatters render, for the terminal and for docs/performance.md. --profiles and --soak render their tables the same way."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

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

    def record(self) -> dict:
        """What the results document holds: the fields and the verdict."""
        return {**asdict(self), "verdict": self.verdict}


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
    name = "vs naive TAG"
    goal = f">= {NAIVE_MIN_SPEEDUP:.0f}x faster end to end at {TARGET_SIZE}, >= {NAIVE_MIN_AGREEMENT:.0%} same labels"
    n, lat = doc.get("naive"), doc.get("latency") or {}
    if not n:
        why = (doc.get("errors") or {}).get("naive") or (doc.get("skipped") or {}).get("naive") or "not run"
        return Target(name, goal, "-", None, None, why)
    speedup, agree = n["speedup"]["p50"], n["agreement"]
    if not lat or common_size(lat["image_sizes"]) != TARGET_SIZE:
        at = describe_sizes(lat["image_sizes"]) if lat else "an unmeasured size"
        why = f"the bundle is at {at}, the target is at {TARGET_SIZE}"
        return Target(name, goal, f"{speedup:.2f}x at {at}", speedup, None, why)
    measured = (
        f"{speedup:.2f}x (median of {n['speedup']['n']} paired runs; {n['speedup_fastest']:.2f}x fastest vs fastest), "
        f"labels agree on {agree:.2%} of pixels"
    )
    if agree < NAIVE_MIN_AGREEMENT:
        why = f"labels differ on {1 - agree:.2%} of pixels: no speed-up is claimed"
        return Target(name, goal, measured, speedup, False, why)
    if speedup >= NAIVE_MIN_SPEEDUP:
        return Target(name, goal, measured, speedup, True)
    o, v = n["ovseg"], n["naive"]
    enc_o, enc_v = o["dinov2"]["p50"] + o["clip"]["p50"], v["dinov2"]["p50"] + v["clip"]["p50"]
    why = (
        f"the encoders dominate both pipelines: ONNX Runtime {enc_o:.0f} ms vs torch eager {enc_v:.0f} ms; "
        f"everything else {o['total']['p50'] - enc_o:.0f} ms vs {v['total']['p50'] - enc_v:.0f} ms"
    )
    return Target(name, goal, measured, speedup, False, why)


# ---- the report model and its two formatters ---------------------------------------------------------------------


@dataclass
class Table:
    """One titled table: ``align`` has an "l" or "r" per column; ``notes`` are paragraphs after it."""

    title: str
    head: list[str]
    align: str
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def _markdown_lines(t: Table) -> list[str]:
    rows = [t.head, ["---:" if a == "r" else "---" for a in t.align], *t.rows]
    heading = [f"### {t.title}", ""] if t.title else []
    return heading + [f"| {' | '.join(row)} |" for row in rows] + [x for note in t.notes for x in ("", note)] + [""]


def _text_lines(t: Table) -> list[str]:
    widths = [max(len(row[i]) for row in (t.head, *t.rows)) for i in range(len(t.head))]
    rows = [
        "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, t.align)).rstrip()
        for row in (t.head, *t.rows)
    ]
    return (["", t.title] if t.title else []) + rows + t.notes


def render(tables: list[Table], markdown: bool) -> str:
    """The tables as Markdown (a ### heading each) or as aligned plain text for the terminal."""
    return "\n".join(line for t in tables for line in (_markdown_lines if markdown else _text_lines)(t))


def targets_table(doc: dict) -> Table:
    """The targets of a results document, with what was skipped and what failed as notes."""
    return Table(
        "Targets (ratios within this run)",
        ["result", "target", "measured"],
        "lll",
        [
            [t["verdict"], f"{t['name']}: {t['target']}", t["measured"] + (f" — {t['reason']}" if t["reason"] else "")]
            for t in doc.get("targets") or []
        ],
        [f"Skipped {name}: {why}." for name, why in (doc.get("skipped") or {}).items()]
        + [f"Error in {name}: {why}." for name, why in (doc.get("errors") or {}).items()],
    )


def _cells(stats: dict, spec: str) -> list[str]:
    """``spec`` "p50:.1f p90:.1f" -> the p50 and p90 of ``stats`` formatted so; a name of a stage dict takes its p50."""
    pairs = (item.split(":") for item in spec.split())
    return [format(stats[k]["p50"] if isinstance(stats[k], dict) else stats[k], f) for k, f in pairs]


def _latency(doc: dict) -> Table | None:
    if not (lat := doc.get("latency")):
        return None
    (w, h), total = lat["frame"], lat["stages"]["total"]
    return Table(
        f"One frame, {lat['backend'].upper()} {lat['precision']}, {describe_sizes(lat['image_sizes'])} "
        f"(guidance-free, K=15, {w}x{h} frames of the sample clip)",
        ["stage", "p50 ms", "p90 ms", "p99 ms", "mean ± std ms"],
        "lrrrr",
        [
            [stage, *_cells(s, "p50:.1f p90:.1f p99:.1f"), f"{s['mean']:.1f} ± {s['std']:.1f}"]
            for stage, s in lat["stages"].items()
        ],
        [
            f"{total['n']} timed frames: {1000 / total['p50']:.2f} FPS at the median. Peak RSS of the process "
            f"after the main measurement: {doc.get('peak_rss_mb_ovseg', 0):.0f} MiB."
        ],
    )


def _naive_table(doc: dict) -> Table | None:
    if not (n := doc.get("naive")):
        return None
    stages = [(s, n["ovseg"].get(s, {}).get("p50"), n["naive"].get(s, {}).get("p50")) for s in STAGE_ORDER]
    return Table(
        f"ovseg vs the naive TAG pipeline ({n['frame'][0]}x{n['frame'][1]} frame, {n['speedup']['n']} paired runs)",
        ["stage", "ovseg p50 ms", "naive p50 ms"],
        "lrr",
        [[s, *("-" if t is None else f"{t:.1f}" for t in (o, v))] for s, o, v in stages if (o, v) != (None, None)],
        [
            f"Same labels on {n['agreement']:.2%} of pixels; speed-up {n['speedup']['p50']:.2f}x (median of pairs; "
            f"{n['speedup_fastest']:.2f}x fastest vs fastest). The naive side is PyTorch eager on the same weights "
            f"(checked: min token cosine {min(n['same_weights_cosine'].values()):.6f}), features upsampled to full "
            "resolution and averaged per mask, brute-force retrieval; k-means is ovseg's kernel on both sides."
        ],
    )


def _backends(doc: dict) -> Table | None:
    if not (points := (doc.get("sweeps") or {}).get("backends")):
        return None
    rows = [
        [p["backend"], p["precision"], *_cells(p["latency"]["stages"], "dinov2:.0f clip:.0f total:.0f"), ""]
        if p.get("latency")
        else [p["backend"], p["precision"], "—", "—", "—", f"not measured: {p['skipped']}"]
        for p in points
    ]
    head = ["backend", "precision", "DINOv2 ms", "CLIP ms", "total ms p50", "note"]
    return Table("Backend and precision", head, "llrrrl", rows)


def _segments(doc: dict) -> Table | None:
    if not (points := (doc.get("sweeps") or {}).get("segments")):
        return None
    rows = [[str(p["k"]), *_cells(p["stages"], "kmeans:.2f pooling:.2f lookup:.3f render:.2f")] for p in points]
    head = ["K", "k-means", "pooling", "lookup", "render"]
    return Table("Segments K (encoder outputs replayed; p50 ms)", head, "rrrrr", rows)


def _video(doc: dict) -> Table | None:
    if not (vid := doc.get("video")):
        return None
    return Table(
        f"Video (`ovseg-run` on the {vid['frame'][0]}x{vid['frame'][1]} sample clip: decode, segment, overlay, save)",
        ["keyframe interval", "frames", "FPS", "wall s", "peak RSS MiB"],
        "rrrrr",
        [_cells(r, "keyframe_interval:d frames:d fps:.2f wall_s:.1f peak_rss_mb:.0f") for r in vid["runs"]],
        [
            f"Keyframe reuse: {vid['speedup']:.2f}x the frame rate; the labels agree with every-frame CLIP on "
            f"{vid['agreement']:.2%} of pixels (random weights: labels are decided by tiny score differences)."
        ],
    )


def model(doc: dict) -> list[Table]:
    """Every table of a run, in order: the main measurement, the targets, the naive reference, the sweeps, the video."""
    tables = (_latency(doc), targets_table(doc), _naive_table(doc), _backends(doc), _segments(doc), _video(doc))
    return [t for t in tables if t is not None]


def _measured_by(doc: dict) -> str:
    env = doc["environment"]
    start, cpus = env.get("load_average_start"), env["logical_cpus"]
    if start is None:
        load = "The load of the machine was not recorded."
    elif start < IDLE_LOAD * cpus:
        load = f"The machine was otherwise idle (load average {start} at the start, on {cpus} CPUs)."
    else:
        load = (
            f"The machine was busy when the run started (load average {start} on {cpus} CPUs), so absolute times "
            "may be inflated and noisy."
        )
    return (
        f"Measured by `ovseg-bench` on {env['cpu_model']} ({cpus} logical CPUs, {', '.join(env['cpu_flags'])}"
        f"{'; no GPU' if env.get('device') == 'cpu' else ''}), "
        f"{env['threads']} threads, onnxruntime {env['onnxruntime']}, ovseg {env['ovseg']}, in "
        f"{doc.get('elapsed_s', 0) / 60:.0f} min. {load} Every ratio below compares runs interleaved in one loop "
        "(ovseg and the naive reference in pairs)."
    )


def table(doc: dict) -> str:
    return _measured_by(doc) + "\n" + render(model(doc), markdown=False)


GPU = Table(
    "GPU",
    ["GPU", "backend", "precision", "S", "DINOv2 ms", "CLIP ms", "total ms", "FPS"],
    "lllrrrrr",
    [[""] * 8],
    [
        "For measurements on a GPU (`ovseg-bench --bundle DIR --backend cuda --precision fp16`, or `--backend tensorrt`)."
    ],
)


def markdown(doc: dict, reproduce: list[str]) -> str:
    """docs/performance.md's tables from one run; ``reproduce`` holds the commands that produce it."""
    head = ["## Performance", "", _measured_by(doc), "", "```sh", *reproduce, "```", "", ""]
    return "\n".join(head) + render([*model(doc), GPU], markdown=True)
