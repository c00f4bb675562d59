"""Library code moved out of the experiment scripts: the defended model (evaluate.Defence), the energy detector's
report, temperature scaling and the calibration / detection reports (metrics)."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_jax import attacks, energy, evaluate, metrics, models, uncertainty

KEY = jax.random.PRNGKey(0)


def _net(hetero=False, dropout_rate=0.5):
    m = models.BasicCNN(dropout_rate=dropout_rate, hetero=hetero)
    x = jax.random.uniform(jax.random.PRNGKey(1), (6, 28, 28, 1))
    v = m.init({"params": KEY, "dropout": KEY}, x[:1])
    card = {"name": "toy", "architecture": {"hetero": hetero}}
    return types.SimpleNamespace(apply=m.apply, variables=v, card=card), x


def test_defence_attacked_logits_per_protocol():
    net, x = _net()
    y = jnp.zeros(len(x), jnp.int32)
    none = evaluate.Defence("none", net)
    for protocol in evaluate.PROTOCOLS:
        np.testing.assert_allclose(none.attacked(protocol)(net.variables)(x), net.apply(net.variables, x), rtol=1e-6)
    assert none.sample_fn(net.variables) is None
    epi = evaluate.Defence("epistemic", net, mc_samples=4, eot_samples=3)
    single, adaptive = epi.attacked("single_pass")(net.variables), epi.attacked("adaptive")(net.variables)
    assert isinstance(single, attacks.EOT) and isinstance(adaptive, attacks.EOT)
    # an attack through the adaptive protocol equals one through EOT over 3 dropout masks
    ref = attacks.eot(uncertainty.mc_dropout_logits_fn(net.apply, net.variables), 3)
    np.testing.assert_allclose(attacks.fgsm(adaptive, x, y, key=KEY, eps=0.1),
                               attacks.fgsm(ref, x, y, key=KEY, eps=0.1), atol=1e-6)
    with pytest.raises(ValueError, match="protocol"):
        epi.attacked("white")


def test_defence_prediction_and_mean_logits():
    net, x = _net()
    epi = evaluate.Defence("epistemic", net, mc_samples=5)
    logp, scores = epi.predictive(np.asarray(x), KEY, batch_size=4)
    ref = uncertainty.mc_dropout_probs(net.apply, net.variables, x, KEY, 5)
    np.testing.assert_allclose(np.exp(logp), ref.mean(0), atol=1e-5)
    assert {"predictive_entropy", "mutual_information", "max_probability"} <= set(scores)
    assert scores["mutual_information"].shape == (len(x),) and float(scores["mutual_information"].min()) >= 0
    sample = uncertainty.mc_dropout_logits_fn(net.apply, net.variables)
    keys = jax.random.split(KEY, 5)
    np.testing.assert_allclose(epi.mean_logits(net.variables, x, KEY),
                               np.mean([sample(k, x) for k in keys], 0), atol=1e-5)
    none = evaluate.Defence("none", net)
    np.testing.assert_allclose(none.mean_logits(net.variables, x, KEY), net.apply(net.variables, x), rtol=1e-6)


def test_aleatoric_defence_needs_a_heteroscedastic_head():
    net, x = _net()
    with pytest.raises(ValueError, match="heteroscedastic"):
        evaluate.Defence("aleatoric", net)
    with pytest.raises(ValueError, match="unknown defence"):
        evaluate.Defence("bayes", net)
    het, x = _net(hetero=True)
    d = evaluate.Defence("aleatoric", het, mc_samples=3)
    logp, scores = d.predictive(np.asarray(x), KEY)
    assert logp.shape == (len(x), 10) and "aleatoric_variance" in scores
    mu = het.apply(het.variables, x)[0]  # the single-pass protocol attacks the mean logits
    np.testing.assert_allclose(d.attacked("single_pass")(het.variables)(x), mu, rtol=1e-6)


def _negated(net):
    """The same network with other "kernels": its logits negated (an attack through it goes the other way)."""
    neg = lambda v, x, **kw: jax.tree.map(jnp.negative, net.apply(v, x, **kw))  # noqa: E731
    return types.SimpleNamespace(apply=neg, variables=net.variables, card=net.card)


@pytest.mark.parametrize("kind", ["none", "epistemic"])
def test_defence_attacks_differentiate_the_attack_model(kind):
    """With `attack_model`, every attack protocol and ``sample_fn(attack=True)`` go through it; the prediction, the
    uncertainty scores and the mean logits stay the model's."""
    net, x = _net(dropout_rate=0.25)  # the dense dropout is twice that: at 0.5 every unit is dropped, logits all 0
    neg = _negated(net)
    d = evaluate.Defence(kind, net, mc_samples=3, eot_samples=2, attack_model=neg)
    attack_ref = evaluate.Defence(kind, neg, mc_samples=3, eot_samples=2)  # the attack model throughout
    plain = evaluate.Defence(kind, net, mc_samples=3, eot_samples=2)
    v = net.variables
    # what an attack differentiates: the deterministic logits, or one draw of an EOT's stochastic model
    logits = lambda f: f.fn(KEY, x) if isinstance(f, attacks.EOT) else f(x)  # noqa: E731
    for protocol in evaluate.PROTOCOLS:
        got = logits(d.attacked(protocol)(v))
        np.testing.assert_allclose(got, logits(attack_ref.attacked(protocol)(v)), rtol=1e-6)
        assert not np.allclose(got, logits(plain.attacked(protocol)(v)))
    for a, b in zip(d.predictive(np.asarray(x), KEY, batch_size=4), plain.predictive(np.asarray(x), KEY, batch_size=4)):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    np.testing.assert_array_equal(d.mean_logits(v, x, KEY), plain.mean_logits(v, x, KEY))
    if kind == "epistemic":
        np.testing.assert_array_equal(d.sample_fn(v)(KEY, x), plain.sample_fn(v)(KEY, x))
        np.testing.assert_allclose(d.sample_fn(v, attack=True)(KEY, x), -plain.sample_fn(v)(KEY, x), rtol=1e-6)


