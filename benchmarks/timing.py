"""Timing primitives of ovseg-bench: a time-bounded runner with warm-up, latency statistics, the machine's description.

Other engineers' tests share this machine, so absolute times are noisy: every comparison in
ovseg-bench is a ratio of runs interleaved in one loop, and the load average is recorded with them.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ovseg.environment import cpu_model


@dataclass
class Budget:
    """How long to measure: ``warmup`` untimed calls, then at least ``min_runs`` and until ``seconds`` have passed."""

    warmup: int = 2
    min_runs: int = 20
    seconds: float = 30.0
    max_runs: int = 10_000


@dataclass
class Stats:
    """Latency of one quantity over n runs, in milliseconds; fps = 1000 / mean."""

    n: int
    mean: float
    std: float
    min: float
    p50: float
    p90: float
    p99: float
    fps: float

    @classmethod
    def of(cls, samples_ms) -> Stats:
        v = np.asarray(list(samples_ms), np.float64)
        if v.size == 0:
            raise ValueError("no samples to summarise")
        p50, p90, p99 = np.percentile(v, [50, 90, 99])
        mean = float(v.mean())
        return cls(
            int(v.size),
            mean,
            float(v.std()),
            float(v.min()),
            float(p50),
            float(p90),
            float(p99),
            1000.0 / mean if mean > 0 else float("inf"),
        )


def repeat(call: Callable[[int], None], budget: Budget) -> int:
    """Call ``call(i)`` for i = 0, 1, ... (warm-up calls included); return how many calls were timed.

    The caller records its own samples for i >= budget.warmup; the loop stops at ``max_runs`` timed
    calls, or once ``min_runs`` are done and ``seconds`` have passed since the first timed call.
    """
    for i in range(budget.warmup):
        call(i)
    start = time.perf_counter()
    runs = 0
    while runs < budget.max_runs and (runs < budget.min_runs or time.perf_counter() - start < budget.seconds):
        call(budget.warmup + runs)
        runs += 1
    return runs


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident set size of this process (or of its largest waited-for child), MiB."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return usage.ru_maxrss * scale / 2**20


def cpu_flags() -> list[str]:
    """The SIMD extensions GEMM speed depends on (from /proc/cpuinfo)."""
    wanted = (
        "avx",
        "avx2",
        "fma",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_int8",
        "amx_bf16",
        "neon",
        "asimd",
    )
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def environment(threads: int) -> dict:
    """Device, CPU, threads and versions, recorded with every result."""
    import onnxruntime as ort

    try:
        from importlib.metadata import version

        ovseg_version = version("ovseg")
    except Exception:
        ovseg_version = "unknown"
    providers = ort.get_available_providers()
    gpu = [p for p in providers if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    return {
        "device": "gpu" if gpu else "cpu",
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "ort_providers": providers,
        "ovseg": ovseg_version,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_start": round(os.getloadavg()[0], 2),
    }
