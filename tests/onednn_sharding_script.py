"""Run with 2 forced host devices (see test_onednn_sharding.py): oneDNN convolutions batch-sharded over devices.
``python tests/onednn_sharding_script.py conv|model``.

Prints one JSON object of measured differences and facts about the compiled HLO; the test decides what passes.
Kept a script (not a test module) because the device count must be fixed before JAX initialises, i.e. in a fresh
process. Needs oneDNN (the test skips without it).
"""

import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from data_parallel import train_report  # noqa: E402  (tests/, the script's directory)
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from robust_jax import attacks, models, onednn, runner, sharding, training  # noqa: E402


def _max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _hlo_facts(compiled_text):
    """Collectives and the shapes of the oneDNN custom calls in a compiled (partitioned) module."""
    calls = re.findall(r"(f32\[[\d,]*\])\S* custom-call\([^)]*\), custom_call_target=\"(onednn_conv_\w+)\"",
                       compiled_text)
    return {"all_gather": compiled_text.count("all-gather("), "all_reduce": compiled_text.count("all-reduce("),
            "onednn_calls": sorted(f"{t}:{s}" for s, t in calls)}


def _numpy_init(model, input_shape, seed=0):
    """Variables of `model` drawn with numpy (N(0, 1/fan_in) weights, zero biases): Flax's eager init compiles
    dozens of small XLA programs (~4 s), this only traces the model once (eval_shape)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda k: training.init_variables(model, k, input_shape), jax.random.PRNGKey(0))
    draw = lambda s: (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1  # noqa: E731
                      else np.zeros(s.shape)).astype(np.float32)
    return jax.tree.map(draw, shapes)


def conv_checks(mesh):
    """Forward, input gradient and weight gradient of one conv (batch 8, 8x8x3 -> 4 channels, f32) jitted with
    batch-sharded inputs vs the same function on one device; a spatially sharded input (the fallback)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 8, 8, 3), np.float32)
    w = (rng.standard_normal((3, 3, 3, 4)) / np.sqrt(27)).astype(np.float32)
    g = rng.standard_normal((8, 8, 8, 4), np.float32)

    def fwd(x, w):
        return onednn.conv(x, w, padding="SAME")

    def grads(x, w, g):
        _, vjp = jax.vjp(fwd, x, w)
        return vjp(g)

    one = jax.devices()[0]
    ref_y = jax.jit(fwd)(jax.device_put(x, one), jax.device_put(w, one))
    ref_dx, ref_dw = jax.jit(grads)(*(jax.device_put(a, one) for a in (x, w, g)))
    batch, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    xs, ws, gs = jax.device_put(x, batch), jax.device_put(w, rep), jax.device_put(g, batch)
    jf, jg = jax.jit(fwd), jax.jit(grads)
    y = jf(xs, ws)
    dx, dw = jg(xs, ws, gs)
    out = {"fwd": {"max_abs_diff": float(np.abs(np.asarray(y) - np.asarray(ref_y)).max()),
                   "out_spec": str(y.sharding.spec), **_hlo_facts(jf.lower(xs, ws).compile().as_text())},
           "grads": {"dx_max_abs_diff": float(np.abs(np.asarray(dx) - np.asarray(ref_dx)).max()),
                     "dw_max_rel_diff": _max_rel(dw, ref_dw), "dx_spec": str(dx.sharding.spec),
                     "dw_replicated": bool(dw.sharding.is_fully_replicated),
                     **_hlo_facts(jg.lower(xs, ws, gs).compile().as_text())}}
    # Fallback: sharded over H (not a batch dim) -> operands replicated (all-gathered), the same values.
    xh = jax.device_put(x, NamedSharding(mesh, P(None, "data")))
    yh = jax.jit(fwd)(xh, ws)
    dxh, dwh = jax.jit(grads)(xh, ws, jax.device_put(g, NamedSharding(mesh, P(None, "data"))))
    out["fallback"] = {"max_abs_diff": max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                                           for a, b in ((yh, ref_y), (dxh, ref_dx), (dwh, ref_dw))),
                       **_hlo_facts(jax.jit(fwd).lower(xh, ws).compile().as_text())}
    # bf16 compute (f32 in and out): the partitioning does not depend on the dtype.
    fb = jax.jit(lambda x, w, g: jax.vjp(lambda x, w: onednn.conv(x, w, compute_dtype=jnp.bfloat16), x, w)[1](g))
    rb = fb(*(jax.device_put(a, one) for a in (x, w, g)))
    out["bf16"] = {"max_rel_diff": max(_max_rel(a, b) for a, b in zip(fb(xs, ws, gs), rb))}
    # vmap inside the sharded function (an eps-sweep-like axis): still one custom call per kind, batch split.
    def swept(x, w, g):
        return jax.vmap(lambda s: (fwd(x * s, w), *grads(x * s, w, g)))(jnp.arange(1.0, 4.0))

    ref_v = jax.jit(swept)(*(jax.device_put(a, one) for a in (x, w, g)))
    jv = jax.jit(swept)
    got_v = jv(xs, ws, gs)
    out["vmap"] = {"max_rel_diff": max(_max_rel(a, b) for a, b in zip(got_v, ref_v)),
                   **_hlo_facts(jv.lower(xs, ws, gs).compile().as_text())}
    return out


