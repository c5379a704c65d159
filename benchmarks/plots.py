"""PNG charts of ovseg-bench results (matplotlib, no display needed): one function per chart, each reading the results dict."""

from __future__ import annotations

from pathlib import Path

from .report import STAGE_ORDER, size_text


def write_plots(doc: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for chart in (stage_breakdown, latency_vs_size, latency_vs_k, lookup_vs_vocabulary, recall_vs_ef):
        path = chart(doc, out)
        if path is not None:
            written.append(path)
    return written


def _title(doc: dict, text: str) -> str:
    env = doc["environment"]
    return f"{text}\n{env['cpu_model']}, {env['threads']} threads, onnxruntime {env['onnxruntime']}"


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def stage_breakdown(doc: dict, out: Path) -> Path | None:
    """p50 per stage: ovseg, and the naive reference when it ran (log scale: encoders are 1000x the rest)."""
    import matplotlib.pyplot as plt
    import numpy as np

    lat = doc.get("latency")
    if not lat:
        return None
    series = {"ovseg (main run)": lat["stages"]}
    naive = doc.get("naive")
    if naive:
        series = {"ovseg (paired with naive)": naive["ovseg"], "naive TAG (torch eager)": naive["naive"]}
    stages = [s for s in STAGE_ORDER if any(s in st for st in series.values())]
    x = np.arange(len(stages))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for i, (name, st) in enumerate(series.items()):
        values = [st[s]["p50"] if s in st else 0 for s in stages]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
        for bar, v in zip(bars, values):
            if v > 0:
                ax.annotate(_ms(v), (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(x, stages)
    ax.set_ylabel("p50 latency per frame, ms (log)")
    ax.set_title(_title(doc, f"Stage breakdown at {size_text(lat)} ({lat['backend']} {lat['precision']})"))
    ax.legend()
    return _save(fig, out / "stage_breakdown.png")


def latency_vs_size(doc: dict, out: Path) -> Path | None:
    import matplotlib.pyplot as plt

    points = [p for p in (doc.get("sweeps") or {}).get("input_size") or [] if p.get("latency")]
    if not points:
        return None
    sizes = [p["size"] for p in points]
    st = [p["latency"]["stages"] for p in points]
    dino = [s["dinov2"]["p50"] for s in st]
    clip = [s["clip"]["p50"] for s in st]
    rest = [s["total"]["p50"] - d - c for s, d, c in zip(st, dino, clip)]
    labels = [str(s) for s in sizes]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    ax.bar(labels, dino, label="DINOv2")
    ax.bar(labels, clip, bottom=dino, label="CLIP")
    ax.bar(labels, rest, bottom=[d + c for d, c in zip(dino, clip)], label="everything else")
    for i, s in enumerate(st):
        ax.annotate(
            f"{s['total']['p50']:.0f} ms\n{1000 / s['total']['p50']:.2f} FPS",
            (i, s["total"]["p50"]),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xlabel("input size S (S x S)")
    ax.set_ylabel("p50 latency per frame, ms")
    ax.set_ylim(0, max(s["total"]["p50"] for s in st) * 1.2)
    skipped = [f"{p['size']}" for p in (doc.get("sweeps") or {}).get("input_size") if not p.get("latency")]
    ax.set_title(
        _title(doc, "End-to-end latency vs input size" + (f" (not measured: {', '.join(skipped)})" if skipped else ""))
    )
    ax.legend(loc="upper left")
    return _save(fig, out / "latency_vs_size.png")


def latency_vs_k(doc: dict, out: Path) -> Path | None:
    import matplotlib.pyplot as plt

    points = (doc.get("sweeps") or {}).get("segments") or []
    if not points:
        return None
    ks = [p["k"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stage in ("kmeans", "pooling", "lookup", "render"):
        ax.plot(ks, [p["stages"][stage]["p50"] for p in points], marker="o", label=stage)
    ax.set_xlabel("segments K")
    ax.set_ylabel("p50 ms per frame")
    ax.set_title(_title(doc, "Stages that depend on K (encoder outputs replayed)"))
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, out / "latency_vs_k.png")


def lookup_vs_vocabulary(doc: dict, out: Path) -> Path | None:
    import matplotlib.pyplot as plt

    vocab = (doc.get("sweeps") or {}).get("vocabulary")
    if not vocab or not vocab["points"]:
        return None
    ef = str(vocab["default_ef"])
    sizes = [p["size"] for p in vocab["points"]]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for key, name, marker in (("exact", "exact (one matrix product)", "o"), ("hnsw", f"HNSW (hnswlib, ef={ef})", "s")):
        stats = [p[key] if key == "exact" else p[key][ef] for p in vocab["points"]]
        (line,) = ax.loglog(sizes, [s["p50"] for s in stats], marker=marker, label=f"{name}, median")
        ax.loglog(
            sizes,
            [s["min"] for s in stats],
            marker=marker,
            linestyle="--",
            alpha=0.5,
            color=line.get_color(),
            label=f"{name}, fastest run",
        )
    ax.axhline(1.0, color="grey", linestyle=":", label="1 ms target")
    if vocab.get("crossover"):
        ax.axvline(
            vocab["crossover"], color="red", linestyle=":", label=f"crossover (medians) ~{vocab['crossover']:,.0f}"
        )
    ax.set_xlabel(f"vocabulary size (phrase embeddings, D={vocab['dim']})")
    ax.set_ylabel(f"ms per frame ({vocab['queries_per_frame']} queries, top-{vocab['top_k']})")
    ax.set_title(_title(doc, "Label lookup time vs vocabulary size"))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out / "lookup_vs_vocabulary.png")


def recall_vs_ef(doc: dict, out: Path) -> Path | None:
    import matplotlib.pyplot as plt

    vocab = (doc.get("sweeps") or {}).get("vocabulary")
    if not vocab or not vocab["points"]:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for p in vocab["points"]:
        efs = sorted(int(e) for e in p["recall"])
        (line,) = left.plot(efs, [p["recall"][str(e)] for e in efs], marker="o", label=f"{p['size']:,}")
        right.plot(
            efs,
            [p["hnsw"][str(e)]["p50"] for e in efs],
            marker="o",
            color=line.get_color(),
            label=f"{p['size']:,} (M={p['hnsw_params']['M']})",
        )
    left.axhline(0.99, color="grey", linestyle=":", label="0.99 target")
    left.set_xscale("log", base=2)
    left.set_xlabel("ef (search breadth)")
    left.set_ylabel("recall@1 vs exact")
    left.set_title("HNSW recall@1 vs ef")
    left.legend(fontsize=7)
    right.axhline(1.0, color="grey", linestyle=":", label="1 ms target")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("ef")
    right.set_ylabel("p50 ms per frame")
    right.set_title("HNSW lookup time vs ef")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(_title(doc, "HNSW: recall and time vs ef"), fontsize=10)
    return _save(fig, out / "hnsw_recall_vs_ef.png")
