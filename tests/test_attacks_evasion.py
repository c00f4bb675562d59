"""Attacks on the energy detector (LE-APGD, detector-aware APGD) and the selection rule over runs."""

import functools
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy import toy_linear

from robust_jax import attacks, energy

engine = importlib.import_module("robust_jax.attacks.engine")
apgd_mod = importlib.import_module("robust_jax.attacks.apgd")
KEY = jax.random.PRNGKey(0)

# y = 0 throughout: correct and unflagged / misclassified and (barely) unflagged / misclassified but flagged
LOGITS = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 1.0], [0.0, 5.0, 0.0]], np.float32)
LABELS = np.array([0, 0, 0], np.int32)
THRESHOLD = 3.2


def _lse(row, t=1.0):
    return t * math.log(sum(math.exp(v / t) for v in row))


# --------------------------------------------------------------------------------------------------- objectives
def test_detector_margin_by_hand():
    # T = 1: lse = log(e^2 + 2) = 2.239, log(1 + e^3 + e) = 3.170, log(e^5 + 2) = 5.013
    margins = [0 - 2, 3 - 0, 5 - 0]
    expected = [min(m, THRESHOLD - _lse(r)) for m, r in zip(margins, LOGITS)]
    assert expected == pytest.approx([-2.0, THRESHOLD - 3.1698, THRESHOLD - 5.0134], abs=1e-4)
    out = attacks.detector_margin(jnp.asarray(LOGITS), jnp.asarray(LABELS), threshold=THRESHOLD)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    # positive exactly where the point is misclassified and not flagged
    ok = attacks.evades_detector(threshold=THRESHOLD)(jnp.asarray(LOGITS), jnp.asarray(LABELS))
    assert list(np.asarray(ok)) == [False, True, False] == list(np.asarray(out) > 0)
    assert list(np.asarray(energy.detect(LOGITS, {"temperature": 1.0, "threshold": THRESHOLD}))) == [False, False,
                                                                                                      True]
    # T = 2: the detector's score is 2·logsumexp(z/2)
    expected = [min(m, 4.0 - _lse(r, 2.0)) for m, r in zip(margins, LOGITS)]
    out = attacks.detector_margin(jnp.asarray(LOGITS), jnp.asarray(LABELS), threshold=4.0, temperature=2.0)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    # a traced threshold and temperature (one compilation for any detector)
    f = jax.jit(lambda z, t, thr: attacks.detector_margin(z, jnp.asarray(LABELS), threshold=thr, temperature=t))
    np.testing.assert_allclose(f(jnp.asarray(LOGITS), 2.0, 4.0), expected, rtol=1e-5)


def test_le_objective_by_hand():
    # CE + λ·E = (lse − z_y) − λ·lse
    lam = 3.0
    expected = [(1 - lam) * _lse(r) - r[0] for r in LOGITS]
    out = attacks.energy_regularised(lam)(jnp.asarray(LOGITS), jnp.asarray(LABELS))
    np.testing.assert_allclose(out, expected, rtol=1e-5)


# ------------------------------------------------------------------------------------------- selection rule
def test_first_success_rule_by_brute_force():
    rng = np.random.default_rng(0)
    r_, n = 4, 40
    ok = rng.random((r_, n)) < 0.25
    score = rng.integers(-2, 3, (r_, n)).astype(np.float32)  # ties: the earlier run wins
    x = rng.normal(size=(r_, n, 1, 1, 1)).astype(np.float32)
    res = engine.Result(jnp.asarray(x), jnp.asarray(ok), jnp.asarray(score))
    pick = [int(np.argmax(ok[:, i])) if ok[:, i].any() else int(np.argmax(score[:, i])) for i in range(n)]
    expected = x[pick, np.arange(n)]
    np.testing.assert_array_equal(engine.best_of(res).x, expected)
    seq = engine.first_success(lambda r: jax.tree.map(lambda a: a[r], res), r_)
    np.testing.assert_array_equal(seq.x, expected)
    np.testing.assert_array_equal(seq.success, ok.any(0))
    # from an initial result (APGD / FAB: the clean batch, score -inf): kept where no run has a finite score
    score[:, :5] = -np.inf
    ok[:, :5] = False
    res = engine.Result(jnp.asarray(x), jnp.asarray(ok), jnp.asarray(score))
    out = apgd_mod.first_success(lambda r: jax.tree.map(lambda a: a[r], res), r_, jnp.zeros((n, 1, 1, 1)))
    np.testing.assert_array_equal(out.x[:5], 0.0)
    np.testing.assert_array_equal(out.x[5:], expected[5:])


# ------------------------------------------------------------------------------------------------- attacks (toy)
def _toy():
    f, w, b, x, y = toy_linear(64, (8, 8, 3), 10, 0, labels="predicted")
    return f, x, y


