"""Metrics: accuracy, fooling rate, detection (ROC, AUROC, AUPR, thresholds, confusion) and calibration (ECE).

Detection convention: scores are "higher = more likely positive (adversarial)"; labels are 1 for positives.
Numpy on the host: these run once per experiment on at most tens of thousands of scores.
"""

from __future__ import annotations

import numpy as np


def softmax(logits, axis: int = -1) -> np.ndarray:
    """Softmax of numpy logits (stable; keeps the input's float dtype)."""
    from scipy.special import softmax as _softmax

    return _softmax(np.asarray(logits), axis=axis)


def accuracy(logits_or_pred, labels) -> float:
    p = np.asarray(logits_or_pred)
    pred = p.argmax(-1) if p.ndim > 1 else p
    return float(np.mean(pred == np.asarray(labels)))


def fooling_rate(clean_pred, adv_pred, labels, *, target=None) -> float:
    """Untargeted: fraction of originally-correct examples whose prediction changes under attack.
    Targeted (`target` given): fraction of examples classified as their target (success rate)."""
    clean_pred, adv_pred, labels = map(np.asarray, (clean_pred, adv_pred, labels))
    if target is not None:
        return float(np.mean(adv_pred == np.asarray(target)))
    correct = clean_pred == labels
    return float(np.mean(adv_pred[correct] != clean_pred[correct])) if correct.any() else float("nan")


def perturbation_norms(x, x_adv) -> dict[str, float]:
    """Mean L0 (fraction of changed pixel values), L2 and Linf of x_adv − x."""
    d = (np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)).reshape(len(x), -1)
    return {"l0": float(np.mean(np.abs(d) > 1e-6)), "l2": float(np.linalg.norm(d, axis=1).mean()),
            "linf": float(np.abs(d).max(1).mean())}


# ------------------------------------------------------------------------------------------------- detection
def _check(scores, labels):
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).astype(bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in shape: {scores.shape} vs {labels.shape}")
    if labels.all() or not labels.any():
        raise ValueError("need both positive and negative examples")
    return scores, labels


def roc_curve(scores, labels):
    """(fpr, tpr, thresholds): predicting positive when score >= threshold, thresholds descending."""
    scores, labels = _check(scores, labels)
    order = np.argsort(-scores, kind="mergesort")
    s, lab = scores[order], labels[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(lab)[distinct]
    fp = np.cumsum(~lab)[distinct]
    tpr = np.r_[0.0, tp / lab.sum()]
    fpr = np.r_[0.0, fp / (~lab).sum()]
    return fpr, tpr, np.r_[np.inf, s[distinct]]


def auroc(scores, labels) -> float:
    """Area under the ROC curve = the Mann–Whitney probability P(score_pos > score_neg) + ½ P(tie)."""
    scores, labels = _check(scores, labels)
    from scipy.stats import rankdata

    ranks = rankdata(scores)  # average ranks handle ties
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def aupr(scores, labels) -> float:
    """Area under the precision-recall curve (average precision, positives = adversarial)."""
    scores, labels = _check(scores, labels)
    order = np.argsort(-scores, kind="mergesort")
    lab = labels[order]
    tp = np.cumsum(lab)
    precision = tp / np.arange(1, len(lab) + 1)
    return float(np.sum(precision[lab]) / lab.sum())


def fit_threshold(scores, labels, *, method: str = "youden", target_fpr: float | None = None) -> float:
    """A threshold t (predict positive when score >= t) fitted on (scores, labels).

    ``method="youden"`` maximises TPR − FPR (Youden's J); ``method="fpr"`` gives the largest TPR whose FPR on the
    fitting data is <= `target_fpr`.
    """
    fpr, tpr, thr = roc_curve(scores, labels)
    if method == "youden":
        i = int(np.argmax(tpr - fpr))
    elif method == "fpr":
        if target_fpr is None or not 0 <= target_fpr <= 1:
            raise ValueError(f"method='fpr' needs 0 <= target_fpr <= 1, got {target_fpr}")
        ok = np.nonzero(fpr <= target_fpr)[0]
        i = int(ok[np.argmax(tpr[ok])])
    else:
        raise ValueError(f"unknown threshold method {method!r}; use youden or fpr")
    return float(thr[i]) if np.isfinite(thr[i]) else float(np.max(scores) + 1.0)


def detection_rates(scores, labels, threshold: float) -> dict[str, float]:
    """TPR (detection rate), FPR, FNR, TNR of the rule score >= threshold."""
    scores, labels = _check(scores, labels)
    flag = scores >= threshold
    tpr = float(flag[labels].mean())
    fpr = float(flag[~labels].mean())
    return {"tpr": tpr, "fpr": fpr, "fnr": 1.0 - tpr, "tnr": 1.0 - fpr}


def detection_report(clean_scores, adv_scores, threshold: float | None = None) -> dict[str, float]:
    """How well a score (higher = adversarial) separates clean inputs (negatives) from adversarial ones (positives):
    AUROC and AUPR and, given a `threshold`, the rates of the rule score >= threshold (:func:`detection_rates`)."""
    scores, labels = stack_scores(clean_scores, adv_scores)
    out = {"auroc": auroc(scores, labels), "aupr": aupr(scores, labels)}
    if threshold is not None:
        out = {**detection_rates(scores, labels, threshold), **out}
    return out


def stack_scores(clean_scores, adv_scores) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels): clean scores (label 0) followed by adversarial ones (label 1), for the functions above."""
    clean, adv = np.asarray(clean_scores, np.float64).ravel(), np.asarray(adv_scores, np.float64).ravel()
    return np.r_[clean, adv], np.r_[np.zeros(len(clean)), np.ones(len(adv))]


def score_aurocs(clean: dict, adversarial: dict, *, lower_is_adversarial=("max_probability",)) -> dict[str, float]:
    """AUROC of each named score (e.g. ``uncertainty.scores``) at separating clean from adversarial inputs; scores in
    `lower_is_adversarial` (confidence) are negated. Clean scores are truncated to the adversarial set's length (the
    adversarial examples are crafted from the first N clean inputs)."""
    out = {}
    for name, adv in adversarial.items():
        adv = np.asarray(adv)
        sign = -1.0 if name in lower_is_adversarial else 1.0
        out[name] = auroc(*stack_scores(sign * np.asarray(clean[name])[: len(adv)], sign * adv))
    return out


def detection_confusion(scores, labels, threshold: float, correct) -> dict[str, dict[str, float]]:
    """The original study's confusion matrix: for each cell (TN, FP, FN, TP) its rate within its true class and the
    classifier's accuracy on the examples in that cell (`correct`: per-example bool, prediction == true label)."""
    scores, labels = _check(scores, labels)
    correct = np.asarray(correct).astype(bool).ravel()
    flag = scores >= threshold
    cells = {"TN": ~labels & ~flag, "FP": ~labels & flag, "FN": labels & ~flag, "TP": labels & flag}
    out = {}
    for name, mask in cells.items():
        denom = (~labels).sum() if name in ("TN", "FP") else labels.sum()
        out[name] = {"rate": float(mask.sum() / denom), "count": int(mask.sum()),
                     "accuracy": float(correct[mask].mean()) if mask.any() else float("nan")}
    return out


