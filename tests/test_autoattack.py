"""AutoAttack: DLR losses, APGD's schedule and step, FAB's projection, Square, the protocol, flags and the runner."""

import functools
import importlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog, minimize
from toy import linear, toy_linear

from robust_jax import attacks

apgd_mod = importlib.import_module("robust_jax.attacks.apgd")
fab_mod = importlib.import_module("robust_jax.attacks.fab")
square_mod = importlib.import_module("robust_jax.attacks.square")
aa_mod = importlib.import_module("robust_jax.attacks.autoattack")

KEY = jax.random.PRNGKey(0)
ROOT = Path(__file__).resolve().parents[1]
# small budgets for toy models (results with these are not AutoAttack's; the protocol logic is what is tested)
# (rolled loops: unrolling short runs, the CPU default, compiles much longer)
QUICK = {"apgd-ce": {"steps": 10, "loop": "fori"}, "apgd-t": {"steps": 10, "n_target_classes": 2, "loop": "fori"},
         "fab-t": {"steps": 10, "n_target_classes": 2, "loop": "fori"}, "square": {"n_queries": 60}}


def _toy(n=32, shape=(8, 8, 3), c=10, seed=0):
    return toy_linear(n, shape, c, seed, labels="predicted")


# ------------------------------------------------------------------------------------------------ DLR losses
LOGITS = np.array([[3.0, 1.0, 2.0, 0.5, -1.0],  # correct (y=0): z_y=3, max other 2, sorted 3,2,1,0.5
                   [1.0, 4.0, 0.0, 2.0, 2.5],  # wrong (y=0): max other 4
                   [0.0, 0.0, 5.0, 1.0, 3.0]], np.float32)
LABELS = np.array([0, 0, 2])


def test_dlr_loss_matches_its_formula():
    expected = [-(3 - 2) / (3 - 1), -(1 - 4) / (4 - 2), -(5 - 3) / (5 - 1)]
    np.testing.assert_allclose(attacks.dlr_loss(jnp.asarray(LOGITS), jnp.asarray(LABELS)), expected, rtol=1e-6)
    # shift and positive-scale invariant; positive exactly when misclassified
    z = jnp.asarray(LOGITS)
    np.testing.assert_allclose(attacks.dlr_loss(3 * z + 7, jnp.asarray(LABELS)), expected, rtol=1e-5)
    assert list(np.asarray(attacks.dlr_loss(z, jnp.asarray(LABELS))) > 0) == [False, True, False]
    with pytest.raises(ValueError, match="3 classes"):
        attacks.dlr_loss(z[:, :2], jnp.asarray([0, 1, 0]))


def test_targeted_dlr_loss_matches_its_formula():
    t = np.array([2, 3, 4])
    # sorted rows: [3, 2, 1, .5, -1], [4, 2.5, 2, 1, 0], [5, 3, 1, 0, 0]
    expected = [-(3 - 2) / (3 - (1 + 0.5) / 2), -(1 - 2) / (4 - (2 + 1) / 2), -(5 - 3) / (5 - (1 + 0) / 2)]
    out = attacks.dlr_loss_targeted(jnp.asarray(LOGITS), jnp.asarray(LABELS), jnp.asarray(t))
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="4 classes"):
        attacks.dlr_loss_targeted(jnp.asarray(LOGITS[:, :3]), jnp.asarray([0, 0, 2]), jnp.asarray([1, 1, 1]))


# ------------------------------------------------------------------------------------------ APGD: schedule
def test_checkpoints_follow_the_papers_recursion():
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    paper = [round(100 * q) for q in p[1:] if q <= 1]
    assert apgd_mod.step_checkpoints(100) == paper == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_mod.step_checkpoints(1000)[:4] == [220, 410, 570, 700]
    assert apgd_mod.step_checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]  # windows of max(int(.22 N), 1), ...
    assert apgd_mod.step_checkpoints(3) == [1, 2, 3]


