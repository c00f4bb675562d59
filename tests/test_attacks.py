"""Properties of the gradient attacks (FGSM, PGD, LE-PGD, EOT) that could fail."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy import linear, toy_linear

from robust_jax import attacks, energy, runner

KEY = jax.random.PRNGKey(0)


_linear = linear


def _toy(n=8, shape=(4, 4, 1), c=3, seed=0):
    return toy_linear(n, shape, c, seed)


def test_fgsm_equals_hand_gradient():
    f, w, b, x, y = _toy()
    logits = f(x)
    p = jax.nn.softmax(logits)
    # d CE / d x = W (p - onehot(y)), by hand
    grad = ((p - jax.nn.one_hot(y, 3)) @ w.T).reshape(x.shape)
    expected = jnp.clip(x + 0.1 * jnp.sign(grad), 0, 1)
    np.testing.assert_allclose(attacks.fgsm(f, x, y, key=KEY, eps=0.1), expected, atol=1e-6)


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5)])
def test_pgd_ball_box_and_determinism(norm, eps):
    f, _, _, x, y = _toy()
    run = functools.partial(attacks.pgd, f, x, y, eps=eps, step_size=eps / 4, steps=7, norm=norm)
    a, b, c = run(key=KEY), run(key=KEY), run(key=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    d = (a - x).reshape(len(x), -1)
    size = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
    assert size.max() <= eps * (1 + 1e-5)


def test_l2_projection_exact():
    x = jnp.full((2, 3, 3, 1), 0.5)
    delta = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 1)), jnp.float32) * 0.1
    out = attacks.project(x + delta, x, 0.1, "l2")
    n = np.linalg.norm(np.asarray(delta).reshape(2, -1), axis=1)
    expected = x + delta * np.minimum(1, 0.1 / n)[:, None, None, None]
    np.testing.assert_allclose(out, np.clip(expected, 0, 1), atol=1e-6)
    inside = attacks.project(x + delta * 1e-3, x, 0.1, "l2")
    np.testing.assert_allclose(inside, x + delta * 1e-3, atol=1e-7)  # points inside are unchanged


def test_pgd_raises_loss_and_restarts_keep_best():
    f, _, _, x, y = _toy(n=32)
    ce = lambda z: attacks.cross_entropy(f(z), y)
    adv = attacks.pgd(f, x, y, key=KEY, eps=0.1, step_size=0.02, steps=10)
    assert float(ce(adv).mean()) > float(ce(x).mean())
    one = attacks.success(f, attacks.pgd(f, x, y, key=KEY, eps=0.03, step_size=0.01, steps=3), y)
    many = attacks.success(f, attacks.pgd(f, x, y, key=KEY, eps=0.03, step_size=0.01, steps=3, restarts=4), y)
    assert int(many.sum()) >= int(one.sum())


def test_targeted_moves_towards_target():
    f, _, _, x, y = _toy(n=32)
    target = (y + 1) % 3
    adv = attacks.pgd(f, x, target, key=KEY, eps=0.5, step_size=0.05, steps=30, targeted=True)
    assert float(jnp.mean(attacks.predict(f, adv) == target)) > float(jnp.mean(attacks.predict(f, x) == target))


def test_bad_inputs():
    f, _, _, x, y = _toy()
    with pytest.raises(ValueError, match="eps must be >= 0"):
        attacks.fgsm(f, x, y, key=KEY, eps=-0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attacks.fgsm(f, x * 255, y, key=KEY, eps=0.1)
    with pytest.raises(ValueError, match="shape"):
        attacks.pgd(f, x, y[:3], key=KEY, eps=0.1, step_size=0.1, steps=1)
    with pytest.raises(ValueError, match="unknown norm"):
        attacks.pgd(f, x, y, key=KEY, eps=0.1, step_size=0.1, steps=1, norm="l1")
    with pytest.raises(ValueError, match="unknown loss"):
        attacks.pgd(f, x, y, key=KEY, eps=0.1, step_size=0.1, steps=1, loss="hinge")


def test_jit_with_traced_params_compiles_once():
    _, w, b, x, y = _toy()
    traces = []

    def attack(params, x, y, k):
        traces.append(1)
        return attacks.pgd(lambda z: _linear(*params)(z), x, y, key=k, eps=0.1, step_size=0.02, steps=3)

    jitted = jax.jit(attack)
    a1 = jitted((w, b), x, y, KEY)
    a2 = jitted((w * 2, b + 1), x, y, KEY)
    assert len(traces) == 1
    assert not np.allclose(a1, a2)
    np.testing.assert_allclose(a1, attack((w, b), x, y, KEY), atol=1e-6)


def test_eot_gradient_is_mean_of_sample_gradients():
    f, w, b, x, y = _toy()
    noise_scale = 0.5

    def stochastic(k, z):
        return f(z) + noise_scale * jax.random.normal(k, (z.shape[0], 3)) * f(z)

    wrapped = attacks.eot(stochastic, num_samples=6)
    key = jax.random.PRNGKey(5)
    _, g = attacks.input_grad(wrapped, attacks.cross_entropy, x, y, key=key)
    per_sample = [attacks.input_grad(functools.partial(stochastic, k), attacks.cross_entropy, x, y, key=KEY)[1]
                  for k in jax.random.split(key, 6)]
    np.testing.assert_allclose(g, np.mean(per_sample, axis=0), rtol=1e-5, atol=1e-6)
    # and every gradient attack accepts it
    adv = attacks.pgd(wrapped, x, y, key=KEY, eps=0.05, step_size=0.01, steps=3)
    assert np.abs(np.asarray(adv - x)).max() <= 0.05 + 1e-6


def test_le_pgd_is_pgd_with_energy_loss():
    f, _, _, x, y = _toy()
    a = attacks.le_pgd(f, x, y, key=KEY, eps=0.1, step_size=0.02, steps=5, lam=0.0)
    b = attacks.pgd(f, x, y, key=KEY, eps=0.1, step_size=0.02, steps=5)
    np.testing.assert_allclose(a, b, atol=1e-6)
    loss = attacks.energy_regularised(0.7)
    z = f(x)
    np.testing.assert_allclose(loss(z, y), attacks.cross_entropy(z, y) + 0.7 * energy.energy(z), rtol=1e-6)


# ------------------------------------------------------------------------------------------ on the real model
def _pgd_acc(m, x, y, steps, eps=0.3):
    attack = jax.jit(lambda v, x, y, k: attacks.pgd(functools.partial(m.apply, v), x, y, key=k, eps=eps,
                                                    step_size=2.5 * eps / steps, steps=steps))
    adv = attack(m.variables, x, y, KEY)
    return float(jnp.mean(attacks.predict(m, adv) == y)), adv


def test_pgd_beats_mnist_cnn_quick(real_test_images):
    m, x, y = real_test_images("mnist_basic_cnn", 100)
    acc, adv = _pgd_acc(m, x, y, steps=10)
    assert float(jnp.mean(attacks.predict(m, x) == y)) >= 0.97
    assert acc <= 0.05
    assert float(jnp.abs(adv - x).max()) <= 0.3 + 1e-6


@pytest.mark.slow
def test_pgd40_mnist_and_more_steps_never_help(real_test_images):
    m, x, y = real_test_images("mnist_basic_cnn", 500)
    acc40, _ = _pgd_acc(m, x, y, steps=40)
    assert acc40 <= 0.01
    acc_by_steps = [_pgd_acc(m, x, y, steps=s, eps=0.1)[0] for s in (5, 20, 60)]
    # more steps never help the defender beyond noise (2 examples of 500)
    assert all(b <= a + 0.004 for a, b in zip(acc_by_steps, acc_by_steps[1:])), acc_by_steps


def test_diagnostics_flag_masking_stochasticity_and_non_monotone():
    from robust_jax.attacks import diagnostics

    f, w, b, x, y = _toy()
    assert diagnostics.check(f, x, y) == []
    masked = lambda z: jnp.round(f(z) * 0 + f(jax.lax.stop_gradient(z)))  # zero input gradient everywhere
    warns = diagnostics.check(masked, x, y)
    assert any("gradient masking" in w for w in warns)
    noisy = lambda k, z: f(z) + jax.random.normal(k, (z.shape[0], 3))
    warns = diagnostics.check(f, x, y, stochastic_fn=noisy, used_eot=False)
    assert any("without EOT" in w for w in warns)
    assert not diagnostics.check(f, x, y, stochastic_fn=noisy, used_eot=True)
    warns = diagnostics.check(f, x, y, sweeps={"steps": ([5, 10, 20], [0.2, 0.1, 0.9])})
    assert any("rises with a stronger attack" in w for w in warns)
    assert not diagnostics.check(f, x, y, sweeps={"steps": ([5, 10, 20], [0.2, 0.1, 0.05])})


def test_pgd_snapshots_equal_k_step_pgd():
    f, _, _, x, y = _toy()
    snaps = attacks.pgd_snapshots(f, x, y, key=KEY, eps=0.1, step_size=0.02, snapshots=(0, 2, 5))
    assert sorted(snaps) == [0, 2, 5]
    np.testing.assert_array_equal(snaps[0], x)  # no attack: the clean input
    for k in (2, 5):
        np.testing.assert_array_equal(snaps[k], attacks.pgd(f, x, y, key=KEY, eps=0.1, step_size=0.02, steps=k))
    assert not np.array_equal(snaps[2], snaps[5])


def test_run_attack_chunks_equal_one_call():
    f_params = _toy()
    _, w, b, x, y = f_params
    attack = lambda v, x, y, k: attacks.fgsm(_linear(*v), x, y, key=k, eps=0.05)
    whole = attack((w, b), x, y, KEY)
    chunked = runner.run_attack(attack, (w, b), np.asarray(x), np.asarray(y), key=KEY, batch_size=3,
                                progress=False)
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
