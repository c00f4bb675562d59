"""Training-step and MC-dropout throughput per model and convolution implementation; prints JSON.

    python -m benchmarks.train_step [--models=basic_cnn,allconv,resnet10_16,resnet10_64] [--batch_size=128]
                                    [--conv_impls=custom_vjp,xla,onednn,onednn_bf16]

Per model, the train step of every ``conv_impl`` is compiled first (``train_compile_s``: lower + compile), then the
steps are timed interleaved (one call each per round, ``--repeats`` rounds, medians) so they share the machine's
load. MC-dropout prediction is a forward pass only, which is the same convolution for every ``conv_impl``; it is
timed once, with the first listed.
"""

from __future__ import annotations

import json

from absl import app, flags

from robust_jax import xla_defaults

flags.DEFINE_list("models", ["basic_cnn", "allconv", "resnet10_16", "resnet10_64"], "models")
flags.DEFINE_list("conv_impls", ["custom_vjp", "xla"], "models' conv_impl: custom_vjp | xla | onednn | onednn_bf16")
flags.DEFINE_integer("batch_size", 128, "batch size")
flags.DEFINE_integer("mc_samples", 20, "MC-dropout samples")
flags.DEFINE_integer("repeats", 5, "timed rounds (each variant once per round)")
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

    from benchmarks.common import compile_timed, compiled_flops, environment, interleaved, onednn_environment, timeit
    from robust_jax import models, sharding, training, transforms, uncertainty

    out = {"benchmark": "train_step", "environment": {**environment(), **onednn_environment(FLAGS.conv_impls)},
           "batch_size": FLAGS.batch_size,
           "repeats": FLAGS.repeats, "results": []}
    bs = FLAGS.batch_size
    log = lambda d: print(json.dumps(d), flush=True)
    for name in FLAGS.models:
        arch, shape = CONFIGS[name]
        tx = training.make_optimizer("sgd", 0.05, total_steps=1000, weight_decay=5e-4)
        rng = np.random.default_rng(0)
        x, y = sharding.shard_batch((rng.integers(0, 256, (bs, *shape), dtype=np.uint8), rng.integers(0, 10, bs)))
        runs, meta, state = {}, {}, None
        for impl in FLAGS.conv_impls:
            m = models.create({**arch, "conv_impl": impl})
            if state is None:  # the same initial state for every conv_impl (same parameters)
                state = sharding.replicate(training.create_train_state(m, tx, jax.random.PRNGKey(0), shape))
            step = training.make_train_step(m, tx, augment_fn=transforms.flip_crop if shape[-1] == 3 else None,
                                            donate=False)
            compiled, compile_s = compile_timed(step, state, x, y)
            runs[impl] = lambda c=compiled: jax.block_until_ready(c(state, x, y))
            meta[impl] = {"train_compile_s": compile_s, "flops": compiled_flops(compiled, impl)}
            log({"compiled": f"{name}/{impl}", **meta[impl]})
        timings = interleaved(runs, repeats=FLAGS.repeats, warmup=1, log=log)
        m = models.create({**arch, "conv_impl": FLAGS.conv_impls[0]})
        xf = jax.numpy.asarray(x, jax.numpy.float32) / 255
        mc = jax.jit(lambda v, x, k: uncertainty.mc_dropout_predict(m.apply, v, x, k, FLAGS.mc_samples)[0])
        t_mc = timeit(lambda: jax.block_until_ready(mc(state.variables, xf, jax.random.PRNGKey(1))),
                      repeats=FLAGS.repeats)
        for impl, t in timings.items():
            f_train = meta[impl]["flops"]
            row = {"model": name, "conv_impl": impl, "architecture": arch,
                   "params": int(sum(p.size for p in jax.tree.leaves(state.params))),
                   "train_images_per_s": bs / t["median_s"], "train_step_s": t["median_s"], "times_s": t["times_s"],
                   "train_compile_s": meta[impl]["train_compile_s"],
                   "train_gflop_per_image": f_train / bs / 1e9 if f_train else None,
                   "train_gflop_per_s": f_train / t["median_s"] / 1e9 if f_train else None}
            if impl == FLAGS.conv_impls[0]:
                row.update({"mc_dropout_samples": FLAGS.mc_samples, "mc_dropout_images_per_s": bs / t_mc["median_s"],
                            "mc_dropout_compile_s": t_mc["first_call_s"]})
            out["results"].append(row)
            log(row)
    out["environment"]["load_average_end"] = __import__("os").getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    xla_defaults()  # before JAX initialises its backend
    app.run(main)
