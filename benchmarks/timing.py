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

import ovseg
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
        mean = float(v.mean())
        p50, p90, p99 = (float(x) for x in np.percentile(v, [50, 90, 99]))
        return cls(
            v.size, mean, float(v.std()), float(v.min()), p50, p90, p99, 1000.0 / mean if mean > 0 else float("inf")
        )


def repeat(call: Callable[[int], None], budget: Budget) -> None:
    """Call ``call(i)`` for i = 0, 1, ... (warm-up calls included); the caller records its own samples for
    i >= budget.warmup. The loop stops at ``max_runs`` timed calls, or once ``min_runs`` are done and ``seconds`` have
    passed since the first timed call."""
    for i in range(budget.warmup):
        call(i)
    start, runs = time.perf_counter(), 0
    while runs < budget.max_runs and (runs < budget.min_runs or time.perf_counter() - start < budget.seconds):
        call(budget.warmup + runs)
        runs += 1


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MiB."""
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def cpu_flags() -> list[str]:
    """The SIMD extensions GEMM speed depends on (from /proc/cpuinfo)."""
    wanted = "avx avx2 fma avx512f avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16 neon asimd".split()
    try:
        with open("/proc/cpuinfo") as f:
            have = next(
                (set(line.split(":", 1)[1].split()) for line in f if line.startswith(("flags", "Features"))), set()
            )
    except OSError:
        return []
    return [w for w in wanted if w in have]


def environment(threads: int) -> dict:
    """Device, CPU, threads and versions, recorded with every result."""
    import onnxruntime as ort

    providers = ort.get_available_providers()
    gpu = [p for p in providers if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    return {
        "device": "gpu" if gpu else "cpu",
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "ort_providers": providers,
        "ovseg": ovseg.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_start": round(os.getloadavg()[0], 2),
    }
