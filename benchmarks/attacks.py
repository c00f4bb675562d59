"""Attack throughput per model, loop form and convolution implementation; prints JSON.

    python -m benchmarks.attacks [--checkpoints=mnist_basic_cnn,cifar10_resnet10] [--random_init=resnet10_64]
                                 [--batch_sizes=256] [--attacks=fgsm,pgd,cw_l2,jsma] [--pgd_steps=10]
                                 [--loops=unroll,fori,scan,python]
                                 [--conv_impls=custom_vjp,xla,onednn,onednn_bf16]

PGD (``--pgd_steps``, default 10: PGD-10) is timed in each loop form: unrolled inside one jit, a rolled
``lax.fori_loop``, ``lax.scan``, and a Python loop over a jitted step (JSMA in the first three); and with each
``conv_impl`` of the models (``custom_vjp``: ``robust_jax.conv``, whose backward convolutions stay fast inside
XLA:CPU while-loops; ``xla``: ``lax.conv_general_dilated``; ``onednn`` / ``onednn_bf16``: opt-in oneDNN kernels,
``robust_jax.onednn``, whose version, ISA and threads are recorded under ``environment.onednn``). Per model and batch
size every variant is compiled first (``compile_s``: lower + compile from cleared JAX caches, without running, median
of ``--compile_repeats`` interleaved rounds; ``first_run_s``: the first call after that), then the variants are timed
interleaved, one call each per round, so they share the machine's load; ``seconds_per_batch`` is the median over
``--repeats`` rounds. ``--random_init`` adds models with random weights on CIFAR-10 images (``resnet10_16``,
``resnet10_64``).
``gflop_per_s`` uses XLA's cost analysis, which counts a while-loop body once: it is left out for rolled loops
(CW-L2), and rolled PGD / JSMA forms use the unrolled form's count.
"""

from __future__ import annotations

import functools
import json
import time

from absl import app, flags

from robust_jax import xla_defaults

flags.DEFINE_list("checkpoints", ["mnist_basic_cnn", "cifar10_resnet10"], "pretrained checkpoints")
flags.DEFINE_list("random_init", [], "models with random weights: resnet10_16, resnet10_64")
flags.DEFINE_list("attacks", ["fgsm", "pgd", "cw_l2", "jsma"], "attacks")
flags.DEFINE_integer("pgd_steps", 10, "PGD iterations")
flags.DEFINE_list("loops", ["unroll", "fori", "scan", "python"], "PGD-10 loop forms")
flags.DEFINE_list("conv_impls", ["custom_vjp", "xla"], "models' conv_impl: custom_vjp | xla | onednn | onednn_bf16")
flags.DEFINE_list("batch_sizes", ["256"], "batch sizes")
flags.DEFINE_integer("cw_steps", 100, "CW-L2 iterations (one binary-search step)")
flags.DEFINE_integer("repeats", 3, "timed rounds (each variant once per round)")
flags.DEFINE_integer("compile_repeats", 1, "compile rounds (each variant once per round, JAX caches cleared)")
FLAGS = flags.FLAGS

RANDOM_INIT = {"resnet10_16": {"name": "ResNet10", "width": 16}, "resnet10_64": {"name": "ResNet10", "width": 64}}


def _models():
    import jax
    import jax.numpy as jnp

    from robust_jax import checkpoints, models

    for name in FLAGS.checkpoints:
        m = checkpoints.load(name)
        yield name, m.model, m.variables, m.card["dataset"]
    for name in FLAGS.random_init:
        model = models.create(RANDOM_INIT[name])
        yield name, model, model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))), "cifar10"


def _variants(model, eps, bs):
    """name -> (jitted fn of (v, x, y, key), or None for the Python loop) for every attack x loop x conv_impl."""
    import jax

    from robust_jax import attacks

    out = {}
    for impl in FLAGS.conv_impls:
        m = model.clone(conv_impl=impl)
        f = lambda v, m=m: functools.partial(m.apply, v)
        pgd = lambda v, x, y, k, loop, f=f, **kw: attacks.pgd(f(v), x, y, key=k, eps=eps, step_size=eps / 4,
                                                              loop=loop, **kw)
        for attack in FLAGS.attacks:
            if attack == "fgsm":
                fgsm = jax.jit(lambda v, x, y, k, f=f: attacks.fgsm(f(v), x, y, key=k, eps=eps))
                out[f"fgsm/{impl}"] = ("fgsm", None, impl, fgsm)
            elif attack == "pgd":
                name = f"pgd{FLAGS.pgd_steps}"
                for loop in FLAGS.loops:
                    if loop == "python":  # one jitted PGD step from x_init, called --pgd_steps times
                        step = jax.jit(lambda v, xa, x, y, k, pgd=pgd: pgd(v, x, y, k, "unroll", steps=1, x_init=xa,
                                                                           random_start=False))
                        out[f"{name}/{loop}/{impl}"] = (name, loop, impl, step)
                    else:
                        out[f"{name}/{loop}/{impl}"] = (name, loop, impl, jax.jit(
                            lambda v, x, y, k, loop=loop, pgd=pgd: pgd(v, x, y, k, loop, steps=FLAGS.pgd_steps)))
            elif attack == "cw_l2":
                from robust_jax.attacks.cw import cw_l2

                out[f"cw_l2/{impl}"] = ("cw_l2", "fori", impl, jax.jit(
                    lambda v, x, y, k, f=f: cw_l2(f(v), x, y, key=k, steps=FLAGS.cw_steps, binary_search_steps=1,
                                                  lr=0.05, initial_const=1.0, loop="fori")))
            elif attack == "jsma":
                from robust_jax.attacks.jsma import jsma

                for loop in [lp for lp in FLAGS.loops if lp != "python"]:
                    out[f"jsma/{loop}/{impl}"] = ("jsma", loop, impl, jax.jit(
                        lambda v, x, y, k, f=f, loop=loop: jsma(f(v), x, (y + 1) % 10, key=k, theta=1.0,
                                                                gamma=0.1, loop=loop)))
            else:
                raise ValueError(f"unknown attack {attack!r}")
    return out


