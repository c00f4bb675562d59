"""The classifier read as an energy model — the ONE place the sign convention of "energy" is defined.

Convention (Grathwohl et al. 2020, "Your classifier is secretly an energy based model"; Liu et al. 2020,
"Energy-based out-of-distribution detection")::

    energy(x) = -T · logsumexp(logits(x) / T)

Low energy = high density = "in-distribution". The original energy study calls the softmax *denominator*
(``sum_j exp(z_j)``, i.e. ``exp(logsumexp)``) "the energy" and shows it *rising* with PGD strength; in our
convention that is energy *falling*: PGD pushes the wrong class's logit up, so logsumexp grows and energy drops
(pinned by ``tests/test_energy.py`` on the trained ``cifar10_resnet10``). LE-PGD ascends
``CE − λ·logsumexp = CE + λ·energy``, so it keeps energy high (like clean data) while fooling the classifier.

The detector's score is ``−energy`` (= T·logsumexp): larger means "more likely adversarial" for PGD examples.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from robust_jax import metrics


def energy(logits, temperature: float = 1.0):
    """Free energy of the logits: ``−T · logsumexp(logits / T)`` over the last axis. Stable for huge logits."""
    t = jnp.asarray(temperature, jnp.float32)
    return -t * logsumexp(jnp.asarray(logits, jnp.float32) / t, axis=-1)


def score(logits, temperature: float = 1.0):
    """Detector score ``−energy``: higher = more suspicious of a PGD-style attack."""
    return -energy(logits, temperature)


# ------------------------------------------------------------------------------------------------- detector
TEMPERATURES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 100.0)


def fit_detector(clean_logits, adv_logits, *, temperatures=TEMPERATURES, method: str = "youden",
                 target_fpr: float | None = None) -> dict:
    """Fit the energy-threshold detector on validation data: clean (negatives) vs adversarial (positives).

    Picks the temperature with the highest AUROC of ``score = −energy``, then a threshold by Youden's J
    (``method="youden"``) or at a target FPR (``method="fpr"``). Returns {temperature, threshold, val_auroc,
    val_auroc_by_temperature}. Apply it unchanged to test data with :func:`detect`.
    """
    labels = np.r_[np.zeros(len(clean_logits)), np.ones(len(adv_logits))]
    aurocs = {}
    for t in temperatures:
        s = np.r_[np.asarray(score(clean_logits, t)), np.asarray(score(adv_logits, t))]
        aurocs[float(t)] = metrics.auroc(s, labels)
    best_t = max(aurocs, key=aurocs.get)
    s = np.r_[np.asarray(score(clean_logits, best_t)), np.asarray(score(adv_logits, best_t))]
    thr = metrics.fit_threshold(s, labels, method=method, target_fpr=target_fpr)
    return {"temperature": best_t, "threshold": thr, "val_auroc": aurocs[best_t],
            "val_auroc_by_temperature": aurocs, "method": method, "target_fpr": target_fpr}


def detect(logits, detector: dict):
    """Boolean flags: True where the detector calls an input adversarial (score >= threshold)."""
    return score(logits, detector["temperature"]) >= detector["threshold"]