def _drive(values, steps=100, n=1, eps=0.25):
    """Run apgd_step on scripted objective values (constant ascent direction); per step: eta, and whether the
    step started from the best point (x_prev after the update is the point the step started from)."""
    x = jnp.full((n, 1, 1, 1), 0.5)
    t = apgd_mod.apgd_step(x, eps, "linf", steps)
    update = jax.jit(lambda d, s, v, f, i: t.update(d, s, v, value=f, step=i))
    v = x + 0.01 * jnp.arange(n).reshape(n, 1, 1, 1)
    s = t.init(v)
    etas, restarted = [], []
    for i, f in enumerate(values):
        best = np.asarray(s.x_best) if i else np.asarray(v)
        better = (i == 0) or f > float(np.max(s.f_best))
        u, s = update(-jnp.ones_like(v), s, v, jnp.full((n,), f, jnp.float32), i)
        etas.append(float(s.eta[0]))
        restarted.append(not better and bool(np.allclose(s.x_prev, best)) and not np.allclose(best, v))
        v = v + u
    return np.asarray(etas), restarted


def test_apgd_step_halves_at_checkpoints_when_the_objective_oscillates():
    eps = 0.25
    etas, _ = _drive(np.arange(100.0), eps=eps)  # increases at every step: never halved
    np.testing.assert_allclose(etas, 2 * eps)
    etas, _ = _drive(np.zeros(100), eps=eps)  # never increases: halved at every checkpoint
    expected = [2 * eps / 2 ** sum(i >= w for w in [22, 41, 57, 70, 80, 87, 93, 99]) for i in range(100)]
    np.testing.assert_allclose(etas, expected)
    # condition 1 at the 16-step window (41, 57]: 12 increases = rho * 16 halves (the reference's "<="), 13 do not
    for n_up, halved in ((12, True), (13, False)):
        f = list(np.arange(42.0))  # steps 0..41 increase
        pattern = [1.0] * n_up + [-0.5] * (16 - n_up)  # steps 42..57: n_up increases, the rest decreases
        for d in pattern:
            f.append(f[-1] + d)
        f += [f[-1] + 1 + k for k in range(100 - len(f))]
        etas, _ = _drive(np.asarray(f), eps=eps)
        assert etas[56] == 2 * eps and (etas[57] == eps) == halved


def test_apgd_step_halves_when_the_best_objective_stalls_and_restarts_from_it():
    # best objective at step 0, then steady increases that stay below it: condition 1 never holds; condition 2
    # (not halved at the last checkpoint, best unchanged since it) holds at every other checkpoint from the second
    f = np.concatenate([[10.0], 0.01 * np.arange(1, 100)])
    etas, restarted = _drive(f)
    halvings = [i for i in range(1, 100) if etas[i] < etas[i - 1]]
    assert halvings == [41, 70, 87, 99]
    assert [i for i, r in enumerate(restarted) if r] == halvings  # each halving restarts from the best point


def test_apgd_first_two_steps_by_hand():
    f, w, b, x, y = _toy(n=8, shape=(4, 4, 1))
    eps, rng = 0.1, np.random.default_rng(1)
    t = apgd_mod.apgd_step(x, eps, "linf", 100)
    v0 = attacks.project(x + 0.05 * jnp.asarray(rng.normal(size=x.shape), jnp.float32), x, eps, "linf")
    g0, g1 = (jnp.asarray(rng.normal(size=x.shape), jnp.float32) for _ in range(2))
    s = t.init(v0)
    u, s = t.update(-g0, s, v0, value=jnp.zeros(8), step=0)
    x1 = v0 + u
    np.testing.assert_allclose(x1, attacks.project(v0 + 2 * eps * jnp.sign(g0), x, eps, "linf"), atol=1e-6)
    u, s = t.update(-g1, s, x1, value=jnp.ones(8), step=1)
    z = attacks.project(x1 + 2 * eps * jnp.sign(g1), x, eps, "linf")
    expected = attacks.project(x1 + 0.75 * (z - x1) + 0.25 * (x1 - v0), x, eps, "linf")
    np.testing.assert_allclose(x1 + u, expected, atol=1e-6)


def test_apgd_beats_or_matches_pgd_on_a_toy_and_respects_the_ball():
    f, w, b, x, y = _toy(n=64)
    for norm, eps in (("linf", 0.03), ("l2", 0.3)):
        out = attacks.apgd(f, x, y, key=KEY, eps=eps, norm=norm, steps=20)
        assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
        assert float(apgd_mod.norm_of(out - x, norm).max()) <= eps * (1 + 1e-5)
        if norm == "linf":
            pgd = attacks.pgd(f, x, y, key=KEY, eps=eps, step_size=eps / 4, steps=20, norm=norm)
            assert attacks.success(f, out, y).sum() >= attacks.success(f, pgd, y).sum()


