"""Carlini & Wagner L2 attack: a minimum-distance attack, optimised with Adam in tanh space."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from robust_jax.attacks import engine
from robust_jax.attacks._core import _concrete, check_inputs, choose_loop, cw_margin, iterate, loss_and_logits

_TANH_SHRINK = 1.0 - 1e-6  # keeps arctanh finite for pixels at exactly 0 or 1
_NO_UPPER = 1e10  # "upper bound on c not found yet"


def to_tanh_space(x):
    """``w = arctanh((2x − 1)·(1 − 1e-6))``: the unconstrained variable whose pixels ``(tanh(w) + 1)/2`` ≈ x."""
    return jnp.arctanh((2.0 * x - 1.0) * _TANH_SHRINK)


def from_tanh_space(w):
    """Pixels ``(tanh(w) + 1)/2``, always inside [0, 1]: the box constraint holds by construction."""
    return (jnp.tanh(w) + 1.0) / 2.0


def cw_loss(logits, y, *, targeted: bool = False, confidence: float = 0.0):
    """Per-example CW margin loss ``f`` (minimised), floored at ``−confidence``.

    Untargeted: ``max(z_y − max_{j≠y} z_j, −κ)``; targeted (`y` = target t): ``max(max_{j≠t} z_j − z_t, −κ)``.
    It reaches its floor ``−κ`` once the example is misclassified (or classified as t) by a margin of κ.
    """
    m = cw_margin(logits, y)  # max_{j≠y} z_j − z_y
    return jnp.maximum(m if targeted else -m, -confidence)


def _succeeded(logits, y, targeted: bool, confidence: float):
    """Adversarial with margin κ: the prediction is wrong (or the target) *and* the CW margin is at least κ."""
    pred = jnp.argmax(logits, axis=-1)
    m = cw_margin(logits, y)
    return (pred == y) & (-m >= confidence) if targeted else (pred != y) & (m >= confidence)


def _flat_sq_norm(v):
    return jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)))


def cw_l2(
    logits_fn: Callable,
    x,
    y,
    *,
    key,
    targeted: bool = False,
    confidence: float = 0.0,
    steps: int = 100,
    lr: float = 0.1,
    binary_search_steps: int = 5,
    initial_const: float = 1.0,
    loop: str = "auto",
    validate: bool = True,
):
    """Carlini & Wagner L2 attack (Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks",
    IEEE S&P 2017): the smallest L2 perturbation that fools the classifier with margin `confidence`.

    In tanh space, ``x_adv = (tanh(w) + 1)/2`` (always in [0, 1]), starting from ``w = arctanh((2x − 1)(1 − 1e-6))``,
    it minimises ``‖x_adv − x‖₂² + c · f(x_adv)`` with ``optax.adam(lr)`` for `steps` iterations (the attack engine
    with ``decode`` = the tanh map and ``keep="best"`` scored by −L2), where f is the CW margin loss
    (:func:`cw_loss`): untargeted ``max(z_y − max_{j≠y} z_j, −κ)``, targeted (`y` holds targets t)
    ``max(max_{j≠t} z_j − z_t, −κ)``, κ = `confidence`. The trade-off constant c is found per example by
    `binary_search_steps` rounds of binary search starting from `initial_const`: a round that found an adversarial
    lowers the upper bound (``hi = c``, ``c = (lo + hi)/2``); a round that did not raises the lower bound
    (``lo = c``, ``c = 10c`` while no upper bound is known, else ``(lo + hi)/2``). Each round restarts from x with a
    fresh Adam state.

    Defaults suit a budget of ~500 gradient steps (the paper used up to 10,000 Adam steps at lr 0.01): ``lr=0.1``,
    because Adam moves w by about lr per step and a pixel at 0 or 1 starts at ``|w| ≈ 7.25``; ``initial_const=1``
    so the search does not spend rounds on constants far too small.

    Returns: per example, the adversarial with the **smallest L2 distance** among all iterates of all rounds that
    were adversarial with margin κ (predicted class ≠ y, or = target, and CW margin ≥ κ); where no iterate ever was,
    the input ``x`` itself, unchanged (so ``success(logits_fn, out, y)`` tells where the attack worked).

    `logits_fn` may be an :class:`EOT`: f is then averaged over its samples (fresh keys from `key` each step) and
    success is judged on its prediction ``logits_fn(x_adv)`` (κ in log-probability units). `key` is
    required for a uniform signature (only an EOT model uses it). `loop`: the engine's loop form (the binary-search
    rounds use the same form). Pure and jit-able; batched (no per-example Python loop).
    """
    check_inputs(x, y, name="cw_l2", validate=validate)
    if steps < 1 or binary_search_steps < 1:
        raise ValueError(f"cw_l2: need steps >= 1 and binary_search_steps >= 1, got steps={steps}, "
                         f"binary_search_steps={binary_search_steps}")
    for name, v in (("lr", lr), ("initial_const", initial_const)):
        if _concrete(v) and not v > 0:
            raise ValueError(f"cw_l2: {name} must be > 0, got {v}")
    if _concrete(confidence) and confidence < 0:
        raise ValueError(f"cw_l2: confidence must be >= 0, got {confidence}")
    form = choose_loop(loop, steps)
    n = x.shape[0]
    w0 = to_tanh_space(x)
    f_of_logits = lambda z, t: cw_loss(z, t, targeted=targeted, confidence=confidence)

    def one_round(r, carry):
        c, lo, hi, best_l2, best_adv = carry

        def value_fn(z, k):
            f, logits = loss_and_logits(logits_fn, f_of_logits, z, y, k)
            l2sq = _flat_sq_norm(z - x)
            return engine.Evaluation(-(l2sq + c * f), _succeeded(logits, y, targeted, confidence), -l2sq)

        res = engine.run(value_fn, w0, key=jax.random.fold_in(key, r), steps=steps, optimizer=optax.adam(lr),
                         decode=from_tanh_space, keep="best", loop=form)
        found = res.success
        l2sq = -res.score
        better = found & (l2sq < best_l2)
        best_l2 = jnp.where(better, l2sq, best_l2)
        best_adv = jnp.where(engine.bcast(better, x), res.x, best_adv)
        # binary search on c, per example
        hi = jnp.where(found, jnp.minimum(hi, c), hi)
        lo = jnp.where(found, lo, jnp.maximum(lo, c))
        c = jnp.where(hi < _NO_UPPER, (lo + hi) / 2, c * 10)
        return c, lo, hi, best_l2, best_adv

    carry = (jnp.full(n, initial_const, jnp.float32), jnp.zeros(n, jnp.float32), jnp.full(n, _NO_UPPER, jnp.float32),
             jnp.full(n, jnp.inf, jnp.float32), x)
    carry = iterate(one_round, carry, binary_search_steps, form)
    return jax.lax.stop_gradient(carry[4])