def model_checks(mesh1, mesh2):
    """A small BasicCNN (10x10x1 inputs) with conv_impl="onednn": PGD-2 through runner.run_attack and logits
    through sharding.run_sharded on 1 vs 2 devices, the compiled 2-device PGD, two data-parallel train steps."""
    model = models.BasicCNN(num_classes=10, dropout_rate=0.25, conv_impl="onednn")
    variables = _numpy_init(model, (10, 10, 1))
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(12, 10, 10, 1)).astype(np.float32)
    y = rng.integers(0, 10, 12).astype(np.int32)
    key = jax.random.PRNGKey(1)

    def pgd(v, xb, yb, k):
        return attacks.pgd(functools.partial(model.apply, v), xb, yb, key=k, eps=0.1, step_size=0.05, steps=2)

    a1 = runner.run_attack(pgd, variables, x, y, key=key, batch_size=12, progress=False, mesh=mesh1)
    a2 = runner.run_attack(pgd, variables, x, y, key=key, batch_size=12, progress=False, mesh=mesh2)
    out = {"pgd": {"max_abs_diff": float(np.abs(a1 - a2).max()), "shape_equal": a1.shape == a2.shape,
                   "max_perturbation": float(np.abs(a2 - x).max())}}
    xb, yb = sharding.shard_batch((x, y), mesh2)
    hlo = jax.jit(pgd).lower(sharding.replicate(variables, mesh2), xb, yb, key).compile().as_text()
    out["pgd"].update(_hlo_facts(hlo))

    f = jax.jit(lambda xb: model.apply(variables, xb))
    l1 = sharding.run_sharded(f, x, batch_size=12, m=mesh1)
    l2 = sharding.run_sharded(f, x, batch_size=12, m=mesh2)
    out["predict"] = {"max_abs_diff": float(np.abs(l1 - l2).max())}

    tx = optax.sgd(0.05, momentum=0.9)
    step = training.make_train_step(model, tx, donate=False)
    xs = (rng.uniform(size=(2, 8, 10, 10, 1)) * 255).astype(np.uint8)
    ys = rng.integers(0, 10, (2, 8)).astype(np.int32)

    def init_state():
        params = _numpy_init(model, (10, 10, 1), seed=2)["params"]
        return training.TrainState(step=np.zeros((), np.int32), params=params, batch_stats={},
                                   opt_state=tx.init(params), rng=jax.random.PRNGKey(2))

    out["train"] = train_report(step, init_state, xs, ys, mesh1, mesh2)
    return out


def main(part):
    """`part`: "conv" (conv_checks under the default partitioner, then the other one) or "model"."""
    mesh1, mesh2 = sharding.mesh(1), sharding.mesh(2)
    out = {"devices": jax.device_count(), "shardy": bool(jax.config.jax_use_shardy_partitioner)}
    if part == "conv":
        out["default"] = conv_checks(mesh2)
        jax.config.update("jax_use_shardy_partitioner", not out["shardy"])  # the other one (GSPMD / Shardy)
        out["other"] = conv_checks(mesh2)
    else:
        out.update(model_checks(mesh1, mesh2))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
