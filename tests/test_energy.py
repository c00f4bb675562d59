import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_jax import attacks, energy


def test_energy_hand_formula_and_temperature():
    z = jnp.array([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]])
    np.testing.assert_allclose(energy.energy(z), -np.log(np.exp(np.asarray(z)).sum(-1)), rtol=1e-6)
    t = 2.5
    np.testing.assert_allclose(energy.energy(z, t), -t * np.log(np.exp(np.asarray(z) / t).sum(-1)), rtol=1e-6)
    np.testing.assert_allclose(energy.score(z, t), -energy.energy(z, t))


def test_energy_stable_at_large_logits():
    z = jnp.array([[1e4, 1e4 - 1.0, -1e4]])
    e = energy.energy(z)
    assert np.isfinite(e).all()
    np.testing.assert_allclose(e, -(1e4 + np.log1p(np.exp(-1.0))), rtol=1e-6)
    assert np.isfinite(energy.energy(z, 0.01)).all()


def test_fit_detector_picks_separating_temperature():
    rng = np.random.default_rng(0)
    clean = rng.normal(0, 1, (500, 10))
    adv = clean.copy()
    adv[:, 0] += 4.0  # one big logit: logsumexp grows
    det = energy.fit_detector(clean, adv)
    assert det["val_auroc"] > 0.95
    flags = np.asarray(energy.detect(np.r_[clean, adv], det))
    assert flags[500:].mean() > 0.9 and flags[:500].mean() < 0.1


@pytest.mark.slow
def test_pgd_lowers_energy_and_le_pgd_keeps_it(real_test_images):
    """Pins the sign convention on the trained CIFAR-10 ResNet: PGD lowers energy as steps grow, LE-PGD doesn't."""
    m, x, y = real_test_images("cifar10_resnet10", 200)
    attack = jax.jit(lambda v, x, y, k, steps, lam: attacks.le_pgd(
        functools.partial(m.apply, v), x, y, key=k, eps=8 / 255, step_size=2 / 255, steps=steps, lam=lam),
        static_argnums=(4,))
    means = []
    for k in (0, 5, 10, 20, 30, 50):
        adv = attack(m.variables, x, y, jax.random.PRNGKey(0), k, 0.0) if k else x
        means.append(float(energy.energy(m(adv)).mean()))
    assert all(b < a for a, b in zip(means, means[1:])), means
    le = attack(m.variables, x, y, jax.random.PRNGKey(0), 20, 1.0)
    assert float(energy.energy(m(le)).mean()) > means[3]
    assert float(jnp.mean(attacks.predict(m, le) == y)) <= 0.05
