"""Seconds per jitted attack call (FGSM, PGD-10 fori / unrolled, CW-L2 100 steps) on cifar10_resnet10, batch 128;
prints one JSON line. Written to compare library versions: run it with ``PYTHONPATH=<checkout>`` for each version,
alternating, so both share the machine's load (works with the attack signatures before and after the engine).

    PYTHONPATH=/path/to/old python benchmarks/attack_calls.py; PYTHONPATH=. python benchmarks/attack_calls.py
"""

import functools
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from robust_jax import attacks, checkpoints, data


def main():
    new = hasattr(attacks, "engine")  # the engine-based layer requires key= everywhere
    m = checkpoints.load("cifar10_resnet10")
    x, y = data.load("cifar10", "test[:128]")
    x, y = jnp.asarray(data.to_float(x)), jnp.asarray(y)
    k, eps = jax.random.PRNGKey(0), 8 / 255
    f = lambda v: functools.partial(m.apply, v)  # noqa: E731
    kw = lambda kk: {"key": kk} if new else {}  # noqa: E731
    fns = {
        "fgsm": jax.jit(lambda v, x, y, kk: attacks.fgsm(f(v), x, y, eps=eps, **kw(kk))),
        "pgd10_fori": jax.jit(lambda v, x, y, kk: attacks.pgd(f(v), x, y, key=kk, eps=eps, step_size=eps / 4,
                                                               steps=10, loop="fori")),
        "pgd10_unroll": jax.jit(lambda v, x, y, kk: attacks.pgd(f(v), x, y, key=kk, eps=eps, step_size=eps / 4,
                                                                 steps=10, loop="unroll")),
        "cw100": jax.jit(lambda v, x, y, kk: attacks.cw_l2(f(v), x, y, steps=100, binary_search_steps=1, lr=0.05,
                                                           loop="fori", **kw(kk))),
    }
    out = {"code": "engine" if new else "pre-engine", "cpu": platform.processor(), "batch": 128}
    for name, fn in fns.items():
        fn(m.variables, x, y, k).block_until_ready()
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn(m.variables, x, y, k).block_until_ready()
            ts.append(time.perf_counter() - t)
        out[f"{name}_s"] = round(float(np.median(ts)), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    from robust_jax import xla_defaults

    xla_defaults()
    main()
