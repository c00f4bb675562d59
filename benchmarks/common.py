"""Shared helpers for benchmarks: timing, XLA FLOP counts, and the environment record printed with every result."""

from __future__ import annotations

import os
import platform
import time

import jax
import numpy as np


def environment() -> dict:
    return {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "device_count": jax.device_count(), "jax": jax.__version__, "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "load_average": os.getloadavg()}


def flops(jitted, *args) -> float | None:
    """FLOPs of one call from XLA's cost analysis (None if unavailable)."""
    try:
        cost = jitted.lower(*args).compile().cost_analysis()
        if isinstance(cost, list):
            cost = cost[0]
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # noqa: BLE001 - cost analysis is best effort
        return None


def timeit(fn, *, repeats: int = 5, warmup: int = 1) -> dict:
    """Compile (first call) and steady-state timings of ``fn()`` (which must block until ready)."""
    t0 = time.perf_counter()
    fn()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"first_call_s": compile_s, "median_s": float(np.median(times)), "min_s": float(np.min(times))}
