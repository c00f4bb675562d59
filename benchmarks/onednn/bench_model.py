"""ResNet-10/64 (CIFAR stem) throughput: XLA f32 vs oneDNN convs (f32 / bf16), interleaved in one process.

python bench_model.py [--what fwdgrad,train] [--variants xla,dnnl_f32,dnnl_bf16] [--reps 9] [--json out.json]

Uses robust_jax.models.ResNet10 and robust_jax.training's train step, with ``conv_impl`` set per variant: ``"xla"``
(plain ``lax.conv_general_dilated``) or ``robust_jax.onednn.make_conv_general_dilated(dtype)``; the lowered HLO is
checked for the oneDNN custom calls. oneDNN threads per call: ``$ROBUST_JAX_ONEDNN_THREADS`` (default 0 = OpenMP's
default, which is what the prototype's runs without OMP_NUM_THREADS used).
XLA_FLAGS defaults to robust_jax's --xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from robust_jax import models, training, transforms  # noqa: E402
from robust_jax import onednn as oc  # noqa: E402


def conv_for(variant):
    if variant == "xla":
        return "xla"
    return oc.make_conv_general_dilated(jnp.bfloat16 if "bf16" in variant else jnp.float32)


def fwd_input_grad(model):
    """Jitted gradient of the mean CE loss w.r.t. the input images (eval mode): the inner step of PGD."""
    return jax.jit(jax.grad(lambda v, x, y: training.cross_entropy(model.apply(v, x), y).mean(), argnums=1))


def set_mode(variant):
    """Suffix _conc: let XLA run independent oneDNN calls concurrently (default: serialized)."""
    if variant != "xla":
        oc.set_serialize(not variant.endswith("_conc"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", default="fwdgrad,train")
    ap.add_argument("--variants", default="xla,dnnl_f32,dnnl_bf16")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--train_batch", type=int, default=128)
    ap.add_argument("--fwdgrad_batch", type=int, default=256)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--json")
    a = ap.parse_args()
    variants = a.variants.split(",")
    env = {"onednn": oc.info(), "XLA_FLAGS": os.environ.get("XLA_FLAGS"), "load_start": os.getloadavg(),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    print(env, flush=True)
    rng = np.random.default_rng(0)
    out = {"env": env, "results": {}}
    for what in a.what.split(","):
        bs = a.train_batch if what == "train" else a.fwdgrad_batch
        x = jnp.asarray(rng.integers(0, 256, (bs, 32, 32, 3), dtype=np.uint8))
        y = jnp.asarray(rng.integers(0, 10, bs))
        fns, args, compile_s, lower_compile = {}, {}, {}, {}
        for v in variants:
            m = models.ResNet10(width=a.width, conv_impl=conv_for(v))
            if what == "train":  # SGD-Nesterov + weight decay, flips+crops, BatchNorm in train mode
                tx = training.make_optimizer("sgd", 0.05, total_steps=1000, weight_decay=5e-4)
                state = training.create_train_state(m, tx, jax.random.PRNGKey(0), (32, 32, 3))
                fns[v] = training.make_train_step(m, tx, augment_fn=transforms.flip_crop, donate=False)
                args[v] = (state, x, y)
            else:
                fns[v] = fwd_input_grad(m)
                args[v] = (m.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))), x.astype(jnp.float32) / 255, y)
            t0 = time.perf_counter()
            lowered = fns[v].lower(*args[v])
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
            lower_compile[v] = (t1 - t0, t2 - t1)
            set_mode(v)
            t0 = time.perf_counter()
            jax.block_until_ready(fns[v](*args[v]))  # primitive creation + 1 run (compiled above)
            compile_s[v] = time.perf_counter() - t0
            n_ffi = lowered.as_text().count("custom_call @onednn_conv")
            print(f"  {what} {v}: {n_ffi} oneDNN custom calls in the HLO; trace+lower {lower_compile[v][0]:.1f}s, "
                  f"XLA compile "
                  f"{lower_compile[v][1]:.1f}s, first call (oneDNN primitive creation + 1 step) {compile_s[v]:.1f}s",
                  flush=True)
            assert (n_ffi > 0) == (v != "xla"), "oneDNN convs not used" if v != "xla" else "unexpected custom calls"
        if what == "fwdgrad":  # the input gradient agrees with XLA's
            ref = fns[variants[0]](*args[variants[0]])
            for v in variants[1:]:
                set_mode(v)
                g = fns[v](*args[v])
                err = {"max_rel": float(jnp.max(jnp.abs(g - ref)) / jnp.max(jnp.abs(ref))),
                       "l2_rel": float(jnp.linalg.norm(g - ref) / jnp.linalg.norm(ref)),
                       "sign_agree": float(jnp.mean(jnp.sign(g) == jnp.sign(ref)))}
                out.setdefault("input_grad_error", {})[v] = err
                print(f"  input gradient {v} vs {variants[0]}: "
                      + ", ".join(f"{k} {val:.3g}" for k, val in err.items()),
                      flush=True)
        times = {v: [] for v in variants}
        cpu = {v: [] for v in variants}
        for _ in range(a.reps):
            for v in variants:
                set_mode(v)
                c0, t0 = time.process_time(), time.perf_counter()
                jax.block_until_ready(fns[v](*args[v]))
                t1, c1 = time.perf_counter(), time.process_time()
                times[v].append(t1 - t0)
                cpu[v].append((c1 - c0) / (t1 - t0))
        res = {v: {"img_per_s": bs / statistics.median(times[v]), "first_call_s": compile_s[v],
                   "cpu_per_wall": statistics.median(cpu[v]), "times": times[v],
                   "trace_lower_s": lower_compile[v][0], "xla_compile_s": lower_compile[v][1]} for v in variants}
        base = res[variants[0]]["img_per_s"]
        for v in variants:
            res[v]["ratio_vs_" + variants[0]] = res[v]["img_per_s"] / base
            print(f"{what:8s} batch {bs} {v:10s} {res[v]['img_per_s']:7.1f} img/s  x{res[v]['img_per_s'] / base:.2f}"
                  f"  first call {compile_s[v]:.1f}s  cpu/wall {res[v]['cpu_per_wall']:.2f}", flush=True)
        out["results"][what] = res
    out["env"]["load_end"] = os.getloadavg()
    print("load", os.getloadavg())
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