def test_le_apgd_is_apgd_on_the_energy_regularised_loss():
    f, x, y = _toy()
    kw = dict(key=KEY, eps=0.05, steps=10, loop="fori")
    swept, ce, le = jax.jit(lambda x, y: (  # a lam sweep in one call; lam = 0 is APGD-CE
        attacks.le_apgd(f, x, y, lam=jnp.array([0.0, 3.0]), **kw), attacks.apgd(f, x, y, **kw),
        attacks.apgd(f, x, y, loss=attacks.energy_regularised(3.0), **kw)))(x, y)
    assert swept.shape == (2, *x.shape)
    np.testing.assert_allclose(swept[0], ce, atol=1e-6)
    np.testing.assert_allclose(swept[1], le, atol=1e-6)
    lse = lambda z: float(jnp.mean(energy.score(f(z))))  # noqa: E731
    assert lse(le) < lse(ce) - 1.0  # it keeps logsumexp lower than APGD-CE


def test_detector_apgd_evades_where_apgd_ce_is_flagged():
    f, x, y = _toy()
    thr = float(np.median(np.asarray(energy.score(f(x)))))  # flags half of the clean points
    kw = dict(key=KEY, eps=0.05, steps=10, loop="fori")
    evade = attacks.evades_detector(threshold=thr)
    rate = lambda z: float(jnp.mean(evade(f(z), y)))  # noqa: E731
    out, ce, ce_evade = jax.jit(lambda x, y, thr: (
        attacks.detector_apgd(f, x, y, threshold=thr, **kw), attacks.apgd(f, x, y, **kw),
        attacks.apgd(f, x, y, success_fn=attacks.evades_detector(threshold=thr), **kw)))(x, y, thr)
    assert float(jnp.abs(out - x).max()) <= 0.05 + 1e-6 and float(out.min()) >= 0 and float(out.max()) <= 1
    assert rate(out) >= 0.85 and rate(ce) <= 0.5, (rate(out), rate(ce))
    # the success criterion decides what keep-best returns: APGD-CE judged by "misclassified and not flagged"
    # returns the earlier, still unflagged adversarial iterates where plain APGD-CE returns the flagged last ones
    assert rate(ce_evade) > rate(ce) + 0.05, (rate(ce_evade), rate(ce))
    with pytest.raises(ValueError, match="EOT"):
        attacks.detector_apgd(attacks.eot(lambda k, z: f(z), 2), x, y, threshold=thr, **kw)
    with pytest.raises(TypeError, match="fixed"):
        attacks.detector_apgd(f, x, y, threshold=thr, loss="ce", **kw)


# ---------------------------------------------------------------------------------------- trained model (slow)
@pytest.mark.slow
def test_le_apgd_and_detector_apgd_on_the_energy_studys_model(need_checkpoint, real_data):
    """cifar10_resnet10 at 8/255: LE-APGD (λ=3) fools with a lower mean logsumexp than APGD-CE; detector-aware APGD
    evades a detector flagging the top 5% of clean validation scores (T=1) more often than APGD-CE."""
    from robust_jax import data

    m = need_checkpoint("cifar10_resnet10")
    real_data("cifar10")
    sp = data.splits("cifar10")
    x, y = data.load("cifar10", f"{sp['test']}[:32]")
    xv, _ = data.load("cifar10", data.head("cifar10", sp["val"], 256))
    x, y, xv = jnp.asarray(data.to_float(x)), jnp.asarray(y), jnp.asarray(data.to_float(xv))
    thr = float(np.quantile(np.asarray(energy.score(m.apply(m.variables, xv))), 0.95))
    kw = dict(key=KEY, eps=8 / 255, loop="fori")
    run = lambda attack, **a: jax.jit(  # noqa: E731
        lambda v, x, y: attack(functools.partial(m.apply, v), x, y, **kw, **a))(m.variables, x, y)
    logits = {name: m.apply(m.variables, z) for name, z in (
        ("apgd", run(attacks.apgd)), ("le", run(attacks.le_apgd, lam=3.0)),
        ("det", run(attacks.detector_apgd, threshold=thr)))}
    acc = {k: float(jnp.mean(jnp.argmax(v, -1) == y)) for k, v in logits.items()}
    lse = {k: float(jnp.mean(energy.score(v))) for k, v in logits.items()}
    evade = {k: float(jnp.mean(attacks.evades_detector(threshold=thr)(v, y))) for k, v in logits.items()}
    assert acc["apgd"] <= 0.05 and acc["le"] <= 0.1, acc
    assert lse["le"] < lse["apgd"] - 3.0, lse
    assert evade["det"] >= 0.8 and evade["det"] > evade["apgd"] + 0.5, evade


def test_protocol_shape_key_required_and_inputs_validated():
    f, x, y = _toy()
    for fn, kw in ((attacks.le_apgd, {"lam": 1.0}), (attacks.detector_apgd, {"threshold": 5.0})):
        with pytest.raises(TypeError, match="key"):
            fn(f, x, y, eps=0.05, **kw)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            fn(f, x * 3, y, key=KEY, eps=0.05, **kw)