# ------------------------------------------------------------------------------------------------------ FAB
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_box_projection_onto_a_hyperplane_is_the_minimal_norm_point(norm):
    rng = np.random.default_rng(0)
    d, checked = 6, 0
    for _ in range(25):
        t, w = rng.uniform(size=d), rng.normal(size=d)
        b = w @ t + rng.normal()
        delta = np.asarray(fab_mod.project_hyperplane(*(jnp.asarray(a, jnp.float32)[None] for a in (t, w)),
                                                      jnp.asarray([b], jnp.float32), norm))[0]
        z = t + delta
        assert np.all(z >= -1e-6) and np.all(z <= 1 + 1e-6)
        bounds = [(-t[i], 1 - t[i]) for i in range(d)]
        if norm == "linf":  # LP: min s s.t. |delta_i| <= s, w.delta = b - w.t, box
            res = linprog(np.r_[np.zeros(d), 1], A_ub=np.r_[np.c_[np.eye(d), -np.ones(d)], np.c_[-np.eye(d),
                          -np.ones(d)]], b_ub=np.zeros(2 * d), A_eq=np.r_[w, 0][None], b_eq=[b - w @ t],
                          bounds=bounds + [(0, None)])
            feasible, best, mine = res.status == 0, res.fun, np.abs(delta).max()
        else:
            res = minimize(lambda v: v @ v, np.zeros(d), method="SLSQP", bounds=bounds,
                           constraints=[{"type": "eq", "fun": lambda v: w @ v - (b - w @ t)}])
            feasible = res.success and abs(w @ res.x - (b - w @ t)) < 1e-6
            best, mine = np.sqrt(res.fun), np.linalg.norm(delta)
        if feasible:
            checked += 1
            assert abs(w @ z - b) < 1e-4
            assert mine == pytest.approx(best, rel=1e-4, abs=1e-6)
        else:  # unreachable inside the box: every coordinate at the box boundary in the helpful direction
            np.testing.assert_allclose(z, np.where(np.sign(b - w @ t) * w > 0, 1.0, np.where(w == 0, t, 0.0)),
                                       atol=1e-6)
    assert checked >= 15