def main(argv):
    del argv
    import jax
    import numpy as np

    from benchmarks.common import compile_timed, compiled_flops, environment, interleaved, onednn_environment
    from robust_jax import data, sharding
    from robust_jax.attacks import gradient

    out = {"benchmark": "attacks", "environment": {**environment(), **onednn_environment(FLAGS.conv_impls)},
           "repeats": FLAGS.repeats, "results": []}
    key = jax.random.PRNGKey(0)
    log = lambda d: print(json.dumps(d), flush=True)
    for name, model, variables, ds in _models():
        eps = 0.3 if ds == "mnist" else 8 / 255
        for bs in map(int, FLAGS.batch_sizes):
            x, y = data.load(ds, f"{data.splits(ds)['test']}[:{bs}]")
            x, y = sharding.shard_batch((data.to_float(x), y))
            v = sharding.replicate(variables)
            variants = _variants(model, eps, bs)
            x0 = gradient.random_start(key, x, eps, "linf")
            compiled, compile_times = {}, {vname: [] for vname in variants}
            # compile every variant --compile_repeats times, interleaved, from empty JAX caches each time
            for _ in range(FLAGS.compile_repeats):
                for vname, (_, loop, _, fn) in variants.items():
                    jax.clear_caches()
                    args = (v, x0, x, y, key) if loop == "python" else (v, x, y, key)
                    compiled[vname], c = compile_timed(fn, *args)
                    compile_times[vname].append(c)
            runs, meta = {}, {}
            for vname, (attack, loop, impl, _) in variants.items():
                if loop == "python":

                    def run(step=compiled[vname]):
                        xa = gradient.random_start(key, x, eps, "linf")
                        for i in range(FLAGS.pgd_steps):
                            xa = step(v, xa, x, y, jax.random.fold_in(key, i))
                        return jax.block_until_ready(xa)

                    fl = None
                else:
                    run = lambda c=compiled[vname]: jax.block_until_ready(c(v, x, y, key))
                    fl = compiled_flops(compiled[vname], impl)
                t0 = time.perf_counter()
                run()
                first = time.perf_counter() - t0
                runs[vname] = run
                meta[vname] = {"model": name, "batch_size": bs, "attack": attack, "loop": loop, "conv_impl": impl,
                               "compile_s": float(np.median(compile_times[vname])),
                               "compile_times_s": [round(c, 2) for c in compile_times[vname]],
                               "first_run_s": first, "flops": fl}
                log({"compiled": vname, **meta[vname]})
            # XLA's cost analysis counts a while-loop body once: rolled PGD forms get the unrolled form's FLOPs
            for mt in meta.values():
                unrolled = meta.get(f"pgd{FLAGS.pgd_steps}/unroll/{mt['conv_impl']}")
                if mt["loop"] in ("fori", "scan", "python"):
                    mt["flops"] = unrolled["flops"] if mt["attack"].startswith("pgd") and unrolled else None
                if mt["attack"] == "jsma" and mt["loop"] != "unroll":
                    u = meta.get(f"jsma/unroll/{mt['conv_impl']}")
                    mt["flops"] = u["flops"] if u else None
            timings = interleaved(runs, repeats=FLAGS.repeats, warmup=0, log=log)
            for vname, t in timings.items():
                row = {**meta[vname], "seconds_per_batch": t["median_s"], "min_s": t["min_s"], "times_s": t["times_s"],
                       "images_per_s": bs / t["median_s"],
                       "gflop_per_s": meta[vname]["flops"] / t["median_s"] / 1e9 if meta[vname]["flops"] else None}
                out["results"].append(row)
                log(row)
    out["environment"]["load_average_end"] = __import__("os").getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    xla_defaults()  # before JAX initialises its backend
    app.run(main)
