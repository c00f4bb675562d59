"""Per-layer GFLOP/s: XLA f32 vs oneDNN (f32, bf16) for the ResNet-10/64 CIFAR conv shapes; interleaved A/B.

python bench_layers.py [--batch 128] [--reps 7] [--variants xla,dnnl_f32,dnnl_bf16] [--json out.json]
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce")

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax
from shapes import flops, resnet10_cifar_shapes

from robust_jax import onednn as oc

DN = ("NHWC", "HWIO", "NHWC")


def xla_fns(s, p):
    conv = lambda x, w: lax.conv_general_dilated(x, w, s, p, dimension_numbers=DN)  # noqa: E731
    fwd = jax.jit(conv)
    bwd_data = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    bwd_weights = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    return {"fwd": lambda x, w, g: fwd(x, w), "bwd_data": bwd_data, "bwd_weights": bwd_weights}


def dnnl_fns(s, p, xs, ws):
    pads = oc._pads(xs, ws, s, p)
    ys = oc._out_shape(xs, ws, s, pads)
    fwd = jax.jit(lambda x, w: oc._call("onednn_conv_fwd", ys, x, w, s, pads))
    bd = jax.jit(lambda g, w: oc._call("onednn_conv_bwd_data", xs, g, w, s, pads))
    bw = jax.jit(lambda x, g: oc._call("onednn_conv_bwd_weights", ws, x, g, s, pads))
    return {"fwd": lambda x, w, g: fwd(x, w), "bwd_data": lambda x, w, g: bd(g, w),
            "bwd_weights": lambda x, w, g: bw(x, g)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--variants", default="xla,dnnl_f32,dnnl_bf16")
    ap.add_argument("--json")
    a = ap.parse_args()
    variants = a.variants.split(",")
    print(oc.info(), "XLA_FLAGS=", os.environ.get("XLA_FLAGS"), "load", os.getloadavg())
    results = []
    for name, xs, ws, s, p in resnet10_cifar_shapes(a.batch):
        k = jax.random.split(jax.random.PRNGKey(0), 3)
        x = jax.random.normal(k[0], xs)
        w = jax.random.normal(k[1], ws) * 0.05
        g = jax.random.normal(k[2], oc._out_shape(xs, ws, s, oc._pads(xs, ws, s, p)))
        args, fns = {}, {}
        for v in variants:
            if v == "xla":
                fns[v], args[v] = xla_fns(s, p), (x, w, g)
            else:
                dt = jnp.bfloat16 if v.endswith("bf16") else jnp.float32
                fns[v], args[v] = dnnl_fns(s, p, xs, ws), tuple(t.astype(dt) for t in (x, w, g))
        fl = flops(xs, ws, s, p)
        row = {"layer": name, "gflop": fl / 1e9}
        for d in ("fwd", "bwd_data", "bwd_weights"):
            times = {v: [] for v in variants}
            cpu = {v: [] for v in variants}
            for v in variants:  # warm-up / compile
                jax.block_until_ready(fns[v][d](*args[v]))
            for _ in range(a.reps):
                for v in variants:
                    c0, t0 = time.process_time(), time.perf_counter()
                    jax.block_until_ready(fns[v][d](*args[v]))
                    t1, c1 = time.perf_counter(), time.process_time()
                    times[v].append(t1 - t0)
                    cpu[v].append((c1 - c0) / (t1 - t0))
            for v in variants:
                med = statistics.median(times[v])
                row[f"{d}/{v}"] = fl / med / 1e9
                row[f"{d}/{v}/cpu_per_wall"] = statistics.median(cpu[v])
        results.append(row)
        dirs = ("fwd", "bwd_data", "bwd_weights")
        print(f"{name:24s} "
              + "  ".join(f"{d}: " + " ".join(f"{row[f'{d}/{v}']:6.1f}" for v in variants) for d in dirs),
              "| per CPU-s " + "  ".join(
                  " ".join(f"{row[f'{d}/{v}'] / row[f'{d}/{v}/cpu_per_wall']:6.1f}" for v in variants) for d in dirs),
              flush=True)
    # FLOP-weighted totals (time-sum over all layers)
    tot = {}
    for d in ("fwd", "bwd_data", "bwd_weights"):
        for v in variants:
            t = sum(r["gflop"] / r[f"{d}/{v}"] for r in results)
            tot[f"{d}/{v}"] = sum(r["gflop"] for r in results) / t
    print("TOTAL (sum FLOP / sum time) GFLOP/s:", {k: round(val, 1) for k, val in tot.items()})
    print("load", os.getloadavg())
    if a.json:
        json.dump({"rows": results, "total": tot, "load_end": os.getloadavg(), "variants": variants}, open(a.json, "w"),
                  indent=1)


if __name__ == "__main__":
    main()