def _exact_lambda(c, m, target):
    """The λ solving Σ c_i·min(λ, m_i) = target exactly (float64, by sorting the breakpoints), inf if unreachable."""
    order = np.argsort(m)
    ms, cs = m[order], c[order]
    reach = np.cumsum(cs * ms) + ms * (cs.sum() - np.cumsum(cs))  # F at each breakpoint
    k = int(np.sum(reach < target))
    if k == len(m):
        return np.inf
    below = np.cumsum(cs * ms)[k - 1] if k else 0.0
    return (target - below) / cs[k:].sum()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_box_projection_matches_a_sorted_exact_solution_at_image_size(norm):
    """At d = 3072 (a CIFAR image), rows from near the start to near (1e-3) and beyond the reachable limit: the
    bisection-then-linear solve equals the float64 sorted solution. (Closer to the limit λ rests on a residual below
    float32 resolution of the 3072-term sums, for any float32 method: the sort-based one it replaced was off by 0.6
    there in L2.)"""
    rng = np.random.default_rng(1)
    n, d = 12, 3072
    t, w = rng.uniform(size=(n, d)), rng.normal(size=(n, d)) * rng.uniform(0, 2, size=(n, 1))
    w[0, ::3] = 0.0  # zero weights
    u = np.sign(rng.normal(size=n))[:, None] * w
    full = np.sum(np.where(u > 0, 1 - t, -t) * w, 1)  # w·δ of the full move towards sign(u)
    frac = np.r_[1e-4, 0.3, 0.9, 0.99, 0.999, 1.5, rng.uniform(0, 1, n - 6)]
    b = np.sum(w * t, 1) + frac * full
    delta = np.asarray(fab_mod.project_hyperplane(*(jnp.asarray(a, jnp.float32) for a in (t, w, b)), norm),
                       np.float64)
    for i in range(n):
        gap = b[i] - w[i] @ t[i]
        ui = np.sign(gap) * w[i]
        room = np.where(ui > 0, 1 - t[i], t[i])
        c, m = (np.abs(ui), room) if norm == "linf" else (ui**2, np.where(ui != 0, room / np.maximum(np.abs(ui),
                                                                                                     1e-300), 0))
        lam = _exact_lambda(c, m, abs(gap))
        step = np.minimum(lam, m)
        expected = np.sign(ui) * step if norm == "linf" else ui * step
        np.testing.assert_allclose(delta[i], expected, atol=1e-4)
        if np.isfinite(lam):
            assert abs(w[i] @ (t[i] + delta[i]) - b[i]) < 1e-3 * max(1.0, abs(b[i]))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_finds_the_minimal_perturbation_of_a_linear_model(norm):
    rng = np.random.default_rng(3)
    d, c, n = 16, 10, 16
    w = jnp.asarray(rng.normal(size=(d, c)), jnp.float32)
    b = jnp.asarray(rng.normal(size=c), jnp.float32)
    x = jnp.asarray(0.5 + 0.02 * rng.normal(size=(n, 4, 4, 1)), jnp.float32)
    f = linear(w, b)
    logits = np.asarray(f(x))
    y = jnp.asarray(logits.argmax(1), jnp.int32)
    wn = np.asarray(w)
    q = (lambda a: np.abs(a).sum(0)) if norm == "linf" else (lambda a: np.sqrt((a**2).sum(0)))
    dist_to = np.stack([(logits[i, int(y[i])] - logits[i]) / np.maximum(q(wn[:, [int(y[i])]] - wn), 1e-12)
                        for i in range(n)])  # (n, c): distance to each linear boundary (box inactive)
    dist_to[np.arange(n), np.asarray(y)] = np.inf
    exact = dist_to.min(1)
    assert exact.max() < 0.3  # the box [0, 1] stays inactive
    run = jax.jit(lambda eps, steps=30: attacks.fab(f, x, y, key=KEY, eps=eps, norm=norm, steps=steps))
    out = run(1.0)
    got = np.asarray(apgd_mod.norm_of(out - x, norm))
    assert np.all(np.asarray(attacks.success(f, out, y)))
    np.testing.assert_array_less(exact * (1 - 1e-3), got)
    np.testing.assert_array_less(got, exact * 1.02)
    # FAB-T: the first target (largest other logit) already succeeds: the distance to that boundary
    second = np.argsort(-np.where(np.eye(c, dtype=bool)[np.asarray(y)], -np.inf, logits), 1)[:, 0]
    out_t = attacks.fab_t(f, x, y, key=KEY, eps=1.0, norm=norm, steps=30, n_target_classes=3)
    got_t = np.asarray(apgd_mod.norm_of(out_t - x, norm))
    np.testing.assert_allclose(got_t, dist_to[np.arange(n), second], rtol=0.02)
    # within a budget below the minimal distance nothing is found and x comes back
    np.testing.assert_array_equal(run(0.5 * float(exact.min())), x)


