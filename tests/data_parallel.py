"""The data-parallel training check shared by the multi-device scripts and their tests: the same train steps on one
mesh and on another (batches split over its devices) give the same parameters and losses."""

from __future__ import annotations

import jax
import numpy as np

from robust_jax import sharding


def train_report(step, init_state, xs, ys, mesh_a, mesh_b) -> dict:
    """Run ``step`` over the batches ``xs[i], ys[i]`` from ``init_state()`` on `mesh_a` and on `mesh_b`; the
    largest parameter difference, the parameter scale, both loss sequences, and whether `mesh_b`'s parameters ended
    replicated."""

    def run(m):
        state = sharding.replicate(init_state(), m)
        losses = []
        for xb, yb in zip(xs, ys):
            state, metrics = step(state, *sharding.shard_batch((xb, yb), m))
            losses.append(float(metrics["loss"]))
        return state, losses

    (sa, la), (sb, lb) = run(mesh_a), run(mesh_b)
    pa = [np.asarray(p) for p in jax.tree.leaves(sa.params)]
    pb = jax.tree.leaves(sb.params)
    return {"max_param_diff": max(float(np.abs(a - np.asarray(b)).max()) for a, b in zip(pa, pb)),
            "param_scale": max(float(np.abs(a).max()) for a in pa), "losses_a": la, "losses_b": lb,
            "params_replicated": all(p.sharding.is_fully_replicated for p in pb)}


def assert_same_training(t: dict) -> None:
    """The assertion on :func:`train_report`: parameters replicated and equal, losses equal (float32 tolerance)."""
    assert t["params_replicated"]
    assert t["max_param_diff"] <= 1e-5 * max(1.0, t["param_scale"]), t
    for a, b in zip(t["losses_a"], t["losses_b"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a))
