"""Does XLA:CPU get faster with bf16 inputs? A large jnp.dot and one ResNet-10/64 3x3 conv, f32 vs bf16, interleaved.

python tools/xla_bf16_dot.py [--n 2048] [--batch 128] [--reps 9] [--json out.json]

Variants per op: ``f32`` (f32 in, f32 out), ``bf16_f32acc`` (bf16 in, ``preferred_element_type=f32``), ``bf16``
(bf16 in, bf16 out). XLA_FLAGS are the library defaults: ``robust_jax.xla_defaults()`` adds
--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce unless XLA_FLAGS already chooses a fusion type (pass
``ROBUST_JAX_XLA_DEFAULTS=0`` or your own XLA_FLAGS to compare). Prints GFLOP/s (median over reps) as JSON, plus
the dot/convolution/custom-call lines of the optimized HLO, so one can see whether bf16 reaches the kernel as bf16
or is converted to f32 first.
"""
import argparse
import json
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from robust_jax import xla_defaults

VARIANTS = {"f32": (jnp.float32, None), "bf16_f32acc": (jnp.bfloat16, jnp.float32), "bf16": (jnp.bfloat16, None)}


def make_dot(pref):
    return jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=pref))


def make_conv(pref):
    return jax.jit(lambda x, w: lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=pref))


def hlo_ops(compiled_text):
    """Parameters, dots, convolutions, converts and fusions of the optimized HLO, without metadata."""
    keys = (" parameter(", " dot(", " convolution(", "custom-call(", " convert(", " fusion(")
    lines = [re.sub(r", metadata=\{[^}]*\}", "", ln.strip()) for ln in compiled_text.splitlines()
             if any(k in ln for k in keys)]
    return [ln[:300] for ln in lines]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--json")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    n, b = a.n, a.batch
    ops = {
        "dot": (make_dot, [rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)],
                2.0 * n ** 3, f"{n}x{n} @ {n}x{n}"),
        "conv3x3": (make_conv, [rng.standard_normal((b, 32, 32, 64), np.float32),
                                0.05 * rng.standard_normal((3, 3, 64, 64), np.float32)],
                    2.0 * b * 32 * 32 * 64 * 64 * 9, f"NHWC {b}x32x32x64 -> 64, 3x3, stride 1, SAME"),
    }
    out = {"env": {"XLA_FLAGS": os.environ.get("XLA_FLAGS"), "jax": jax.__version__,
                   "devices": [str(d) for d in jax.devices()], "load_start": os.getloadavg(), "reps": a.reps},
           "results": {}}
    print(json.dumps(out["env"]), flush=True)
    for name, (make, arrays, flops, desc) in ops.items():
        fns, args, hlo, ref = {}, {}, {}, None
        for v, (dt, pref) in VARIANTS.items():
            args[v] = [jnp.asarray(x, dt) for x in arrays]
            fns[v] = make(pref).lower(*args[v]).compile()  # compiled once; timed below as compiled
            hlo[v] = hlo_ops(fns[v].as_text())
            y = jax.block_until_ready(fns[v](*args[v])).astype(jnp.float32)
            if ref is None:
                ref = y
            err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
            hlo[v] = {"l2_rel_vs_f32": err, "hlo": hlo[v]}
        times = {v: [] for v in VARIANTS}
        cpu = {v: [] for v in VARIANTS}
        for _ in range(a.reps):
            for v in VARIANTS:
                c0, t0 = time.process_time(), time.perf_counter()
                jax.block_until_ready(fns[v](*args[v]))
                t1, c1 = time.perf_counter(), time.process_time()
                times[v].append(t1 - t0)
                cpu[v].append((c1 - c0) / (t1 - t0))
        res = {"what": desc, "gflop": flops / 1e9}
        for v in VARIANTS:
            med = statistics.median(times[v])
            res[v] = {"gflops": flops / med / 1e9, "median_s": med, "min_s": min(times[v]),
                      "cpu_per_wall": statistics.median(cpu[v]), **hlo[v]}
        for v in VARIANTS:
            res[v]["ratio_vs_f32"] = res[v]["gflops"] / res["f32"]["gflops"]
            print(f"{name:8s} {v:12s} {res[v]['gflops']:7.1f} GFLOP/s  x{res[v]['ratio_vs_f32']:.2f}  "
                  f"cpu/wall {res[v]['cpu_per_wall']:.2f}  l2_rel {res[v]['l2_rel_vs_f32']:.2g}", flush=True)
        out["results"][name] = res
    out["env"]["load_end"] = os.getloadavg()
    s = json.dumps(out, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(s + "\n")
    print(s)


if __name__ == "__main__":
    xla_defaults()  # JAX reads XLA_FLAGS when its backend starts, on first use
    main()
