"""Which threads do the work? Per-thread CPU time (from /proc/self/task) while running one conv repeatedly.

Shows that oneDNN's OpenMP team (the calling XLA thread + 1 OpenMP worker) shares the work ~evenly, and compares
with XLA's own conv. Load-independent evidence of 2-core use (the machine is shared, so wall times are not).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce")
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import onednn_conv as oc  # noqa: E402
from jax import lax  # noqa: E402

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


def profile(name, fn, *args, n=20):
    jax.block_until_ready(fn(*args))
    a, t0 = thread_cpu(), time.perf_counter()
    for _ in range(n):
        jax.block_until_ready(fn(*args))
    wall, b = time.perf_counter() - t0, thread_cpu()
    d = sorted(((b[t][1] - a.get(t, ("", 0))[1], b[t][0], t) for t in b), reverse=True)
    busy = [(round(c, 2), comm) for c, comm, _ in d if c > 0.02]
    print(f"{name:28s} wall {wall:.2f}s  cpu {sum(c for c, _, _ in d):.2f}s  busy threads (cpu s, name): {busy}")


x = jax.random.normal(jax.random.PRNGKey(0), (128, 32, 32, 64))
w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 64, 64)) * 0.05
pads = ((1, 1), (1, 1))
dn = ("NHWC", "HWIO", "NHWC")
print("load", os.getloadavg())
profile("xla f32 fwd", jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=dn)), x, w)
f = jax.jit(lambda x, w: oc._call("onednn_conv_fwd", x.shape[:3] + w.shape[3:], x, w, (1, 1), pads))
profile("onednn f32 fwd", f, x, w)
profile("onednn bf16 fwd", f, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
g = jax.jit(lambda x, w: jax.grad(lambda x, w: oc.conv(x, w, (1, 1), pads, jnp.float32).sum(), (0, 1))(x, w))
profile("onednn f32 bwd (data+weights)", g, x, w, n=10)
print("load", os.getloadavg())