# ----------------------------------------------------------------------------------------------- calibration
def reliability(probs, labels, num_bins: int = 15, *, adaptive: bool = False) -> dict[str, np.ndarray]:
    """Per-bin (confidence, accuracy, count) of the top-label confidence; equal-width or equal-mass bins."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    conf = probs.max(-1)
    correct = (probs.argmax(-1) == labels).astype(np.float64)
    if adaptive:
        edges = np.quantile(conf, np.linspace(0, 1, num_bins + 1))
        edges[0], edges[-1] = 0.0, 1.0
    else:
        edges = np.linspace(0.0, 1.0, num_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, num_bins - 1)
    count = np.bincount(idx, minlength=num_bins).astype(np.float64)
    safe = np.maximum(count, 1)
    return {"confidence": np.bincount(idx, conf, num_bins) / safe, "accuracy": np.bincount(idx, correct, num_bins)
            / safe, "count": count, "edges": edges}


def ece(probs, labels, num_bins: int = 15, *, adaptive: bool = False) -> float:
    """Expected calibration error (top-label): sum_b |B_b|/n · |acc(B_b) − conf(B_b)|. 15 equal-width bins by
    default (Guo et al. 2017); ``adaptive=True`` uses equal-mass bins."""
    r = reliability(probs, labels, num_bins, adaptive=adaptive)
    n = r["count"].sum()
    return float(np.sum(r["count"] / n * np.abs(r["accuracy"] - r["confidence"])))


def nll(logits, labels) -> float:
    """Mean negative log-likelihood of integer labels under softmax(logits)."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(labels)), labels]))


# ----------------------------------------------------------------------------------------- temperature scaling
TEMPERATURES = tuple(0.5 + 0.05 * i for i in range(51))  # the fit's grid: 0.5 .. 3.0 in steps of 0.05


def fit_temperature(logits, labels, temperatures=TEMPERATURES) -> float:
    """Temperature scaling (Guo et al. 2017): the grid temperature T minimising the NLL of softmax(logits / T).
    Fit it on held-out clean data (validation) and apply it unchanged elsewhere; T > 1 softens an over-confident
    model, T < 1 sharpens an under-confident one."""
    logits = np.asarray(logits)
    return float(temperatures[int(np.argmin([nll(logits / t, labels) for t in temperatures]))])


def calibration_report(logits, labels, *, temperature: float = 1.0, num_bins: int = 15) -> dict:
    """Calibration of softmax(logits) on (logits, labels): accuracy, mean confidence, top-label ECE (`num_bins`
    equal-width bins), adaptive ECE (equal-mass bins), NLL, the ECE after temperature scaling by `temperature`, and
    the reliability bins (as lists, JSON-ready)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    p, pt = softmax(logits), softmax(logits / temperature)
    rel = reliability(p, labels, num_bins)
    return {"accuracy": float(np.mean(p.argmax(-1) == labels)), "confidence": float(p.max(-1).mean()),
            "ece": ece(p, labels, num_bins), "ece_adaptive": ece(p, labels, num_bins, adaptive=True),
            "nll": nll(logits, labels), "ece_temperature_scaled": ece(pt, labels, num_bins),
            "reliability": {k: v.tolist() for k, v in rel.items()}}
