"""Attack throughput on the pretrained checkpoints; prints JSON.

    python -m benchmarks.attacks [--checkpoints=mnist_basic_cnn,cifar10_resnet10] [--batch_size=256]

PGD-10 is timed in three loop forms: unrolled inside one jit (the CPU default), a rolled ``lax.fori_loop`` (the
GPU/TPU default) and a Python loop over a jitted step.
"""

from __future__ import annotations

import functools
import json

from absl import app, flags

flags.DEFINE_list("checkpoints", ["mnist_basic_cnn", "cifar10_resnet10"], "checkpoints")
flags.DEFINE_list("attacks", ["fgsm", "pgd10_unroll", "pgd10_fori", "pgd10_python", "cw_l2", "jsma"], "what")
flags.DEFINE_integer("batch_size", 256, "batch size")
flags.DEFINE_integer("cw_steps", 100, "CW-L2 iterations (one binary-search step)")
flags.DEFINE_integer("repeats", 3, "timed repeats")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax

    import robust_jax  # noqa: F401 - applies the default XLA flags before JAX initialises
    from benchmarks.common import environment, flops, timeit
    from robust_jax import attacks, checkpoints, data, sharding
    from robust_jax.attacks import gradient

    out = {"benchmark": "attacks", "environment": environment(), "batch_size": FLAGS.batch_size, "results": []}
    bs = FLAGS.batch_size
    key = jax.random.PRNGKey(0)
    for name in FLAGS.checkpoints:
        m = checkpoints.load(name)
        ds = m.card["dataset"]
        x, y = data.load(ds, f"{data.splits(ds)['test']}[:{bs}]")
        x, y = sharding.shard_batch((data.to_float(x), y))
        v = sharding.replicate(m.variables)
        eps = 0.3 if ds == "mnist" else 8 / 255
        f = lambda v: functools.partial(m.apply, v)
        fns = {
            "fgsm": lambda v, x, y, k: attacks.fgsm(f(v), x, y, eps=eps),
            "pgd10_unroll": lambda v, x, y, k: attacks.pgd(f(v), x, y, key=k, eps=eps, step_size=eps / 4, steps=10,
                                                           loop="unroll"),
            "pgd10_fori": lambda v, x, y, k: attacks.pgd(f(v), x, y, key=k, eps=eps, step_size=eps / 4, steps=10,
                                                         loop="fori"),
        }
        if "cw_l2" in FLAGS.attacks:
            from robust_jax.attacks.cw import cw_l2

            fns["cw_l2"] = lambda v, x, y, k: cw_l2(f(v), x, y, steps=FLAGS.cw_steps, binary_search_steps=1,
                                                    lr=0.05, initial_const=1.0, abort_early=False)
        if "jsma" in FLAGS.attacks:
            from robust_jax.attacks.jsma import jsma

            fns["jsma"] = lambda v, x, y, k: jsma(f(v), x, (y + 1) % 10, theta=1.0, gamma=0.1)
        for attack in FLAGS.attacks:
            if attack == "pgd10_python":
                one = jax.jit(lambda v, xa, x, y, k: attacks.pgd(f(v), x, y, key=k, eps=eps, step_size=eps / 4,
                                                                 steps=1, x_init=xa))

                def run():
                    xa = gradient.random_start(key, x, eps, "linf")
                    for i in range(10):
                        xa = one(v, xa, x, y, jax.random.fold_in(key, i))
                    return jax.block_until_ready(xa)

                t, fl = timeit(run, repeats=FLAGS.repeats), None
            else:
                jitted = jax.jit(fns[attack])
                t = timeit(lambda: jax.block_until_ready(jitted(v, x, y, key)), repeats=FLAGS.repeats)
                fl = flops(jitted, v, x, y, key)
            row = {"checkpoint": name, "attack": attack, "images_per_s": bs / t["median_s"],
                   "seconds_per_batch": t["median_s"], "first_call_s": t["first_call_s"],
                   "gflop_per_s": fl / t["median_s"] / 1e9 if fl else None}
            out["results"].append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    app.run(main)
