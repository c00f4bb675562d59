"""Training-step and MC-dropout throughput per model; prints JSON.

    python -m benchmarks.train_step [--models=basic_cnn,allconv,resnet10_16,resnet10_64] [--batch_size=128]
"""

from __future__ import annotations

import json

from absl import app, flags

flags.DEFINE_list("models", ["basic_cnn", "allconv", "resnet10_16", "resnet10_64"], "models")
flags.DEFINE_integer("batch_size", 128, "batch size")
flags.DEFINE_integer("mc_samples", 20, "MC-dropout samples")
flags.DEFINE_integer("repeats", 5, "timed repeats")
FLAGS = flags.FLAGS

CONFIGS = {
    "basic_cnn": ({"name": "BasicCNN"}, (28, 28, 1)),
    "allconv": ({"name": "AllConvNet", "width": 24, "dropout_rate": 0.2}, (32, 32, 3)),
    "resnet10_16": ({"name": "ResNet10", "width": 16, "dropout_rate": 0.2}, (32, 32, 3)),
    "resnet10_64": ({"name": "ResNet10", "width": 64, "dropout_rate": 0.2}, (32, 32, 3)),
}


def main(argv):
    del argv
    import jax
    import numpy as np

    import robust_jax  # noqa: F401 - applies the default XLA flags before JAX initialises
    from benchmarks.common import environment, flops, timeit
    from robust_jax import models, sharding, training, uncertainty

    out = {"benchmark": "train_step", "environment": environment(), "batch_size": FLAGS.batch_size, "results": []}
    bs = FLAGS.batch_size
    for name in FLAGS.models:
        arch, shape = CONFIGS[name]
        m = models.create(arch)
        tx = training.make_optimizer("sgd", 0.05, total_steps=1000, weight_decay=5e-4)
        state = sharding.replicate(training.create_train_state(m, tx, jax.random.PRNGKey(0), shape))
        step = training.make_train_step(m, tx, augment_fn=training.flip_crop if shape[-1] == 3 else None,
                                        donate=False)
        rng = np.random.default_rng(0)
        x, y = sharding.shard_batch((rng.integers(0, 256, (bs, *shape), dtype=np.uint8), rng.integers(0, 10, bs)))
        f_train = flops(step, state, x, y)
        t_train = timeit(lambda: jax.block_until_ready(step(state, x, y)), repeats=FLAGS.repeats)
        xf = jax.numpy.asarray(x, jax.numpy.float32) / 255
        mc = jax.jit(lambda v, x, k: uncertainty.mc_dropout_predict(m.apply, v, x, k, FLAGS.mc_samples)[0])
        t_mc = timeit(lambda: jax.block_until_ready(mc(state.variables, xf, jax.random.PRNGKey(1))),
                      repeats=FLAGS.repeats)
        out["results"].append({
            "model": name, "architecture": arch, "params": int(sum(p.size for p in jax.tree.leaves(state.params))),
            "train_images_per_s": bs / t_train["median_s"], "train_compile_s": t_train["first_call_s"],
            "train_gflop_per_image": f_train / bs / 1e9 if f_train else None,
            "train_gflop_per_s": f_train / t_train["median_s"] / 1e9 if f_train else None,
            "mc_dropout_samples": FLAGS.mc_samples,
            "mc_dropout_images_per_s": bs / t_mc["median_s"], "mc_dropout_compile_s": t_mc["first_call_s"],
        })
        print(json.dumps(out["results"][-1]), flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    app.run(main)
