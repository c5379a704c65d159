"""INT8 vs fp32 image encoders of a bundle on this machine: per encoder, runs interleaved in one process, ratios.

    python -m ovseg.benchmarks.bench_int8 --bundle DIR [--json OUT] [--seconds 30] [--min-runs 10] [--threads N] [--profile]

Each timed iteration runs fp32 and int8 back to back (order alternating), so load from other processes hits both
alike; the speed-up is the ratio of median latencies (also of minima, and of process CPU time, which contention
barely moves). PASS when the speed-up reaches the target (1.8x) and the bundle's int8 gate passed; MISS otherwise.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

import ovseg.cli
from ovseg.benchmarks.targets import INT8_MIN_SPEEDUP
from ovseg.benchmarks.timing import Budget, Stats, environment, repeat
from ovseg.runtime.bundle.manifest import BundleError, read_manifest

PROG = "bench_int8"

ENCODERS = {"clip": "CLIP image", "dinov2": "DINOv2"}


def measure(fp32_path: Path, int8_path: Path, image_size: int, threads: int | None, budget: Budget) -> dict:
    """Interleaved latency of the two files on one (1, 3, S, S) input."""
    from ovseg.calib.gate import session

    sessions = {"fp32": session(fp32_path, threads), "int8": session(int8_path, threads)}
    feed = {
        sessions["fp32"].get_inputs()[0].name: np.random.default_rng(0).standard_normal(
            (1, 3, image_size, image_size), np.float32
        )
    }
    wall: dict[str, list[float]] = {"fp32": [], "int8": []}
    cpu: dict[str, list[float]] = {"fp32": [], "int8": []}

    def call(i: int) -> None:
        for name in ("fp32", "int8") if i % 2 == 0 else ("int8", "fp32"):
            start, start_cpu = time.perf_counter(), time.process_time()
            sessions[name].run(None, feed)
            if i >= budget.warmup:
                wall[name].append((time.perf_counter() - start) * 1e3)
                cpu[name].append((time.process_time() - start_cpu) * 1e3)

    runs = repeat(call, budget)
    stats = {name: Stats.of(samples) for name, samples in wall.items()}
    cpu_p50 = {name: float(np.median(samples)) for name, samples in cpu.items()}
    return {
        "runs": runs,
        "fp32": asdict(stats["fp32"]),
        "int8": asdict(stats["int8"]),
        "cpu_ms_p50": cpu_p50,
        "speedup_p50": stats["fp32"].p50 / stats["int8"].p50,
        "speedup_min": stats["fp32"].min / stats["int8"].min,
        "speedup_cpu": cpu_p50["fp32"] / cpu_p50["int8"],
    }


def op_split(
    fp32_path: Path, model_path: Path, image_size: int, threads: int | None, runs: int = 3
) -> dict[str, float]:
    """Milliseconds per op group (weight GEMMs, attention MatMuls, softmax, other) from ORT's profiler, per-node minimum
    over ``runs`` runs. It says where int8 can help: only weight GEMMs are quantised, so 1 / (1 - their share of fp32
    time) bounds the speed-up."""
    import onnx
    import onnxruntime as ort

    from ovseg.calib.quantize import attention_matmuls
    from ovseg.onnx_helpers import session_options

    attention = set(attention_matmuls(onnx.load(str(fp32_path), load_external_data=False)))
    options = session_options(threads)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: np.zeros((1, 3, image_size, image_size), np.float32)}
        for _ in range(runs + 1):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[str, list[float]] = {}
    op_of: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"].removesuffix("_kernel_time")
            per_node.setdefault(name, []).append(e["dur"] / 1e3)
            op_of[name] = e["args"]["op_name"]
    groups = dict.fromkeys(("weight GEMMs", "attention MatMuls", "softmax", "other"), 0.0)
    for name, durations in per_node.items():
        op = op_of[name]
        if op == "FusedMatMul" or (op == "MatMul" and name in attention):
            group = "attention MatMuls"
        elif op in ("MatMul", "Gemm", "Conv", "MatMulIntegerToFloat", "QLinearMatMul", "QLinearConv"):
            group = "weight GEMMs"
        else:
            group = "softmax" if op == "Softmax" else "other"
        groups[group] += min(durations[1:] or durations)  # the first run warms up
    return groups


def run(bundle: Path, threads: int | None, budget: Budget, profile: bool = False) -> dict:
    manifest = read_manifest(bundle)
    gate = manifest.gates.get("int8")
    missing = [role for role in ENCODERS if "int8" not in getattr(manifest, role).files]
    if missing or gate is None:
        raise BundleError(
            f"{bundle} has no gated int8 {', '.join(missing) or 'encoders'}: run `ovseg-calib --bundle {bundle} --calib-images DIR` first"
        )
    report = {
        "environment": environment(threads or 0),
        "target": INT8_MIN_SPEEDUP,
        "bundle": str(bundle),
        "gate": gate,
        "encoders": {},
    }
    for role, title in ENCODERS.items():
        info = getattr(manifest, role)
        print(
            f"{title}: {info.files['fp32']} vs {info.files['int8']} at {info.image_size}x{info.image_size} ...",
            flush=True,
        )
        result = measure(bundle / info.files["fp32"], bundle / info.files["int8"], info.image_size, threads, budget)
        model_gate = gate.get("models", {}).get(role, {})
        result["gate_min_cosine"] = model_gate.get("min_cosine")
        result["weights"] = info.weights
        result["verdict"] = "PASS" if result["speedup_p50"] >= INT8_MIN_SPEEDUP and gate.get("passed") else "MISS"
        if profile:
            split = {
                p: op_split(bundle / info.files["fp32"], bundle / info.files[p], info.image_size, threads)
                for p in ("fp32", "int8")
            }
            share = split["fp32"]["weight GEMMs"] / sum(split["fp32"].values())
            result["op_split_ms"] = split
            result["ceiling_if_weight_gemms_free"] = 1.0 / (1.0 - share)
        report["encoders"][role] = result
    report["environment"]["load_average_end"] = round(os.getloadavg()[0], 2)
    return report


def table(report: dict) -> str:
    env, gate = report["environment"], report["gate"]
    lines = [
        f"{env['cpu_model']} ({', '.join(env['cpu_flags'])}), {env['logical_cpus']} logical CPUs, onnxruntime {env['onnxruntime']}, "
        f"load average {env['load_average_start']} -> {env['load_average_end']}",
        f"int8 gate: {'passed' if gate.get('passed') else 'FAILED'} (min cosine {gate.get('min_cosine', float('nan')):.4f}, "
        f"label agreement {gate.get('label_agreement', float('nan')):.3f}, {gate.get('weights', '')})",
        f"{'encoder':10s} {'fp32 p50':>9s} {'int8 p50':>9s} {'x p50':>6s} {'x min':>6s} {'x cpu':>6s} {'runs':>5s}  cosine  verdict (target {report['target']}x)",
    ]
    for role, r in report["encoders"].items():
        cos = r["gate_min_cosine"]
        lines.append(
            f"{role:10s} {r['fp32']['p50']:8.0f}ms {r['int8']['p50']:8.0f}ms {r['speedup_p50']:5.2f}x {r['speedup_min']:5.2f}x "
            f"{r['speedup_cpu']:5.2f}x {r['runs']:5d}  {cos if cos is None else f'{cos:.4f}'}  {r['verdict']}  ({r['weights']})"
        )
    for role, r in report["encoders"].items():
        if "op_split_ms" in r:
            for p, split in r["op_split_ms"].items():
                total = sum(split.values())
                lines.append(
                    f"  {role} {p}: "
                    + ", ".join(f"{g} {ms:.0f}ms ({100 * ms / total:.0f}%)" for g, ms in split.items())
                )
            lines.append(
                f"  {role}: int8 quantises only the weight GEMMs: even at zero cost the speed-up is at most {r['ceiling_if_weight_gemms_free']:.2f}x"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ovseg.benchmarks.bench_int8",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--bundle", type=Path, required=True, metavar="DIR", help="a bundle with int8 encoders (ovseg-calib)"
    )
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the full report as JSON")
    p.add_argument("--seconds", type=float, default=30.0, help="measure each encoder at least this long (default 30)")
    p.add_argument(
        "--min-runs", type=int, default=10, help="and at least this many interleaved iterations (default 10)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores, as the runtime)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also split each encoder's time by op group (ORT profiler) and bound the speed-up",
    )
    args = p.parse_args(argv)
    return ovseg.cli.run_cli(PROG, functools.partial(bench, args))


def bench(args: argparse.Namespace) -> int:
    report = run(
        args.bundle.expanduser(),
        args.threads,
        Budget(warmup=2, min_runs=args.min_runs, seconds=args.seconds),
        args.profile,
    )
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
