"""Fast Adaptive Boundary attack (FAB; Croce & Hein, ICML 2020, "Minimally distorted adversarial examples with a
fast adaptive boundary attack"), untargeted and targeted (FAB-T, AutoAttack's), Linf and L2, on the attack engine.

FAB looks for the adversarial example closest to x. Each iteration linearises the decision boundary at the current
point ``x_k``: for the class j whose linearised boundary ``f_j(x_k) + ∇f_j·(z − x_k) = 0`` is closest (untargeted:
``f_j = z_j − z_y`` over all j ≠ y; targeted: the one target), it projects both ``x_k`` and the original ``x`` onto
that hyperplane *inside the box* [0, 1]^d (minimal Lp distance, :func:`project_hyperplane`), giving ``δ_k`` and
``δ_orig``, and moves to the biased convex combination

    ``x_{k+1} = clip((x_k + η·δ_k)(1 − α) + (x + η·δ_orig)·α, 0, 1)``,  ``α = min(‖δ_k‖/(‖δ_k‖ + ‖δ_orig‖), α_max)``,

(η: overshoot). Whenever ``x_{k+1}`` is misclassified it is recorded if closer than the best so far, and the iterate
steps back towards x: ``x + β(x_{k+1} − x)``. An adversarial example counts only within the budget ``ε``.

On the engine: the engine's iterate is the freshly computed ``x_{k+1}``; its evaluation (forward only,
``use_grad=False``) is the success check, and ``keep="best"`` with score ``−‖x_{k+1} − x‖`` keeps the closest
misclassified point. The transform :func:`fab_step` then steps back where successful and needs the gradient *at that
point*, so it differentiates the step's ``objective`` itself: one forward pass (check) plus one forward+backward pass
(linearisation) per iteration, as in the reference (the untargeted version takes one VJP per class).

Defaults are the reference's (fra31/auto-attack, ``fab_base.py`` / ``autoattack.py``): 100 iterations,
``α_max = 0.1``, ``η = 1.05``, ``β = 0.9``, FAB-T on the 9 classes with the largest clean logits other than y, one
restart per target; restarts after the first start at ``x + ε/2·t/‖t‖`` (t uniform in [−1, 1]^d for Linf, Gaussian for
L2). The projection solves the box-constrained problem by bracketing its one unknown, then solving the linear
piece exactly (written here, not the reference's); when the hyperplane cannot be reached inside the box, every
coordinate moves to the box boundary in the helpful direction.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from robust_jax.attacks import engine
from robust_jax.attacks._core import is_success
from robust_jax.attacks.apgd import (
    check_classes,
    example_keys,
    first_success,
    fold_keys,
    norm_of,
    sphere_start,
    top_other_classes,
    validate_common,
)
from robust_jax.attacks.engine import bcast
from robust_jax.models import logits_of

__all__ = ["fab", "fab_step", "fab_t", "project_hyperplane"]


def project_hyperplane(t, w, b, norm: str, *, iterations: int = 48):
    """Minimal-norm ``δ`` with ``w·(t + δ) = b`` and ``t + δ`` in [0, 1]^d, per row of (N, d) `t`, `w` and (N,) `b`.

    Moving towards the hyperplane, coordinate i can change by at most its room ``r_i`` (to 1 where it helps to
    increase, to 0 where it helps to decrease). With ``u = sign(b − w·t)·w`` the optimum is
    ``δ_i = sign(u_i)·min(λ, r_i)`` (Linf) or ``δ_i = u_i·min(λ, r_i/|u_i|)`` (L2, the KKT form of the box-clipped
    projection), for the smallest λ reaching the hyperplane. Both are ``F(λ) = Σ_i c_i·min(λ, m_i) = |b − w·t|``
    with F piecewise linear and nondecreasing. λ is bracketed by `iterations` bisection steps on [0, max m] (each
    one O(d) reduction: no sort, which costs an order of magnitude more on a CPU) and then solved exactly on the
    linear piece at the bracket's lower end, ``λ = lo + (target − F(lo)) / Σ_{m_i > lo} c_i``, capped at its upper
    end; the result is exact up to rounding once the bracket is narrower than the gap between breakpoints, and off
    by at most the bracket's width (``max m · 2^-iterations``) otherwise. If even moving every coordinate to the box
    boundary does not reach the hyperplane, that full move is returned."""
    gap = b - jnp.sum(w * t, axis=1)
    u = jnp.sign(gap)[:, None] * w
    room = jnp.maximum(jnp.where(u > 0, 1.0 - t, t), 0.0)
    if norm == "linf":
        c, m = jnp.abs(u), room
    elif norm == "l2":
        nz = u != 0
        c, m = jnp.square(u), jnp.where(nz, room / jnp.where(nz, jnp.abs(u), 1.0), 0.0)
    else:
        raise ValueError(f"unknown norm {norm!r}; use linf or l2")
    target = jnp.abs(gap)
    reach = lambda lam: jnp.sum(c * jnp.minimum(lam[:, None], m), axis=1)  # F(λ)

    def bisect(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        short = reach(mid) < target
        return jnp.where(short, mid, lo), jnp.where(short, hi, mid)

    top = jnp.max(m, axis=1)
    lo, hi = jax.lax.fori_loop(0, iterations, bisect, (jnp.zeros_like(target), top))
    slope = jnp.sum(jnp.where(m > lo[:, None], c, 0.0), axis=1)
    lam = jnp.minimum(lo + (target - reach(lo)) / jnp.maximum(slope, 1e-30), hi)
    lam = jnp.where(reach(top) < target, jnp.inf, lam)  # unreachable: full move
    if norm == "linf":
        return jnp.sign(u) * jnp.minimum(lam[:, None], m)
    return u * jnp.minimum(lam[:, None], m)


def fab_step(x, y, norm: str, *, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
             targeted: bool = False) -> optax.GradientTransformationExtraArgs:
    """FAB's iteration as an optax-style transform (see the module docstring). The engine runs it with
    ``use_grad=False``; `x` is the clean batch, `y` its labels. The transform gets ``success`` at the current
    iterate (the check), steps back towards `x` where successful, and linearises there through ``objective`` (whose
    value is the logit differences ``z_j − z_y``, (N, K) untargeted — the column of y is ignored — or (N,)
    ``z_t − z_y`` targeted)."""
    n = x.shape[0]
    x0 = x.reshape(n, -1)

    def update(descent, state, v, *, success, objective, **_):
        del descent
        here = jnp.where(bcast(success, v), x + beta * (v - x), v)
        ev, g = engine._value_and_grads(lambda u, k: objective(u), lambda u: u, here, None)
        if targeted:
            df, dg = ev.value, g.reshape(n, -1)
        else:
            q = (lambda a: jnp.sum(jnp.abs(a), -1)) if norm == "linf" else (lambda a: jnp.sqrt(jnp.sum(a * a, -1)))
            grads = jnp.moveaxis(g.reshape(g.shape[0], n, -1), 0, 1)  # (N, K, d)
            dist = jnp.abs(ev.value) / (q(grads) + 1e-12)
            dist = jnp.where(jax.nn.one_hot(y, dist.shape[1], dtype=bool), jnp.inf, dist)
            j = jnp.argmin(dist, axis=1)
            df = jnp.take_along_axis(ev.value, j[:, None], 1)[:, 0]
            dg = jnp.take_along_axis(grads, j[:, None, None], 1)[:, 0]
        xh = here.reshape(n, -1)
        b = jnp.sum(dg * xh, axis=1) - df  # the linearised boundary: dg·z = b
        d1 = project_hyperplane(xh, dg, b, norm)
        d2 = project_hyperplane(x0, dg, b, norm)
        a1 = jnp.maximum(norm_of(d1, norm), 1e-8)
        a2 = jnp.maximum(norm_of(d2, norm), 1e-8)
        alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
        nxt = jnp.clip((xh + eta * d1) * (1.0 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0)
        return nxt.reshape(v.shape) - v, state

    return optax.GradientTransformationExtraArgs(lambda v: optax.EmptyState(), update)


def _run(logits_fn, x, y, x_start, key, *, eps, norm, steps, target, alpha_max, eta, beta, loop):
    """One FAB run from `x_start`: per example the closest misclassified iterate, if within eps (else x), with
    success and score ``−distance``."""

    def value_fn(z, k):
        logits = logits_of(logits_fn(z))
        pick = lambda c: jnp.take_along_axis(logits, c[:, None], 1)[:, 0]
        diffs = logits - pick(y)[:, None] if target is None else pick(target) - pick(y)
        return engine.Evaluation(diffs, is_success(logits, y), -norm_of(z - x, norm))

    step = fab_step(x, y, norm, alpha_max=alpha_max, eta=eta, beta=beta, targeted=target is not None)
    res = engine.run(value_fn, x_start, key=key, steps=steps, optimizer=step, keep="best", use_grad=False,
                     loop=loop)
    ok = res.success & (norm_of(res.x - x, norm) <= eps)
    return engine.Result(jnp.where(bcast(ok, x), res.x, x), ok, jnp.where(ok, res.score, -jnp.inf))


def _fab(name, logits_fn, x, y, key, *, eps, norm, steps, restarts, n_target_classes, alpha_max, eta, beta,
         indices, loop, validate):
    validate_common(name, x, y, eps, norm, steps, restarts, validate)
    clean = jax.lax.stop_gradient(logits_of(logits_fn(x)))
    targeted = n_target_classes is not None
    check_classes(name, clean.shape[-1], min_classes=2, n_targets=n_target_classes)
    targets = top_other_classes(clean, y, n_target_classes) if targeted else None
    keys = example_keys(key, x.shape[0], indices)
    run_key = jax.random.split(key)[1]  # the engine's (EOT samples), apart from the examples' keys

    def run(r):
        restart = r % restarts
        start = sphere_start(fold_keys(keys, r), x, 0.5 * eps, norm)
        start = jnp.where(restart == 0, x, start)  # the first run of each target starts at x
        t = None if not targeted else jax.lax.dynamic_index_in_dim(targets, r // restarts, 1, keepdims=False)
        return _run(logits_fn, x, y, start, jax.random.fold_in(run_key, r), eps=eps, norm=norm, steps=steps, target=t,
                    alpha_max=alpha_max, eta=eta, beta=beta, loop=loop)

    return first_success(run, restarts * (n_target_classes if targeted else 1), x).x


def fab(logits_fn: Callable, x, y, *, key, eps, norm: str = "linf", steps: int = 100, restarts: int = 1,
        alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9, indices=None, loop: str = "auto",
        validate: bool = True):
    """Untargeted FAB (see the module docstring): per example the closest adversarial example found by `restarts`
    runs (the first from x, the others from random points at distance eps/2), returned if within `eps` (Linf or
    L2), else x. Costs per example and restart `steps` × (1 forward + 1 forward with one backward pass per class).
    `logits_fn` may be an :class:`EOT` (FAB then attacks its prediction, the log mean softmax at its fixed key)."""
    return _fab("fab", logits_fn, x, y, key, eps=eps, norm=norm, steps=steps, restarts=restarts,
                n_target_classes=None, alpha_max=alpha_max, eta=eta, beta=beta, indices=indices, loop=loop,
                validate=validate)


def fab_t(logits_fn: Callable, x, y, *, key, eps, norm: str = "linf", steps: int = 100, restarts: int = 1,
          n_target_classes: int = 9, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9, indices=None,
          loop: str = "auto", validate: bool = True):
    """FAB-T (AutoAttack's): targeted FAB towards each of the `n_target_classes` classes with the largest clean
    logits other than y in turn (`restarts` runs each), keeping per example the first run that found a
    misclassified point within `eps`; returns it, else x. `y` holds the true labels (success = misclassified, as in
    the reference). Cost per example and run: `steps` × (2 forward + 1 backward) passes."""
    return _fab("fab_t", logits_fn, x, y, key, eps=eps, norm=norm, steps=steps, restarts=restarts,
                n_target_classes=n_target_classes, alpha_max=alpha_max, eta=eta, beta=beta, indices=indices,
                loop=loop, validate=validate)
