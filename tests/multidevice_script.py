"""Run with 4 forced host devices (see test_multidevice.py): compare sharded and single-device results.

Prints one JSON object of measured differences; the test decides what passes. Kept a script (not a test module)
because the device count must be fixed before JAX initialises, i.e. in a fresh process.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import functools  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from data_parallel import train_report  # noqa: E402  (tests/, the script's directory)

from robust_jax import attacks, models, runner, sharding, training  # noqa: E402


def main():
    out = {"devices": jax.device_count()}
    model = models.BasicCNN(num_classes=10, dropout_rate=0.25)
    variables = training.init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(24, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 24).astype(np.int32)
    key = jax.random.PRNGKey(1)

    def pgd(v, xb, yb, k):
        return attacks.pgd(functools.partial(model.apply, v), xb, yb, key=k, eps=0.3, step_size=0.05, steps=5)

    def fgsm(v, xb, yb, k):
        return attacks.fgsm(functools.partial(model.apply, v), xb, yb, key=k, eps=0.1)

    mesh1, mesh4 = sharding.mesh(1), sharding.mesh(4)
    out["shards"] = len(sharding.shard_batch(x[:12], mesh4).addressable_shards)
    for name, attack in [("fgsm", fgsm), ("pgd", pgd)]:
        # batch_size 10 -> chunks padded to 12 on 4 devices (and to 10 on 1): padding must not change results.
        a1 = runner.run_attack(attack, variables, x, y, key=key, batch_size=12, progress=False, mesh=mesh1)
        a4 = runner.run_attack(attack, variables, x, y, key=key, batch_size=12, progress=False, mesh=mesh4)
        out[name] = {"max_abs_diff": float(np.abs(a1 - a4).max()),
                     "frac_pixels_differ": float(np.mean(np.abs(a1 - a4) > 1e-6)),
                     "shape_equal": a1.shape == a4.shape}

    predict = training.make_predict(model)
    f = jax.jit(lambda xb: predict(variables, xb))
    l1 = sharding.run_sharded(f, x, batch_size=10, m=mesh1)
    l4 = sharding.run_sharded(f, x, batch_size=10, m=mesh4)
    out["predict"] = {"max_abs_diff": float(np.abs(l1 - l4).max()), "n": int(len(l4))}

    # Data-parallel training: the same step on a batch split over 4 devices (XLA averages gradients across them).
    tx = optax.sgd(0.05, momentum=0.9)
    step = training.make_train_step(model, tx, donate=False)
    xs = (rng.uniform(size=(3, 32, 28, 28, 1)) * 255).astype(np.uint8)
    ys = rng.integers(0, 10, (3, 32)).astype(np.int32)

    init_state = lambda: training.create_train_state(model, tx, jax.random.PRNGKey(2), (28, 28, 1))  # noqa: E731
    out["train"] = train_report(step, init_state, xs, ys, mesh1, mesh4)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