# --------------------------------------------------------------------------------------------------- Square
def test_square_schedule_and_window_sizes_are_the_references():
    p = square_mod.p_schedule
    assert [p(i) for i in (0, 10, 11, 50, 51, 200, 201, 500, 501, 1000, 1001, 8000, 8001)] == [
        0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05, 0.025, 0.8 / 256, 0.8 / 512]
    assert p(2501, n_queries=5000, rescale=True) == 0.8 / 128  # 2501 -> iteration 5002 of 10 000
    traced = jax.jit(lambda i: p(i))(jnp.arange(0, 9000, 7))
    np.testing.assert_allclose(traced, [p(int(i)) for i in range(0, 9000, 7)], rtol=1e-6)
    assert list(square_mod.window_sizes(0.8, 32, 32, "linf")) == [29, 20, 14, 10, 7, 5, 4, 3, 2, 1]
    l2 = square_mod.window_sizes(0.8, 32, 32, "l2")
    assert all(s % 2 == 1 and s >= 3 for s in l2) and l2[0] == 29


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_candidates_change_one_window_and_stay_in_the_ball(norm):
    n, eps = 6, 0.05 if norm == "linf" else 0.5
    x = jnp.asarray(np.random.default_rng(0).uniform(0.2, 0.8, size=(n, 16, 16, 3)), jnp.float32)
    keys = apgd_mod.example_keys(KEY, n)
    init = (square_mod._init_linf if norm == "linf" else square_mod._init_l2)(keys, x, eps)
    t = square_mod.square_step(x, eps, norm, keys)
    s = t.init(init)
    for i in (0, 100, 3000):  # p = 0.8, 0.2, 0.8/128
        u, s2 = t.update(jnp.zeros_like(x), s, init, value=jnp.zeros(n), success=jnp.zeros(n, bool), step=i)
        cand = init + u
        dist = np.asarray(apgd_mod.norm_of(cand - x, norm))
        np.testing.assert_allclose(dist, eps, rtol=1e-4)  # on the sphere (the box is inactive here)
        if norm == "linf":
            side = int(square_mod.window_sizes(0.8, 16, 16, norm)[square_mod._level(i, 5000, False)])
            changed = np.asarray(jnp.any(jnp.abs(cand - init) > 1e-7, axis=-1))  # (n, h, w)
            for j in range(n):  # changes only inside one side x side window
                rows, cols = np.nonzero(changed[j])
                if len(rows):
                    assert rows.max() - rows.min() < side and cols.max() - cols.min() < side
            np.testing.assert_allclose(np.abs(np.asarray(cand - x)), eps, rtol=1e-4)


def test_square_fools_a_linear_model_and_stops_at_success():
    f, w, b, x, y = _toy(n=32)
    out = attacks.square(f, x, y, key=KEY, eps=0.1, n_queries=1000)
    assert float(jnp.mean(attacks.predict(f, out) == y)) <= 0.05
    assert float(apgd_mod.norm_of(out - x, "linf").max()) <= 0.1 + 1e-6
    # deterministic for a key; another key gives other queries
    np.testing.assert_array_equal(out, attacks.square(f, x, y, key=KEY, eps=0.1, n_queries=1000))
    assert not np.allclose(out, attacks.square(f, x, y, key=jax.random.PRNGKey(1), eps=0.1, n_queries=1000))


# ------------------------------------------------------------------------------------------------- protocol
def test_versions_have_the_references_attacks_and_parameters():
    std = dict(aa_mod.protocol("standard"))
    assert list(std) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert std["apgd-ce"] == {"loss": "ce", "steps": 100, "restarts": 1, "rho": 0.75}
    assert std["apgd-t"]["n_target_classes"] == 9 and std["apgd-t"]["restarts"] == 1
    assert std["fab-t"] == {"steps": 100, "restarts": 1, "n_target_classes": 9, "alpha_max": 0.1, "eta": 1.05,
                            "beta": 0.9}
    assert std["square"] == {"n_queries": 5000, "p_init": 0.8, "loss": "margin"}
    plus = dict(aa_mod.protocol("plus"))
    assert list(plus) == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert plus["apgd-ce"]["restarts"] == plus["apgd-dlr"]["restarts"] == plus["fab"]["restarts"] == 5
    assert dict(aa_mod.protocol("rand"))["apgd-dlr"]["restarts"] == 1
    assert [a for a, _ in aa_mod.protocol("custom", ["square", "fab"])] == ["square", "fab"]
    with pytest.raises(ValueError, match="only used with version='custom'"):
        aa_mod.protocol("standard", ["square"])
    with pytest.raises(ValueError, match="needs attacks_to_run"):
        aa_mod.protocol("custom")
    with pytest.raises(ValueError, match="unknown version"):
        aa_mod.protocol("fast")
    with pytest.raises(ValueError, match="not in the protocol"):
        aa_mod.protocol("standard", options={"fab": {"steps": 3}})
    assert aa_mod.passes("apgd-t", std["apgd-t"], 10) == {"forward": 9 * 101 + 1, "backward": 900}
    assert aa_mod.passes("square", std["square"], 10) == {"forward": 5001, "backward": 0}


