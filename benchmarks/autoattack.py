"""Throughput of AutoAttack's attacks against PGD-100 at the same batch; prints JSON.

    python -m benchmarks.autoattack [--checkpoint=cifar10_resnet10_pgd] [--batch_size=128] [--eps=8/255]
                                    [--attacks=pgd100,apgd-ce,apgd-t,fab-t,square] [--targets=1] [--queries=1000]

Each attack is jitted with the model variables as traced arguments, compiled once (``compile_s``), then timed
interleaved with the others (``benchmarks.common.interleaved``: one call of each per round, so all share the load).
``iterations`` counts attack iterations per image (APGD: steps x restarts x targets; FAB: steps x targets; Square:
queries; PGD: steps) and ``image_steps_per_s = iterations * batch / median_s``; ``vs_pgd100`` is the seconds per
iteration relative to PGD-100's. Budgets default to one target class for APGD-T / FAB-T and 1000 Square queries
(``--targets=9 --queries=5000`` for the protocol's: the time per iteration does not depend on the count, the full
protocol just multiplies it). ``passes_per_image`` gives the model's forward / backward passes per image.
The environment record includes ``lscpu``'s model name and flags.
"""

from __future__ import annotations

import functools
import json
import subprocess
from fractions import Fraction

from absl import app, flags

from robust_jax import xla_defaults

flags.DEFINE_string("checkpoint", "cifar10_resnet10_pgd", "pretrained checkpoint")
flags.DEFINE_integer("batch_size", 128, "images per call")
flags.DEFINE_string("eps", "8/255", "Linf budget (a number or a fraction)")
flags.DEFINE_list("attacks", ["pgd100", "apgd-ce", "apgd-t", "fab-t", "square"], "attacks to time")
flags.DEFINE_integer("targets", 1, "target classes for APGD-T and FAB-T (AutoAttack: 9)")
flags.DEFINE_integer("queries", 1000, "Square queries (AutoAttack: 5000)")
flags.DEFINE_integer("repeats", 2, "timed rounds")
FLAGS = flags.FLAGS


def lscpu() -> dict:
    """``Model name`` and ``Flags`` from lscpu (empty if unavailable)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k: fields[k].strip() for k in ("Model name", "Flags", "CPU(s)") if k in fields}


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.common import compile_timed, environment, interleaved
    from robust_jax import attacks, checkpoints, data
    from robust_jax.attacks.autoattack import passes, protocol, run_protocol_attack

    eps = float(Fraction(FLAGS.eps))
    m = checkpoints.load(FLAGS.checkpoint)
    ds = m.card["dataset"]
    n = FLAGS.batch_size
    try:
        x, y = data.load(ds, data.head(ds, data.splits(ds)["test"], n))
        x, y, source = data.to_float(x), np.asarray(y, np.int32), "test images"
    except Exception:  # noqa: BLE001 - no data prepared: random images cost the same
        shape = data.info(ds).image_shape
        rng = np.random.default_rng(0)
        x, y, source = rng.uniform(size=(n, *shape)).astype(np.float32), rng.integers(0, 10, n), "random images"
    x, y = jnp.asarray(x), jnp.asarray(y, jnp.int32)
    options = {"apgd-t": {"n_target_classes": FLAGS.targets}, "fab-t": {"n_target_classes": FLAGS.targets},
               "square": {"n_queries": FLAGS.queries}}
    spec = dict(protocol("standard", options=options))
    n_classes = int(m(x[:1]).shape[-1])
    key = jax.random.PRNGKey(0)
    f = lambda v: functools.partial(m.apply, v)

    fns, meta = {}, {}
    for name in FLAGS.attacks:
        if name == "pgd100":
            fn = jax.jit(lambda v, x, y: attacks.pgd(f(v), x, y, key=key, eps=eps, step_size=eps / 4, steps=100))
            meta[name] = {"iterations": 100, "passes_per_image": {"forward": 100, "backward": 100}}
        elif name in spec:
            p = spec[name]
            fn = jax.jit(lambda v, x, y, name=name, p=p: run_protocol_attack(name, p, f(v), x, y, key=key,
                                                                              norm="linf", eps=eps))
            runs = p.get("restarts", 1) * p.get("n_target_classes", 1)
            its = p["n_queries"] if name == "square" else p["steps"] * runs
            meta[name] = {"iterations": its, "params": p, "passes_per_image": passes(name, p, n_classes)}
        else:
            raise ValueError(f"unknown attack {name!r}; use pgd100 or one of {sorted(spec)}")
        compiled, seconds = compile_timed(fn, m.variables, x, y)
        meta[name]["compile_s"] = seconds
        fns[name] = lambda c=compiled: jax.block_until_ready(c(m.variables, x, y))
    times = interleaved(fns, repeats=FLAGS.repeats)
    results = {}
    for name, t in times.items():
        per_it = t["median_s"] / meta[name]["iterations"]
        results[name] = {**meta[name], **t, "image_steps_per_s": meta[name]["iterations"] * n / t["median_s"],
                         "seconds_per_iteration": per_it}
    if "pgd100" in results:
        base = results["pgd100"]["seconds_per_iteration"]
        for r in results.values():
            r["vs_pgd100"] = r["seconds_per_iteration"] / base
    out = {"benchmark": "autoattack", "checkpoint": FLAGS.checkpoint, "batch_size": n, "eps": FLAGS.eps,
           "data": source, "environment": {**environment(), "lscpu": lscpu()}, "results": results}
    print(json.dumps(out, indent=2, default=float))


if __name__ == "__main__":
    xla_defaults()  # before JAX initialises its backend
    app.run(main)
