"""PGD-10 over an eps sweep in one vmapped call (``attacks.pgd(..., eps=jnp.array([...]))``), per ``conv_impl``, and
for the oneDNN kernels with the FFI call's batching rule (``vmap_method="expand_dims"``, batched inside the handler)
against the previous ``"sequential"`` (one FFI call per vmapped element, in a scan); prints JSON.

    python -m benchmarks.vmap_eps [--checkpoints=cifar10_resnet10,cifar10_resnet10_w64] [--batch_size=128]
                                  [--eps=1,2,4,8] [--loop=fori] [--conv_impls=custom_vjp,onednn,onednn_bf16]

Every variant is compiled first (``compile_s``), then all are timed interleaved (one call each per round,
``--repeats`` rounds, medians), so they share the machine's load. ``image_steps_per_s`` counts batch x eps values x
steps. ``while_loops`` is the number of ``while`` ops in the compiled HLO (the sequential rule adds one per FFI call).
"""

from __future__ import annotations

import json

from absl import app, flags

from robust_jax import xla_defaults

flags.DEFINE_list("checkpoints", ["cifar10_resnet10", "cifar10_resnet10_w64"], "pretrained checkpoints")
flags.DEFINE_integer("batch_size", 128, "images per eps value")
flags.DEFINE_list("eps", ["1", "2", "4", "8"], "eps values, in 1/255")
flags.DEFINE_integer("steps", 10, "PGD steps")
flags.DEFINE_string("loop", "fori", "PGD loop form (attacks.pgd loop=)")
flags.DEFINE_list("conv_impls", ["custom_vjp", "onednn", "onednn_bf16"], "models' conv_impl")
flags.DEFINE_integer("repeats", 3, "timed rounds (each variant once per round)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from benchmarks import common
    from robust_jax import attacks, checkpoints, data, onednn

    env = {**common.environment(), **common.onednn_environment(FLAGS.conv_impls)}
    eps = jnp.asarray([float(e) for e in FLAGS.eps]) / 255
    results = []
    for name in FLAGS.checkpoints:
        m = checkpoints.load(name)
        x, y = data.load(m.card["dataset"], f"test[:{FLAGS.batch_size}]")
        x, y = jnp.asarray(data.to_float(x)), jnp.asarray(y)
        key = jax.random.PRNGKey(0)
        variants = {}
        for impl in FLAGS.conv_impls:
            for method in (("expand_dims", "sequential") if impl.startswith("onednn") else (None,)):
                vname = impl if method is None else f"{impl}/{method}"
                model = m.model.clone(conv_impl=impl)

                def run(v, x, y, k, model=model):
                    return attacks.pgd(lambda z: model.apply(v, z), x, y, key=k, eps=eps, step_size=eps / 4,
                                       steps=FLAGS.steps, loop=FLAGS.loop)

                jax.clear_caches()
                onednn._VMAP_METHOD = method or "expand_dims"  # read when the FFI call is traced (lowering)
                try:
                    compiled, compile_s = common.compile_timed(jax.jit(run), m.variables, x, y, key)
                finally:
                    onednn._VMAP_METHOD = "expand_dims"
                hlo = compiled.as_text()
                variants[vname] = (compiled, {"compile_s": round(compile_s, 2), "while_loops": hlo.count(" while(")})
        fns = {vn: (lambda c=c: jax.block_until_ready(c(m.variables, x, y, key))) for vn, (c, _) in variants.items()}
        times = common.interleaved(fns, repeats=FLAGS.repeats)
        work = FLAGS.batch_size * len(FLAGS.eps) * FLAGS.steps
        for vn, (_, info) in variants.items():
            t = times[vn]
            results.append({"checkpoint": name, "variant": vn, **info, "seconds_per_call": round(t["median_s"], 3),
                            "times_s": t["times_s"], "image_steps_per_s": round(work / t["median_s"], 1)})
    print(json.dumps({"benchmark": "vmap_eps", "batch_size": FLAGS.batch_size, "eps_255": FLAGS.eps,
                      "steps": FLAGS.steps, "loop": FLAGS.loop, "environment": {**env, "load_average_end":
                                                                                 common.environment()["load_average"]},
                      "results": results}, indent=1))


if __name__ == "__main__":
    xla_defaults()
    app.run(main)
