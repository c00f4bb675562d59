"""The attack engine and the attack protocol, checked against hand-derived references and brute force."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy import toy_linear

from robust_jax import attacks
from robust_jax.attacks import engine

KEY = jax.random.PRNGKey(0)


def _toy(n=8, seed=0, labels="random"):
    return toy_linear(n, (4, 4, 1), 3, seed, labels=labels)


def _ce_grad(w, x, logits, y):
    """d CE / d x of a linear model, by hand: W (softmax - onehot)."""
    p = jax.nn.softmax(logits)
    return ((p - jax.nn.one_hot(y, w.shape[1])) @ w.T).reshape(x.shape)


# ------------------------------------------------------------------------------------------------------ steps
def test_l2_pgd_step_is_the_normalised_hand_gradient():
    f, w, b, x, y = _toy()
    g = _ce_grad(w, x, f(x), y)
    step = g / np.linalg.norm(np.asarray(g).reshape(len(x), -1), axis=1)[:, None, None, None]
    expected = attacks.project(x + 0.3 * step, x, 0.5, "l2")
    out = attacks.pgd(f, x, y, key=KEY, eps=0.5, step_size=0.3, steps=1, norm="l2", random_start=False)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_value_columns_give_one_gradient_each():
    f, w, b, x, y = _toy()

    def value_fn(z, k):
        logits = f(z)
        return engine.Evaluation(jnp.stack([logits[:, 0], 2.0 * logits[:, 1]], 1), jnp.zeros(len(z), bool))

    ev, g = engine._value_and_grads(value_fn, lambda v: v, x, KEY)
    assert g.shape == (2, *x.shape)
    np.testing.assert_allclose(g[0], jnp.broadcast_to(w[:, 0].reshape(1, 4, 4, 1), x.shape), atol=1e-6)
    np.testing.assert_allclose(g[1], jnp.broadcast_to(2 * w[:, 1].reshape(1, 4, 4, 1), x.shape), atol=1e-6)


# ------------------------------------------------------------------------------------------------ bookkeeping
def _trajectory(f, x, y, steps, **kw):
    """Every iterate of one PGD trajectory (keep="last", recorded at each step) with its objective and success."""
    snaps = attacks.pgd_snapshots(f, x, y, key=KEY, snapshots=range(1, steps + 1), **kw)
    start = attacks.pgd(f, x, y, key=KEY, steps=0, **kw)  # the random start: iterate 0
    its = [start] + [snaps[k] for k in range(1, steps + 1)]
    vals = [np.asarray(attacks.cross_entropy(f(z), y)) for z in its]
    oks = [np.asarray(attacks.success(f, z, y)) for z in its]
    return its, vals, oks


def _wiggly(n, seed):
    """A non-linear toy (logits of sin(12 x)): sign steps overshoot, so the objective oscillates along PGD."""
    _, w, b, x, _ = _toy(n=n, seed=seed)
    f = lambda z: jnp.sin(12.0 * z).reshape(z.shape[0], -1) @ w + b
    return f, x, jnp.argmax(f(x), -1).astype(jnp.int32)


def test_keep_best_returns_the_brute_force_best_iterate():
    f, x, y = _wiggly(32, 3)
    kw = dict(eps=0.08, step_size=0.05)
    its, vals, oks = _trajectory(f, x, y, 6, **kw)
    best = attacks.pgd(f, x, y, key=KEY, steps=6, keep="best", **kw)
    for i in range(len(x)):
        ranked = sorted(range(7), key=lambda t: (oks[t][i], vals[t][i]), reverse=True)
        np.testing.assert_allclose(best[i], its[ranked[0]][i], atol=1e-6)
    last = attacks.pgd(f, x, y, key=KEY, steps=6, **kw)
    assert not np.allclose(best, last)  # the case is informative
    assert attacks.success(f, best, y).sum() >= attacks.success(f, last, y).sum()


def test_early_stop_freezes_each_example_at_its_first_success():
    f, x, y = _wiggly(32, 4)
    its, vals, oks = _trajectory(f, x, y, 8, eps=0.05, step_size=0.02)

    def value_fn(z, k):
        logits = f(z)
        return engine.Evaluation(attacks.cross_entropy(logits, y), attacks.is_success(logits, y))

    k_start, k_steps = jax.random.split(KEY)
    res = engine.run(value_fn, its[0], key=k_steps, steps=8, optimizer=engine.sign_ascent(0.02),
                     project=lambda v: attacks.project(v, x, 0.05, "linf"), keep="best", early_stop=True)
    n_first = 0
    for i in range(len(x)):
        first = next((t for t in range(9) if oks[t][i]), None)
        if first is None:
            assert not bool(res.success[i])
        else:
            n_first += 1
            np.testing.assert_allclose(res.x[i], its[first][i], atol=1e-6)
            assert bool(res.success[i])
    assert 0 < n_first < len(x)


def test_restarts_pick_the_first_successful_run_else_the_highest_objective():
    f, x, y = _wiggly(32, 5)
    kw = dict(eps=0.05, step_size=0.02, steps=3)
    runs = [attacks.pgd(f, x, y, key=jax.random.fold_in(KEY, r), **kw) for r in range(4)]
    oks = np.stack([np.asarray(attacks.success(f, a, y)) for a in runs])
    vals = np.stack([np.asarray(attacks.cross_entropy(f(a), y)) for a in runs])
    out = attacks.pgd(f, x, y, key=KEY, restarts=4, **kw)
    for i in range(len(x)):
        r = int(np.argmax(oks[:, i])) if oks[:, i].any() else int(np.argmax(vals[:, i]))
        np.testing.assert_allclose(out[i], runs[r][i], atol=1e-6)
    assert 0 < oks.any(0).sum() and oks.any(0).sum() > oks[0].sum()  # restarts found more


# ---------------------------------------------------------------------------------------------------- sweeps
def test_eps_sweep_equals_per_value_calls():
    f, _, _, x, y = _toy(n=16)
    eps = jnp.asarray([0.0, 0.02, 0.05, 0.1])
    swept = attacks.pgd(f, x, y, key=KEY, eps=eps, step_size=eps / 4, steps=5)
    assert swept.shape == (4, *x.shape)
    for i, e in enumerate(np.asarray(eps)):
        np.testing.assert_allclose(swept[i], attacks.pgd(f, x, y, key=KEY, eps=e, step_size=e / 4, steps=5),
                                   atol=1e-6)
    fg = attacks.fgsm(f, x, y, key=KEY, eps=eps)
    for i, e in enumerate(np.asarray(eps)):
        np.testing.assert_allclose(fg[i], attacks.fgsm(f, x, y, key=KEY, eps=e), atol=1e-6)
    # accuracy can only fall along a Linf FGSM sweep of a linear model (the sign step is the same direction)
    acc = [float(jnp.mean(attacks.predict(f, a) == y)) for a in fg]
    assert all(b <= a for a, b in zip(acc, acc[1:]))


def test_lam_sweep_equals_per_value_calls_and_jits_once():
    f, _, _, x, y = _toy(n=16)
    lams = jnp.asarray([0.0, 0.5, 3.0])
    traces = []

    def attack(x, y, lam):
        traces.append(1)
        return attacks.le_pgd(f, x, y, key=KEY, eps=0.1, step_size=0.02, steps=4, lam=lam)

    swept = jax.jit(attack)(x, y, lams)
    for i, lam in enumerate(np.asarray(lams)):
        np.testing.assert_allclose(swept[i], attack(x, y, float(lam)), atol=1e-6)
    np.testing.assert_allclose(swept[0], attacks.pgd(f, x, y, key=KEY, eps=0.1, step_size=0.02, steps=4),
                               atol=1e-6)


def test_compiles_once_for_new_weights_and_budgets():
    _, w, b, x, y = _toy()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def attack(params, x, y, k, eps):
        f = lambda z: z.reshape(z.shape[0], -1) @ params[0] + params[1]
        return attacks.pgd(f, x, y, key=k, eps=eps, step_size=eps / 4, steps=3)

    a = attack((w, b), x, y, KEY, 0.1)
    c = attack((2 * w, b), x, y, jax.random.PRNGKey(1), 0.05)
    assert not np.allclose(a, c)


# ------------------------------------------------------------------------------------------------ validation
def test_integer_images_are_a_trace_time_error_under_jit():
    f, _, _, x, y = _toy()
    x8 = (np.asarray(x) * 255).astype(np.uint8)
    attack = jax.jit(lambda x, y, k: attacks.pgd(f, x, y, key=k, eps=0.1, step_size=0.02, steps=2))
    with pytest.raises(TypeError, match="floating-point"):
        attack(x8, y, KEY)
    for fn in (attacks.fgsm, functools.partial(attacks.cw_l2, steps=1, binary_search_steps=1)):
        with pytest.raises(TypeError, match="floating-point"):
            fn(f, x8, y, key=KEY, **({"eps": 0.1} if fn is attacks.fgsm else {}))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        attacks.pgd(f, x, y, key=KEY, eps=jnp.asarray([0.1, -0.1]), step_size=0.01, steps=1)


def test_nan_and_out_of_range_never_pass_silently():
    f, _, _, x, y = _toy()
    bad = np.asarray(x).copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        attacks.pgd(f, bad, y, key=KEY, eps=0.1, step_size=0.02, steps=2)
    attack = jax.jit(lambda x, y, k: attacks.pgd(f, x, y, key=k, eps=0.1, step_size=0.02, steps=2))
    attack(x, y, KEY).block_until_ready()  # a clean batch runs
    for batch in (bad, np.asarray(x) * 3):
        with pytest.raises(Exception, match=r"NaN|\[0, 1\]"):
            attack(batch, y, KEY).block_until_ready()
    # the documented escape hatch: validate=False compiles no check
    out = jax.jit(lambda x, y, k: attacks.pgd(f, x, y, key=k, eps=0.1, step_size=0.02, steps=2,
                                              validate=False))(bad, y, KEY)
    assert np.isnan(np.asarray(out)).any()


def test_every_attack_has_the_protocol_shape():
    f, _, _, x, y = _toy(n=4, labels="predicted")
    t = (y + 1) % 3
    fam = attacks.family("rotation", degrees=10)
    calls = {
        "fgsm": lambda k: attacks.fgsm(f, x, y, key=k, eps=0.05),
        "pgd": lambda k: attacks.pgd(f, x, y, key=k, eps=0.05, step_size=0.01, steps=2),
        "le_pgd": lambda k: attacks.le_pgd(f, x, y, key=k, eps=0.05, step_size=0.01, steps=2, lam=1.0),
        "cw_l2": lambda k: attacks.cw_l2(f, x, y, key=k, steps=2, binary_search_steps=1),
        "jsma": lambda k: attacks.jsma(f, x, t, key=k, targeted=True, gamma=0.2),
        "worst_of_k": lambda k: attacks.worst_of_k(f, x, y, key=k, family=fam, k=2),
    }
    for name, call in calls.items():
        out = call(KEY)
        assert isinstance(out, jax.Array) and out.shape == x.shape and out.dtype == x.dtype, name
        assert float(out.min()) >= 0 and float(out.max()) <= 1, name
    for fn in (attacks.fgsm, attacks.pgd, attacks.le_pgd, attacks.cw_l2, attacks.jsma, attacks.worst_of_k):
        with pytest.raises(TypeError, match="key"):
            fn(f, x, y, eps=0.1)  # key is required everywhere


def test_heteroscedastic_outputs_are_attacked_through_their_mean_logits():
    f, _, _, x, y = _toy(n=8, labels="predicted")
    hetero = lambda z: (f(z), jnp.zeros((z.shape[0], 3)))
    fam = attacks.family("rotation", degrees=20)
    np.testing.assert_array_equal(attacks.worst_of_k(hetero, x, y, key=KEY, family=fam, k=3),
                                  attacks.worst_of_k(f, x, y, key=KEY, family=fam, k=3))
    np.testing.assert_array_equal(attacks.pgd(hetero, x, y, key=KEY, eps=0.1, step_size=0.02, steps=3),
                                  attacks.pgd(f, x, y, key=KEY, eps=0.1, step_size=0.02, steps=3))


def test_plain_optax_optimisers_plug_in():
    """Any optax transform is an attack step: SGD on the CE objective with a box projection."""
    f, w, b, x, y = _toy()

    def value_fn(z, k):
        logits = f(z)
        return engine.Evaluation(attacks.cross_entropy(logits, y), attacks.is_success(logits, y))

    out = engine.run(value_fn, x, key=KEY, steps=1, optimizer=optax.sgd(0.1),
                     project=lambda v: jnp.clip(v, 0, 1)).x
    np.testing.assert_allclose(out, jnp.clip(x + 0.1 * _ce_grad(w, x, f(x), y), 0, 1), atol=1e-6)
