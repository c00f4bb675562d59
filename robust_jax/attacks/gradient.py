"""Gradient attacks as configurations of the engine: PGD (Linf / L2), FGSM (one PGD step from x), LE-PGD (PGD on
``loss + λ·energy``). ``eps`` (and LE-PGD's ``lam``) may be a 1-D array: one compiled call returns a leading axis
with one result per value (a robustness curve in one call), each equal to the call with that single value."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from robust_jax.attacks import engine
from robust_jax.attacks._core import check_inputs, energy_regularised, is_success, loss_and_logits, resolve_loss
from robust_jax.attacks.engine import project, random_start

NORMS = ("linf", "l2")

__all__ = ["NORMS", "fgsm", "le_pgd", "pgd", "pgd_snapshots", "project", "random_start", "sweep"]


def sweep(fn: Callable, *values):
    """Call ``fn(*scalars)`` once per position of the 1-D arrays in `values` as one vmapped computation, stacking
    the outputs on a new leading axis; scalars are passed through to every call. With no 1-D value, ``fn(*values)``.
    """
    arrays = [jnp.ndim(v) == 1 for v in values]
    if not any(arrays):
        return fn(*values)
    lengths = {int(jnp.shape(v)[0]) for v, a in zip(values, arrays) if a}
    if len(lengths) != 1:
        raise ValueError(f"swept arrays must have one length, got lengths {sorted(lengths)}")
    return jax.vmap(fn, in_axes=tuple(0 if a else None for a in arrays))(
        *(jnp.asarray(v, jnp.float32) if a else v for v, a in zip(values, arrays)))


def _validate_common(name, x, y, eps, norm, steps, restarts=1, validate=True):
    check_inputs(x, y, eps=eps, name=name, validate=validate)
    if norm not in NORMS:
        raise ValueError(f"{name}: unknown norm {norm!r}; use one of {NORMS}")
    if steps < 0 or restarts < 1:
        raise ValueError(f"{name}: need steps >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")


def _pgd_run(logits_fn, x, y, key, eps, step_size, *, steps, norm, start, loss_fn, targeted, loop, keep, x_init,
             record=(), evaluate_last=False):
    k_start, k_steps = jax.random.split(key)
    if x_init is not None:
        v0 = project(x_init, x, eps, norm)
    else:
        v0 = random_start(k_start, x, eps, norm) if start else x

    def value_fn(z, k):
        value, logits = loss_and_logits(logits_fn, loss_fn, z, y, k, targeted)
        return engine.Evaluation(value, is_success(logits, y, targeted))

    return engine.run(value_fn, v0, key=k_steps, steps=steps, optimizer=engine.step_for(norm, step_size),
                      project=lambda v: project(v, x, eps, norm), keep=keep, loop=loop, record=record,
                      evaluate_last=evaluate_last)


def pgd(
    logits_fn: Callable,
    x,
    y,
    *,
    key,
    eps,
    step_size,
    steps: int,
    norm: str = "linf",
    random_start: bool = True,
    loss="ce",
    targeted: bool = False,
    restarts: int = 1,
    keep: str = "last",
    loop: str = "auto",
    x_init=None,
    validate: bool = True,
):
    """Projected gradient descent (Madry et al. 2018) in the Linf or L2 ball of radius `eps`, inside [0, 1].

    `loss` is ``"ce"``, ``"cw"`` (margin) or a callable ``(logits, y) -> per-example loss`` (ascended; with
    ``targeted=True`` `y` holds the targets and ``−loss`` is ascended). `keep`: ``"last"`` returns the final iterate
    (Madry et al.'s PGD); ``"best"`` the best iterate per example (a successful one if any, else the highest
    objective). ``restarts > 1`` runs that many random starts (a ``vmap`` over keys) and keeps per example the first
    successful run, else the one with the highest objective. `logits_fn` may be an :class:`EOT`. `loop`: see
    ``choose_loop``. `x_init` continues from a given point (projected onto the ball) instead of a random start.

    `eps` and `step_size` may be 1-D arrays (one length, or one of them a scalar): the result then has a leading
    axis, one adversarial batch per value — e.g. ``eps=jnp.array([2, 4, 8]) / 255, step_size=...`` — computed in
    one vmapped call; each equals the call with that single value and the same key.
    """
    _validate_common("pgd", x, y, eps, norm, steps, restarts, validate)
    loss_fn = resolve_loss(loss)
    if keep not in engine.KEEP:
        raise ValueError(f"pgd: unknown keep {keep!r}; use one of {engine.KEEP}")

    def one(e, s):
        kw = dict(steps=steps, norm=norm, start=random_start, loss_fn=loss_fn, targeted=targeted, loop=loop,
                  keep=keep, x_init=x_init)
        if restarts == 1:
            return _pgd_run(logits_fn, x, y, key, e, s, **kw).x
        keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(restarts))
        runs = jax.vmap(lambda k: _pgd_run(logits_fn, x, y, k, e, s, evaluate_last=True, **kw))(keys)
        return engine.best_of(runs).x

    return sweep(one, eps, step_size)


def pgd_snapshots(logits_fn: Callable, x, y, *, key, eps, step_size, snapshots=(5, 10, 20, 30, 50), norm="linf",
                  random_start: bool = True, loss="ce", targeted: bool = False, loop: str = "auto",
                  validate: bool = True) -> dict[int, jax.Array]:
    """One PGD trajectory, returning the iterate after each step count k > 0 in `snapshots` — the entry ``k``
    equals ``pgd(..., steps=k)`` with the same key — at the cost of PGD-max(snapshots); the entry ``0`` (no attack)
    is the clean input `x`. `eps` / `step_size` may be 1-D sweeps as in :func:`pgd`."""
    snaps = sorted({int(k) for k in snapshots})
    if not snaps or snaps[0] < 0:
        raise ValueError(f"pgd_snapshots: snapshots must be step counts >= 0, got {snapshots}")
    _validate_common("pgd_snapshots", x, y, eps, norm, snaps[-1], 1, validate)
    loss_fn = resolve_loss(loss)

    def one(e, s):
        res = _pgd_run(logits_fn, x, y, key, e, s, steps=snaps[-1], norm=norm, start=random_start, loss_fn=loss_fn,
                       targeted=targeted, loop=loop, keep="last", x_init=None, record=snaps)
        return {k: (x if k == 0 else res[k].x) for k in snaps}

    return sweep(one, eps, step_size)


def fgsm(logits_fn: Callable, x, y, *, key, eps, targeted: bool = False, loss="ce", validate: bool = True):
    """Fast gradient sign method (Goodfellow et al. 2015): ``clip(x + eps·sign(∇loss), 0, 1)`` — one PGD step from
    x with step size eps. `key` is required for a uniform signature (used only by an :class:`EOT` model).
    `eps` may be a 1-D sweep."""
    return pgd(logits_fn, x, y, key=key, eps=eps, step_size=eps, steps=1, norm="linf", random_start=False, loss=loss,
               targeted=targeted, validate=validate)


def le_pgd(logits_fn: Callable, x, y, *, key, eps, step_size, steps: int, lam, temperature: float = 1.0,
           base_loss="ce", **pgd_kwargs):
    """Low-energy PGD: PGD ascending ``loss(x) − lam · T·logsumexp(logits(x)/T)`` (= loss + lam·energy).

    It fools the classifier while keeping logsumexp low (energy high, as on clean data), to evade an
    energy-threshold detector. ``lam = 0`` is plain PGD. `lam` may be a 1-D sweep (leading axis of the result);
    with a swept `lam`, `eps` and `step_size` must be scalars.
    """
    base = resolve_loss(base_loss)
    if jnp.ndim(lam) == 0:
        return pgd(logits_fn, x, y, key=key, eps=eps, step_size=step_size, steps=steps,
                   loss=energy_regularised(lam, base, temperature), **pgd_kwargs)
    if jnp.ndim(eps) or jnp.ndim(step_size):
        raise ValueError("le_pgd: sweep either lam or eps/step_size, not both")
    return sweep(lambda lam_: pgd(logits_fn, x, y, key=key, eps=eps, step_size=step_size, steps=steps,
                                  loss=energy_regularised(lam_, base, temperature), **pgd_kwargs), lam)
