"""Adaptive attacks on the energy detector (``robust_jax.energy``), as configurations of APGD (:func:`apgd`).

The detector scores an input by ``s_T(x) = −E_T(x) = T·logsumexp(logits(x)/T)`` and flags it as adversarial when
``s_T(x) >= threshold`` (temperature and threshold fitted on validation data, ``energy.fit_detector``). Two
attacks that know this:

- :func:`le_apgd` (LE-APGD): APGD — its step-size schedule, momentum, restarts and keep-best — on the LE-PGD
  objective ``loss + λ·E_T = loss − λ·T·logsumexp(logits/T)`` (``attacks.energy_regularised``). It does not
  know the threshold: it trades classification loss against energy with a fixed weight λ. Success (what keep-best
  and the restarts prefer) is plain misclassification.
- :func:`detector_apgd` (detector-aware APGD): APGD on :func:`detector_margin`,
  ``min(margin, threshold − s_T)`` with ``margin = max_{j≠y} z_j − z_y``; success = misclassified **and** not
  flagged (``s_T < threshold``), so the engine's per-example keep-best returns the best *evading* adversarial point
  and a restart is kept only if it evades.

Both are pure functions of their arguments (threshold and temperature are arguments, no detector state), jit-able
with the threshold, temperature and λ traced.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from robust_jax import energy
from robust_jax.attacks._core import EOT, cw_margin, energy_regularised, is_success
from robust_jax.attacks.apgd import apgd, resolve_apgd_loss
from robust_jax.attacks.gradient import sweep

__all__ = ["detector_apgd", "detector_margin", "evades_detector", "le_apgd"]


def detector_margin(logits, y, *, threshold, temperature: float = 1.0):
    """Detector-aware margin: ``min(max_{j≠y} z_j − z_y, threshold − T·logsumexp(z/T))`` per example.

    Positive exactly when the input is misclassified and not flagged by the energy detector (score ``T·lse(z/T)``
    below `threshold`). Both terms are in logit units. Ascending the minimum moves whichever constraint is violated
    most: the classification margin while the point is still classified correctly (or less violated), the
    detector's slack (lower logsumexp, higher energy) once it is misclassified but flagged."""
    return jnp.minimum(cw_margin(logits, y), threshold - energy.score(logits, temperature))


def evades_detector(*, threshold, temperature: float = 1.0) -> Callable:
    """Success criterion ``(logits, y) -> bool (N,)``: misclassified and not flagged (``score < threshold``;
    ``energy.detect`` flags ``score >= threshold``)."""

    def success_fn(logits, y):
        return is_success(logits, y) & (energy.score(logits, temperature) < threshold)

    return success_fn


def le_apgd(logits_fn: Callable, x, y, *, key, eps, lam, temperature: float = 1.0, base_loss="ce",
            **apgd_kwargs):
    """LE-APGD: :func:`apgd` ascending ``base_loss(x) − lam·T·logsumexp(logits(x)/T)`` (= base loss + lam·energy;
    `base_loss` ``"ce"``, ``"dlr"`` or a callable). ``lam = 0`` is APGD with `base_loss`. Success (keep-best,
    restarts) is misclassification. `lam` may be traced, or a 1-D sweep (leading axis of the result, one compiled
    call). Other keyword arguments (``norm``, ``steps`` = 100, ``restarts``, ``rho``, ``indices``, ``loop``,
    ``validate``) go to :func:`apgd`."""
    base = resolve_apgd_loss(base_loss)

    def one(lam_):
        return apgd(logits_fn, x, y, key=key, eps=eps, loss=energy_regularised(lam_, base, temperature),
                    **apgd_kwargs)

    return sweep(one, lam)


def detector_apgd(logits_fn: Callable, x, y, *, key, eps, threshold, temperature: float = 1.0,
                  **apgd_kwargs):
    """Detector-aware APGD against the energy detector flagging ``T·logsumexp(logits/T) >= threshold``.

    Objective (ascended): :func:`detector_margin`, ``min(max_{j≠y} z_j − z_y, threshold − T·logsumexp(z/T))``,
    positive exactly on the feasible set. Success: misclassified **and** not flagged (:func:`evades_detector`), so
    per example the returned point is the best evading adversarial point seen (the highest objective among them),
    else the highest-objective point; of several restarts the first that evades is kept. Pass the deployed
    detector's `threshold` and `temperature` (``energy.fit_detector``). Untargeted; `logits_fn` must be the
    deterministic logits the detector scores (an :class:`EOT` model predicts a log-mean-softmax, whose logsumexp
    is 0). Other keyword arguments (``norm``, ``steps`` = 100, ``restarts``, ``rho``, ``indices``, ``loop``,
    ``validate``) go to :func:`apgd`."""
    if isinstance(logits_fn, EOT):
        raise ValueError("detector_apgd: the detector scores deterministic logits; an EOT model's prediction is a "
                         "log-mean-softmax (logsumexp 0): pass the logits the detector sees")
    for k in ("loss", "targeted", "success_fn"):
        if k in apgd_kwargs:
            raise TypeError(f"detector_apgd: {k!r} is fixed by the attack")
    loss = lambda logits, y_: detector_margin(logits, y_, threshold=threshold, temperature=temperature)  # noqa: E731
    return apgd(logits_fn, x, y, key=key, eps=eps, loss=loss,
                success_fn=evades_detector(threshold=threshold, temperature=temperature), **apgd_kwargs)