def test_boundary_attacks_differentiate_the_reported_model():
    """evaluate_attacks: FGSM / PGD (and the gradient-masking diagnostics) differentiate `logits_builder`, CW-L2 (a
    boundary attack, as JSMA) `boundary_logits_builder` (default: `logits_builder`); every prediction is
    `predict`'s."""
    net, x = _net()
    x = np.asarray(x)
    y = np.asarray(net.apply(net.variables, x)).argmax(-1)
    log = []
    spy = lambda tag, apply: (lambda v: (log.append(tag), functools.partial(apply, v))[1])  # noqa: E731

    def predict(z):
        log.append("predict")
        return np.asarray(net.apply(net.variables, z))

    cfg = evaluate.AttackConfig(eps=0.1, pgd_steps=1, cw_steps=1, cw_binary_search_steps=1, batch_size=6)
    names = ["fgsm", "cw_l2", "pgd"]
    rows = evaluate.evaluate_attacks(names, predict, net.variables, x, y, key=KEY, cfg=cfg, progress=False,
                                     logits_builder=spy("attack", _negated(net).apply),
                                     boundary_logits_builder=spy("eval", net.apply))
    # the clean prediction, each attack's trace and its prediction, then the diagnostics
    assert log == ["predict", "attack", "predict", "eval", "predict", "attack", "predict", "attack"]
    assert [r["attack"] for r in rows] == names and all(r["accuracy"] == 1.0 for r in rows)
    log.clear()
    evaluate.evaluate_attacks(["cw_l2"], predict, net.variables, x, y, key=KEY, cfg=cfg, progress=False,
                              logits_builder=spy("attack", net.apply))
    assert log == ["predict", "attack", "predict", "attack"]


def test_energy_detector_report_applies_the_fitted_detector():
    rng = np.random.default_rng(0)
    clean, adv = rng.normal(0, 1, (200, 10)), rng.normal(0, 1, (200, 10)) + 3 * np.eye(10)[rng.integers(0, 10, 200)]
    det = energy.fit_detector(clean[:100], adv[:100])
    row, scores, labels = evaluate.energy_detector_report(det, clean[100:], adv[100:], labels=np.zeros(100, int))
    flags = np.asarray(energy.detect(np.r_[clean[100:], adv[100:]], det))
    assert row["tpr"] == pytest.approx(flags[100:].mean()) and row["fpr"] == pytest.approx(flags[:100].mean())
    assert row["auroc"] == pytest.approx(metrics.auroc(scores, labels)) and row["auroc"] > 0.8
    assert row["temperature"] == det["temperature"] and 0 <= row["adversarial_accuracy"] <= 1


def test_temperature_scaling_recovers_the_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (4000, 10))
    y = np.array([rng.choice(10, p=p) for p in metrics.softmax(z)])  # labels drawn from softmax(z)
    # logits twice as sharp as the truth: the fit divides them by ~2; the truth is calibrated at T ~ 1
    assert metrics.fit_temperature(2 * z, y) == pytest.approx(2.0, abs=0.15)
    assert metrics.fit_temperature(z, y) == pytest.approx(1.0, abs=0.1)
    rep = metrics.calibration_report(2 * z, y, temperature=2.0, num_bins=10)
    assert rep["ece_temperature_scaled"] < rep["ece"] and len(rep["reliability"]["count"]) == 10
    assert rep["ece"] == pytest.approx(metrics.ece(metrics.softmax(2 * z), y, 10))


def test_detection_reports():
    r = metrics.detection_report([0.1, 0.2, 0.3], [0.25, 0.9], threshold=0.25)
    assert r["auroc"] == pytest.approx(5 / 6) and r["tpr"] == 1.0 and r["fpr"] == pytest.approx(1 / 3)
    assert set(metrics.detection_report([0, 1], [2, 3])) == {"auroc", "aupr"}
    # confidence is lower on adversarial inputs: negated; clean scores cut to the adversarial set's length
    got = metrics.score_aurocs({"max_probability": [0.9, 0.8, 0.1], "predictive_entropy": [0.1, 0.2, 5.0]},
                               {"max_probability": [0.3, 0.2], "predictive_entropy": [1.0, 2.0]})
    assert got == {"max_probability": 1.0, "predictive_entropy": 1.0}