def test_every_new_attack_has_the_protocol_shape():
    f, w, b, x, y = _toy(n=4, shape=(8, 8, 1))
    calls = {
        "apgd": lambda **k: attacks.apgd(f, x, y, eps=0.05, steps=3, loop="fori", **k),
        "apgd_t": lambda **k: attacks.apgd_t(f, x, y, eps=0.05, steps=3, n_target_classes=2, loop="fori", **k),
        "fab": lambda **k: attacks.fab(f, x, y, eps=0.05, steps=3, loop="fori", **k),
        "fab_t": lambda **k: attacks.fab_t(f, x, y, eps=0.05, steps=3, n_target_classes=2, loop="fori", **k),
        "square": lambda **k: attacks.square(f, x, y, eps=0.05, n_queries=3, loop="fori", **k),
    }
    for name, call in calls.items():
        out = jax.jit(lambda k, call=call: call(key=k))(KEY)
        assert isinstance(out, jax.Array) and out.shape == x.shape and out.dtype == x.dtype, name
        assert float(out.min()) >= 0 and float(out.max()) <= 1, name
        assert float(jnp.abs(out - x).max()) <= 0.05 + 1e-6, name
        with pytest.raises(TypeError, match="key"):
            call()
    bad = np.asarray(x) * 3
    for fn in (attacks.apgd, attacks.square, attacks.fab, attacks.autoattack):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            fn(f, bad, y, key=KEY, eps=0.05)


def test_worst_case_over_attacks_and_batch_size_independence_on_a_toy():
    f, w, b, x, y = _toy(n=48, shape=(8, 8, 3), seed=2)
    eps = 0.02
    run = jax.jit(lambda x, y, idx: attacks.autoattack(f, x, y, key=KEY, eps=eps, options=QUICK, indices=idx,
                                                       return_robust=True))
    x_adv, masks = run(x, y, jnp.arange(48))
    robust = np.asarray(attacks.predict(f, x_adv) == y)
    np.testing.assert_array_equal(robust, masks["square"])
    assert 0 < robust.sum() < len(x)
    # the per-point worst case: robust exactly where every attack alone fails (same keys in and out of the protocol)
    singles = jax.jit(lambda x, y: {a: attacks.predict(f, aa_mod.run_protocol_attack(
        a, dict(aa_mod.protocol(options=QUICK))[a], f, x, y, key=KEY, norm="linf", eps=eps)) == y for a in QUICK})
    singles = {a: np.asarray(m) for a, m in singles(x, y).items()}
    np.testing.assert_array_equal(robust, np.logical_and.reduce(list(singles.values())))
    for a, m in singles.items():
        assert robust.sum() <= m.sum(), a
    assert sum(not np.array_equal(singles[a], robust) for a in singles) >= 1  # not one attack does it all
    # batch-size independence: the same points in batches of 16 (with their positions as indices), and a point's
    # result does not depend on the other points in its batch
    parts = [run(x[i:i + 16], y[i:i + 16], jnp.arange(i, i + 16)) for i in range(0, 48, 16)]
    np.testing.assert_allclose(np.concatenate([p[0] for p in parts]), x_adv, atol=1e-6)
    mixed = jnp.asarray(np.random.default_rng(0).permutation(48)[:16])
    np.testing.assert_allclose(run(x[mixed], y[mixed], mixed)[0], np.asarray(x_adv)[np.asarray(mixed)], atol=1e-6)


def test_rand_version_needs_an_eot_model_and_attacks_its_samples():
    f, w, b, x, y = _toy(n=16, shape=(8, 8, 1))
    with pytest.raises(ValueError, match="EOT"):
        attacks.autoattack(f, x, y, key=KEY, eps=0.05, version="rand")
    noisy = lambda k, z: f(z) + 0.5 * jax.random.normal(k, (z.shape[0], 10))
    model = attacks.eot(noisy, 4)
    opts = {"apgd-ce": {"steps": 5, "loop": "fori"}, "apgd-dlr": {"steps": 5, "loop": "fori"}}
    out = jax.jit(lambda x, y: attacks.autoattack(model, x, y, key=KEY, eps=0.05, version="rand", eot_samples=6,
                                                  options=opts))(x, y)
    assert out.shape == x.shape and float(jnp.abs(out - x).max()) <= 0.05 + 1e-6
    assert int(jnp.sum(attacks.predict(model, out) != y)) > 0


