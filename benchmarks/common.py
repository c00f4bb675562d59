"""Shared helpers for benchmarks: timing, XLA FLOP counts, and the environment record printed with every result."""

from __future__ import annotations

import os
import platform
import time

import jax
import numpy as np


def cpu() -> dict:
    """CPU model and the ISA extensions that decide convolution speed (from /proc/cpuinfo; empty elsewhere).

    Matters for comparisons across sessions: an Ice Lake host (avx512 + vnni, no bf16 / AMX) and a Sapphire Rapids
    host (AMX-BF16) differ by several times in reachable bf16 throughput."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return {}
    field = lambda k: next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith(k)), "")
    flags_ = set(field("flags").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags_]
    return {"model_name": field("model name"), "family": field("cpu family"), "model": field("model"),
            "isa": isa}


def environment() -> dict:
    return {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "device_count": jax.device_count(), "jax": jax.__version__, "machine": platform.machine(),
            "cpu": cpu(), "cpu_count": os.cpu_count(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "load_average": os.getloadavg()}


def onednn_environment(conv_impls) -> dict:
    """oneDNN version / ISA / threads when a oneDNN ``conv_impl`` is benchmarked (so numbers say which kernels made
    them), or why it is unavailable (then those variants run the fallback convolution); {} otherwise."""
    from robust_jax import models

    unknown = [i for i in conv_impls if i not in models.CONV_IMPLS]
    if unknown:
        raise ValueError(f"unknown conv_impls {unknown}; use {models.CONV_IMPLS}")
    if not any(i.startswith("onednn") for i in conv_impls):
        return {}
    from robust_jax import onednn

    reason = onednn.unavailable_reason()
    return {"onednn": onednn.info() if reason is None else {"unavailable": reason}}


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


def compile_timed(jitted, *args):
    """(compiled executable, seconds to lower and compile) — compile time without the first run."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def compiled_flops(compiled, conv_impl: str = "custom_vjp") -> float | None:
    """FLOPs of one call of a compiled executable from XLA's cost analysis (None if unavailable; always None for the
    oneDNN ``conv_impl``s, whose custom calls the cost analysis does not see into)."""
    if conv_impl.startswith("onednn"):
        return None
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, list):
            cost = cost[0]
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # noqa: BLE001 - cost analysis is best effort
        return None


def interleaved(fns: dict, *, repeats: int = 3, warmup: int = 1, log=None) -> dict:
    """A/B(/C...) timing under a noisy load: every round calls each ``fns[name]()`` (which must block until ready)
    once, in turn, so all variants see the same load; per variant the median, min and all times, plus the load
    average at the end. ``warmup`` untimed rounds first (the first call of an executable is slower)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        if log is not None:
            log({"round": r, **{n: round(t[-1], 3) for n, t in times.items()}, "load_average": os.getloadavg()})
    return {name: {"median_s": float(np.median(t)), "min_s": float(np.min(t)), "times_s": [round(v, 4) for v in t]}
            for name, t in times.items()}
