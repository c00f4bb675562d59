"""Does the oneDNN thread setting take effect? Per-thread CPU time (from /proc/self/task) and wall time while running
one conv repeatedly, for ``robust_jax.onednn.set_threads(n)`` with n = 1 and 2 (and XLA's own conv for reference).

With 1 thread, one thread (the calling XLA thread) does all the oneDNN work; with 2, an OpenMP worker shares it.
The bf16 backward-weights of the 3x3 64->128 stride-2 layer is the case that collapses with 2 threads on Zen 5.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce")
import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from robust_jax import onednn as oc  # noqa: E402

TCK = os.sysconf("SC_CLK_TCK")


def thread_cpu():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            f = open(f"/proc/self/task/{tid}/stat").read()
            comm = f[f.index("(") + 1:f.rindex(")")]
            fields = f[f.rindex(")") + 2:].split()
            out[tid] = (comm, (int(fields[11]) + int(fields[12])) / TCK)
        except FileNotFoundError:
            pass
    return out


def profile(name, fn, *args, n=10):
    jax.block_until_ready(fn(*args))
    a, t0 = thread_cpu(), time.perf_counter()
    for _ in range(n):
        jax.block_until_ready(fn(*args))
    wall, b = time.perf_counter() - t0, thread_cpu()
    d = sorted(((b[t][1] - a.get(t, ("", 0))[1], b[t][0], t) for t in b), reverse=True)
    busy = [(round(c, 2), comm) for c, comm, _ in d if c > 0.02]
    row = {"name": name, "ms_per_call": 1000 * wall / n, "cpu_s": sum(c for c, _, _ in d), "wall_s": wall,
           "busy_threads": busy}
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over thread counts")
    ap.add_argument("--json")
    a = ap.parse_args()
    env = {"onednn": oc.info(), "load_start": os.getloadavg()}
    print(env)
    x = jax.random.normal(jax.random.PRNGKey(0), (128, 32, 32, 64))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 64, 128)) * 0.05
    s, pads = (2, 2), ((1, 1), (1, 1))
    ys = oc._out_shape(x.shape, w.shape, s, pads)
    g = jax.random.normal(jax.random.PRNGKey(2), ys)
    xb, gb, wb = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    fwd = jax.jit(lambda x, w: oc._call("onednn_conv_fwd", ys, x, w, s, pads))
    bww = jax.jit(lambda x, g: oc._call("onednn_conv_bwd_weights", w.shape, x, g, s, pads))
    xla = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, s, pads, dimension_numbers=("NHWC", "HWIO", "NHWC")))
    rows = [profile("xla f32 fwd", xla, x, w)]
    for _ in range(a.rounds):
        for n in (1, 2):
            oc.set_threads(n)
            rows.append(profile(f"threads={n} onednn f32 fwd", fwd, x, w))
            rows.append(profile(f"threads={n} onednn bf16 fwd", fwd, xb, wb))
            rows.append(profile(f"threads={n} onednn bf16 bwd_weights", bww, xb, gb))
    env["load_end"] = os.getloadavg()
    print(env["load_end"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