# ---------------------------------------------------------------------------------------------------- flags
def test_flags_catch_probabilities_randomness_and_zero_gradients():
    f, w, b, x, y = _toy(n=16, shape=(8, 8, 1))
    assert aa_mod.checks(f, x, y, attacks=["apgd-ce"]) == []
    probs = lambda z: jax.nn.softmax(f(z))
    assert any("probabilities" in m for m in aa_mod.checks(probs, x, y))
    noisy = attacks.eot(lambda k, z: f(z) + (k[-1] % 97).astype(jnp.float32) / 97, 2)  # key-dependent shift
    assert any("randomised" in m for m in aa_mod.checks(noisy, x, y))
    assert not any("randomised" in m for m in aa_mod.checks(noisy, x, y, version="rand"))
    flat = lambda z: f(jnp.round(z * 4) / 4)  # piecewise-constant input: zero gradients everywhere
    assert any("zero gradients: 16 of 16" in m for m in aa_mod.checks(flat, x, y))
    three = linear(w[:, :3], b[:3])
    assert any("target classes" in m for m in aa_mod.checks(three, x, y, attacks=["apgd-t"]))
    assert aa_mod.square_flag({"clean": 0.9, "apgd-ce": 0.5, "apgd-t": 0.45, "square": 0.44}) is not None
    assert aa_mod.square_flag({"clean": 0.9, "apgd-ce": 0.5, "apgd-t": 0.45, "square": 0.449}) is None
    assert aa_mod.square_flag({"clean": 0.9, "square": 0.1}) is None  # Square alone: nothing to compare


# ---------------------------------------------------------------------------------------------------- runner
def _runner():
    sys.path.insert(0, str(ROOT))
    return importlib.import_module("experiments.autoattack")


