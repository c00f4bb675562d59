import numpy as np
import pytest

from robust_jax import metrics


def test_auroc_equals_mann_whitney_on_hand_example():
    pos = np.array([0.9, 0.8, 0.4, 0.4])
    neg = np.array([0.7, 0.4, 0.1])
    # pairs (p > n) + 0.5 (p == n): 0.9:3, 0.8:3, 0.4:1+0.5, 0.4:1+0.5 -> 9 of 12
    scores = np.r_[pos, neg]
    labels = np.r_[np.ones(4), np.zeros(3)]
    assert metrics.auroc(scores, labels) == pytest.approx(9 / 12)
    fpr, tpr, _ = metrics.roc_curve(scores, labels)
    assert np.trapezoid(tpr, fpr) == pytest.approx(9 / 12)


def test_youden_picks_hand_optimum():
    scores = np.array([0.1, 0.2, 0.3, 0.35, 0.6, 0.7, 0.8])
    labels = np.array([0, 0, 0, 1, 0, 1, 1])
    # thresholds: >=0.35 gives TPR 1, FPR 1/4 -> J = 0.75 (the best); >=0.7 gives TPR 2/3, FPR 0 -> J = 0.667
    assert metrics.fit_threshold(scores, labels) == pytest.approx(0.35)


def test_threshold_achieves_requested_fpr_on_fitting_data():
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0, 1, 2000), rng.normal(1.5, 1, 2000)]
    labels = np.r_[np.zeros(2000), np.ones(2000)]
    for target in (0.01, 0.05, 0.2):
        t = metrics.fit_threshold(scores, labels, method="fpr", target_fpr=target)
        r = metrics.detection_rates(scores, labels, t)
        assert r["fpr"] <= target
        assert r["fpr"] > target - 0.002  # and uses the budget (largest TPR under it)


def test_detection_confusion_cells():
    scores = np.array([0.1, 0.9, 0.2, 0.8])
    labels = np.array([0, 0, 1, 1])
    correct = np.array([1, 0, 1, 0])
    c = metrics.detection_confusion(scores, labels, 0.5, correct)
    assert c["TN"] == {"rate": 0.5, "count": 1, "accuracy": 1.0}
    assert c["FP"]["accuracy"] == 0.0 and c["FN"]["accuracy"] == 1.0 and c["TP"]["rate"] == 0.5


def test_ece_zero_for_calibrated_and_hand_value_for_overconfident():
    # perfectly calibrated: in each bin the accuracy equals the confidence
    rng = np.random.default_rng(0)
    n = 20000
    conf = np.full(n, 0.7)
    labels = np.zeros(n, int)
    correct = np.zeros(n, bool)
    correct[: int(0.7 * n)] = True
    labels[~correct] = 1
    probs = np.stack([conf, 1 - conf], -1)
    assert metrics.ece(probs, labels) == pytest.approx(0.0, abs=1e-12)
    # over-confident: confidence 0.9, accuracy 0.6 in one bin; confidence 0.6, accuracy 0.6 in another
    probs = np.r_[np.tile([0.9, 0.1], (100, 1)), np.tile([0.6, 0.4], (100, 1))]
    labels = np.r_[np.r_[np.zeros(60), np.ones(40)], np.r_[np.zeros(60), np.ones(40)]].astype(int)
    assert metrics.ece(probs, labels) == pytest.approx(0.5 * 0.3 + 0.5 * 0.0)
    assert metrics.ece(probs, labels, adaptive=True, num_bins=2) == pytest.approx(0.15)
    del rng


def test_fooling_rate_definition():
    labels = np.array([0, 1, 2, 3])
    clean = np.array([0, 1, 2, 0])  # last one already wrong: not counted
    adv = np.array([1, 1, 0, 2])
    assert metrics.fooling_rate(clean, adv, labels) == pytest.approx(2 / 3)
    assert metrics.fooling_rate(clean, adv, labels, target=np.array([1, 0, 0, 0])) == pytest.approx(0.5)
