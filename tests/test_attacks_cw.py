"""Properties of the Carlini & Wagner L2 attack that could fail."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy import linear, toy_linear

from robust_jax import attacks
from robust_jax.attacks.cw import cw_l2, cw_loss, from_tanh_space, to_tanh_space

# The rolled loop (cw_l2's "auto"); test_unrolled_and_rolled_loops_agree checks the unrolled form computes the same.
FAST = dict(loop="fori", key=jax.random.PRNGKey(0))


_linear = linear


def _toy(n=16, shape=(4, 4, 1), c=3, seed=0):
    return toy_linear(n, shape, c, seed, labels="predicted")


def _l2(a, x):
    return np.linalg.norm(np.asarray(a - x).reshape(len(x), -1), axis=1)


def _margin(f, a, y):
    """CW margin max_{j≠y} z_j − z_y (> 0 once misclassified)."""
    return np.asarray(attacks.cw_margin(f(a), y))


def test_tanh_space_round_trip_and_box():
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 5, 5, 1)), jnp.float32).at[0, 0, 0, 0].set(0.0)
    x = x.at[0, 0, 1, 0].set(1.0)
    w = to_tanh_space(x)
    assert np.isfinite(np.asarray(w)).all()
    np.testing.assert_allclose(from_tanh_space(w), x, atol=1e-6)
    big = from_tanh_space(jnp.asarray([-50.0, -3.0, 0.0, 3.0, 50.0]))
    assert float(big.min()) >= 0 and float(big.max()) <= 1


def test_cw_loss_formula():
    z = jnp.asarray([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    y = jnp.asarray([0, 1])
    # untargeted: max(z_y − max_{j≠y} z_j, −κ)
    np.testing.assert_allclose(cw_loss(z, y), [2.0, 0.0])  # example 2 is misclassified by 3 -> floored at -0
    np.testing.assert_allclose(cw_loss(z, y, confidence=1.0), [2.0, -1.0])
    # targeted: max(max_{j≠t} z_j − z_t, −κ)
    np.testing.assert_allclose(cw_loss(z, y, targeted=True, confidence=10.0), [-2.0, 3.0])


@pytest.mark.parametrize("targeted", [False, True])
def test_toy_success_box_fallback_and_determinism(targeted):
    f, _, _, x, y = _toy()
    t = (y + 1) % 3 if targeted else y
    # few steps and one round at a small constant: some examples succeed, some fail
    run = functools.partial(cw_l2, f, x, t, targeted=targeted, steps=10, lr=0.05, binary_search_steps=1,
                            initial_const=0.3, **FAST)
    adv = run()
    np.testing.assert_array_equal(adv, run())  # deterministic
    assert adv.shape == x.shape and adv.dtype == jnp.float32
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    ok = np.asarray(attacks.success(f, adv, t, targeted=targeted))
    assert 0 < ok.sum() < len(x), ok  # the setting is informative: both outcomes occur
    pred = np.asarray(attacks.predict(f, adv))
    if targeted:
        assert (pred[ok] == np.asarray(t)[ok]).all()
    else:
        assert (pred[ok] != np.asarray(y)[ok]).all()
    changed = _l2(adv, x) > 0
    np.testing.assert_array_equal(np.asarray(adv)[~ok], np.asarray(x)[~ok])  # failures return x exactly
    assert changed[ok].all()


def test_toy_full_attack_succeeds_everywhere_with_small_l2():
    f, w, _, x, y = _toy()
    adv = cw_l2(f, x, y, steps=100, lr=0.05, binary_search_steps=6, initial_const=1.0, **FAST)
    assert bool(attacks.success(f, adv, y).all())
    # lower bound: to flip a linear classifier, an L2 step of at least margin / max_j ‖w_y − w_j‖ is needed
    z = np.asarray(f(x))
    yy = np.asarray(y)
    wn = np.asarray(w)
    bound = np.array([min((z[i, yy[i]] - z[i, j]) / np.linalg.norm(wn[:, yy[i]] - wn[:, j])
                          for j in range(3) if j != yy[i]) for i in range(len(x))])
    d = _l2(adv, x)
    assert (d >= bound - 1e-4).all()
    # and CW finds (close to) the minimum: within 25 % of the unconstrained closed-form distance, where the box
    # does not bind (x ∈ (0, 1) and the optimum is tiny compared with the distance to the box)
    assert np.median(d / np.maximum(bound, 1e-6)) < 1.25, np.round(d / bound, 2)


def test_higher_confidence_needs_larger_perturbation():
    f, _, _, x, y = _toy(n=24, seed=1)
    kw = dict(steps=100, lr=0.05, binary_search_steps=6, initial_const=1.0, **FAST)
    by_kappa = [cw_l2(f, x, y, confidence=k, **kw) for k in (0.0, 1.0, 3.0)]
    oks = [np.asarray(attacks.success(f, a, y)) for a in by_kappa]
    both = oks[0] & oks[1] & oks[2]
    assert both.mean() >= 0.9
    dists = [_l2(a, x)[both] for a in by_kappa]
    assert dists[0].mean() < dists[1].mean() < dists[2].mean(), [d.mean() for d in dists]
    # per example too, up to the optimiser's slack
    assert (dists[0] <= dists[2] + 1e-3).all()
    # and the confidence is honoured: the margin is at least κ on every success
    for k, a, ok in zip((0.0, 1.0, 3.0), by_kappa, oks):
        assert (_margin(f, a, y)[ok] >= k - 1e-4).all()


def test_returns_smallest_success_over_rounds():
    """More binary-search rounds never return a larger distance: the best over all rounds is kept."""
    f, _, _, x, y = _toy(n=16, seed=2)
    kw = dict(steps=60, lr=0.05, initial_const=1.0, **FAST)
    few, many = (cw_l2(f, x, y, binary_search_steps=b, **kw) for b in (2, 6))
    ok_few, ok_many = (np.asarray(attacks.success(f, a, y)) for a in (few, many))
    assert (ok_many | ~ok_few).all()
    both = ok_few & ok_many
    assert both.any()
    assert (_l2(many, x)[both] <= _l2(few, x)[both] + 1e-6).all()
    assert _l2(many, x)[both].mean() < _l2(few, x)[both].mean()


def test_batch_independent_and_jit():
    f, w, b, x, y = _toy(n=8)
    kw = dict(steps=30, lr=0.05, binary_search_steps=3, initial_const=0.5, **FAST)
    full = cw_l2(f, x, y, **kw)
    half = cw_l2(f, x[:4], y[:4], **kw)
    np.testing.assert_allclose(full[:4], half, atol=1e-6)
    jitted = jax.jit(lambda params, x, y: cw_l2(_linear(*params), x, y, **kw))
    np.testing.assert_allclose(jitted((w, b), x, y), full, atol=1e-6)


def test_unrolled_and_rolled_loops_agree():
    f, _, _, x, y = _toy(n=4)
    kw = dict(steps=6, lr=0.05, binary_search_steps=2, initial_const=3.0, key=jax.random.PRNGKey(0))
    rolled = cw_l2(f, x, y, loop="fori", **kw)
    np.testing.assert_allclose(cw_l2(f, x, y, loop="unroll", **kw), rolled, atol=1e-6)


def test_eot_model_does_not_break():
    f, _, _, x, y = _toy(n=8)
    wrapped = attacks.eot(lambda k, z: f(z) + 0.1 * jax.random.normal(k, (z.shape[0], 3)), num_samples=4)
    adv = cw_l2(wrapped, x, y, steps=40, lr=0.05, binary_search_steps=3, initial_const=1.0, **FAST)
    ok = np.asarray(attacks.success(wrapped, adv, y))
    assert ok.mean() >= 0.5
    np.testing.assert_array_equal(np.asarray(adv)[~ok], np.asarray(x)[~ok])
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1


def test_bad_inputs():
    f, _, _, x, y = _toy(n=4)
    cw_l2 = functools.partial(attacks.cw_l2, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cw_l2(f, x * 255, y)
    with pytest.raises(ValueError, match="shape"):
        cw_l2(f, x, y[:3])
    with pytest.raises(TypeError, match="integer"):
        cw_l2(f, x, y.astype(jnp.float32))
    with pytest.raises(ValueError, match="steps >= 1"):
        cw_l2(f, x, y, steps=0)
    with pytest.raises(ValueError, match="binary_search_steps >= 1"):
        cw_l2(f, x, y, binary_search_steps=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        cw_l2(f, x, y, lr=0.0)
    with pytest.raises(ValueError, match="initial_const must be > 0"):
        cw_l2(f, x, y, initial_const=-1.0)
    with pytest.raises(ValueError, match="confidence must be >= 0"):
        cw_l2(f, x, y, confidence=-1.0)
    with pytest.raises(ValueError, match="unknown loop"):
        cw_l2(f, x, y, loop="while")


# ------------------------------------------------------------------------------------------ on the real model
def _mnist_correct(real_test_images, n):
    m, x, y = real_test_images("mnist_basic_cnn", n + n // 5 + 5)
    ok = np.asarray(attacks.predict(m, x) == y)
    assert ok.sum() >= n
    return m, x[ok][:n], y[ok][:n]


def _cw_jit(m, **kw):
    return jax.jit(lambda v, x, y: cw_l2(functools.partial(m.apply, v), x, y, **{"key": jax.random.PRNGKey(0), **kw}))


def test_cw_fools_mnist_cnn_quick(real_test_images):
    m, x, y = _mnist_correct(real_test_images, 20)
    adv = _cw_jit(m, steps=20, lr=0.2, binary_search_steps=2, initial_const=3.0, **FAST)(m.variables, x, y)
    ok = np.asarray(attacks.success(m, adv, y))
    assert ok.mean() >= 0.8, ok
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    np.testing.assert_array_equal(np.asarray(adv)[~ok], np.asarray(x)[~ok])
    # small perturbations (this short budget gives mean L2 ~2.7; two different MNIST digits are ~9 apart)
    assert _l2(adv, x)[ok].mean() < 3.5


def _min_pgd_l2(m, x, y, radii, steps=20):
    """Per example, the L2 distance of the PGD-L2 adversarial at the smallest radius of `radii` that fools it."""
    attack = jax.jit(lambda v, x, y, eps: attacks.pgd(functools.partial(m.apply, v), x, y, key=jax.random.PRNGKey(0),
                                                      eps=eps, step_size=2.5 * eps / steps, steps=steps, norm="l2"))
    dist = np.full(len(x), np.inf)
    for eps in radii:  # ascending
        adv = attack(m.variables, x, y, jnp.float32(eps))
        ok = np.asarray(attacks.success(m, adv, y)) & ~np.isfinite(dist)
        dist[ok] = _l2(adv, x)[ok]
    return dist


@pytest.mark.slow
def test_cw_l2_mnist_beats_pgd_l2(real_test_images):
    m, x, y = _mnist_correct(real_test_images, 100)
    adv = _cw_jit(m, steps=100, lr=0.1, binary_search_steps=5, initial_const=1.0, **FAST)(m.variables, x, y)
    ok_cw = np.asarray(attacks.success(m, adv, y))
    assert ok_cw.mean() >= 0.99
    np.testing.assert_array_equal(np.asarray(adv)[~ok_cw], np.asarray(x)[~ok_cw])
    d_cw = _l2(adv, x)
    # PGD-L2 gets its best shot: per example the smallest radius of a grid that fools it
    d_pgd = _min_pgd_l2(m, x, y, radii=(1.0, 1.5, 2.0, 2.5, 3.0))
    ok_pgd = np.isfinite(d_pgd)
    assert ok_pgd.mean() >= 0.9
    both = ok_cw & ok_pgd
    assert d_cw[both].mean() < d_pgd[both].mean(), (d_cw[both].mean(), d_pgd[both].mean())
    assert np.median(d_cw[both] / d_pgd[both]) < 1.0