def test_cli_rejects_bad_flags_before_loading_anything():
    proc = subprocess.run([sys.executable, "-m", "experiments.autoattack", "--checkpoint=nope", "--eps=8/255"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert "no checkpoint 'nope'" in proc.stderr
    cli = _runner()
    good = dict(checkpoint=None, norm="linf", eps="8/255", version="standard", attacks=None, num_examples=10,
                batch_size=10, eot_samples=20, options=None)
    name = next(iter(__import__("robust_jax.checkpoints", fromlist=["x"]).available()), None)
    if name is None:
        pytest.skip("no checkpoint to validate against")
    good["checkpoint"] = name
    ns = lambda **kw: type("F", (), {**good, **kw})
    assert cli.check_flags(ns()) == (pytest.approx(8 / 255), None)
    for bad, message in (({"eps": "1/0"}, "not a number"), ({"eps": "-0.1"}, "> 0"), ({"norm": "l1"}, "--norm"),
                         ({"attacks": ["fab"]}, "only used with --version=custom"), ({"version": "fast"}, "--version"),
                         ({"version": "custom", "attacks": ["apgd"]}, "distinct names"),
                         ({"options": "{bad"}, "not valid JSON"), ({"num_examples": 0}, ">= 1")):
        with pytest.raises(ValueError, match=message):
            cli.check_flags(ns(**bad))


def test_runner_drops_fooled_points_and_resumes_after_a_kill(tmp_path, monkeypatch):
    from robust_jax import autoattack_eval, runner

    f, w, b, x, y = _toy(n=40, shape=(8, 8, 3), seed=2)
    builder = lambda v: linear(v[0], v[1])
    names = ["apgd-ce", "apgd-t"]
    opts = {a: QUICK[a] for a in names}
    kw = dict(key=KEY, norm="linf", eps=0.02, version="custom", attacks_to_run=names, options=opts, batch_size=8,
              progress=False)
    full = autoattack_eval.evaluate(builder, (w, b), x, y, **kw)
    # the host runner agrees with the jitted protocol point by point
    _, masks = jax.jit(lambda x, y: attacks.autoattack(f, x, y, key=KEY, eps=0.02, version="custom",
                                                       attacks_to_run=names, options=opts, return_robust=True))(x, y)
    for a in names:
        np.testing.assert_array_equal(full["robust"][a], masks[a])
    assert full["passes"]["apgd-t"]["images_attacked"] == int(np.asarray(masks["apgd-ce"]).sum())
    assert full["passes"]["apgd-t"]["images_attacked"] > 8  # APGD-T takes more than one chunk
    # kill the run during its second chunk of APGD-T, then start it again
    real, calls = runner.run_attack, []

    def dying(*a, **k):
        calls.append(k["desc"])
        if calls.count("apgd-t") == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner, "run_attack", dying)
    with pytest.raises(KeyboardInterrupt):
        autoattack_eval.evaluate(builder, (w, b), x, y, state=tmp_path / "state.npz", config={"k": 1}, **kw)
    monkeypatch.setattr(runner, "run_attack", real)
    state = json.loads(str(np.load(tmp_path / "state.npz")["meta"]))
    assert state["attacks"]["apgd-ce"]["done"] and state["attacks"]["apgd-t"]["position"] == 8
    resumed = autoattack_eval.evaluate(builder, (w, b), x, y, state=tmp_path / "state.npz", config={"k": 1}, **kw)
    np.testing.assert_array_equal(resumed["x_adv"], full["x_adv"])
    assert resumed["robust_accuracy"] == full["robust_accuracy"]
    with pytest.raises(ValueError, match="different configuration"):
        autoattack_eval.evaluate(builder, (w, b), x, y, state=tmp_path / "state.npz", config={"k": 2}, **kw)


# ------------------------------------------------------------------------------------- trained models (slow)
@pytest.mark.slow
def test_apgd_ce_is_at_least_as_strong_as_pgd_with_the_same_budget(real_test_images):
    m, x, y = real_test_images("mnist_basic_cnn", 64)
    f = lambda v: functools.partial(m.apply, v)
    kw = dict(eps=0.1, steps=100)
    a = jax.jit(lambda v, x, y: attacks.apgd(f(v), x, y, key=KEY, **kw))(m.variables, x, y)
    p = jax.jit(lambda v, x, y: attacks.pgd(f(v), x, y, key=KEY, step_size=0.01, **kw))(m.variables, x, y)
    acc_a, acc_p = (float(jnp.mean(attacks.predict(m, z) == y)) for z in (a, p))
    assert acc_a <= acc_p, (acc_a, acc_p)
    assert float(jnp.abs(a - x).max()) <= 0.1 + 1e-6


@pytest.mark.slow
def test_square_alone_breaks_an_undefended_model(real_test_images):
    m, x, y = real_test_images("cifar10_resnet10", 16)
    out = jax.jit(lambda v, x, y: attacks.square(functools.partial(m.apply, v), x, y, key=KEY, eps=8 / 255,
                                                 n_queries=3000))(m.variables, x, y)
    assert float(jnp.mean(attacks.predict(m, out) == y)) <= 0.05


@pytest.mark.slow
def test_protocol_on_trained_models(real_test_images):
    """Undefended: 0% robust. Adversarially trained: the robust set is the intersection of the single attacks'
    and does not depend on the batch size (32 vs 128). Reduced budgets (``quick``) keep it affordable."""
    quick = {"apgd-ce": {"steps": 20}, "apgd-t": {"steps": 20, "n_target_classes": 2},
             "fab-t": {"steps": 20, "n_target_classes": 2}, "square": {"n_queries": 200}}
    m, x, y = real_test_images("cifar10_resnet10", 16)
    aa = lambda mm, **kw: jax.jit(lambda v, x, y, idx: attacks.autoattack(
        functools.partial(mm.apply, v), x, y, key=KEY, eps=8 / 255, indices=idx, **kw))
    out = aa(m, options=quick)(m.variables, x, y, jnp.arange(16))
    assert float(jnp.mean(attacks.predict(m, out) == y)) == 0.0

    m, x, y = real_test_images("cifar10_resnet10_pgd", 128)
    full = aa(m, options=quick)(m.variables, x, y, jnp.arange(128))
    robust = np.asarray(attacks.predict(m, full) == y)
    assert 0.2 < robust.mean() < 0.6
    run32 = aa(m, options=quick)
    parts = [run32(m.variables, x[i:i + 32], y[i:i + 32], jnp.arange(i, i + 32)) for i in range(0, 128, 32)]
    np.testing.assert_array_equal(np.asarray(attacks.predict(m, jnp.concatenate(parts)) == y), robust)
    singles = []
    for a in quick:
        single = aa(m, version="custom", attacks_to_run=[a], options={a: quick[a]})(m.variables, x[:32], y[:32],
                                                                                     jnp.arange(32))
        singles.append(np.asarray(attacks.predict(m, single) == y[:32]))
    np.testing.assert_array_equal(robust[:32], np.logical_and.reduce(singles))
