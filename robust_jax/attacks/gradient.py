"""Gradient attacks built on one PGD mechanism: FGSM is one PGD step from x, LE-PGD is PGD with another loss."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from robust_jax.attacks._core import (
    check_inputs,
    energy_regularised,
    input_grad,
    iterate,
    objective,
    resolve_loss,
    success,
)

NORMS = ("linf", "l2")


def _flat_norm(v):
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))


def project(x_adv, x, eps, norm: str):
    """Project x_adv onto the eps-ball around x (exact for both norms), then onto the [0, 1] box."""
    delta = x_adv - x
    if norm == "linf":
        delta = jnp.clip(delta, -eps, eps)
    else:
        n = _flat_norm(delta)
        delta = delta * jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12))
    return jnp.clip(x + delta, 0.0, 1.0)


def _ascent_direction(g, norm: str):
    if norm == "linf":
        return jnp.sign(g)
    return g / jnp.maximum(_flat_norm(g), 1e-12)


def random_start(key, x, eps, norm: str):
    """A uniform point of the eps-ball (Linf: uniform per coordinate; L2: uniform in the ball)."""
    if norm == "linf":
        delta = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps
    else:
        k1, k2 = jax.random.split(key)
        d = x[0].size
        direction = jax.random.normal(k1, x.shape, x.dtype)
        direction = direction / jnp.maximum(_flat_norm(direction), 1e-12)
        radius = jax.random.uniform(k2, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype) ** (1.0 / d)
        delta = direction * radius * eps
    return jnp.clip(x + delta, 0.0, 1.0)


def _pgd_run(logits_fn, x, y, key, eps, step_size, steps, norm, start, loss_fn, targeted, loop, x_init=None):
    k_start, k_steps = jax.random.split(key)
    if x_init is not None:
        x0 = project(x_init, x, eps, norm)
    else:
        x0 = random_start(k_start, x, eps, norm) if start else x

    def body(i, x_adv):
        _, g = input_grad(logits_fn, loss_fn, x_adv, y, jax.random.fold_in(k_steps, i), targeted)
        return project(x_adv + step_size * _ascent_direction(g, norm), x, eps, norm)

    return jax.lax.stop_gradient(iterate(body, x0, steps, loop))


def pgd(
    logits_fn: Callable,
    x,
    y,
    *,
    key,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    random_start: bool = True,
    loss="ce",
    targeted: bool = False,
    restarts: int = 1,
    loop: str = "auto",
    x_init=None,
):
    """Projected gradient descent (Madry et al. 2018) in the Linf or L2 ball of radius `eps`, inside [0, 1].

    `loss` is ``"ce"``, ``"cw"`` (margin) or a callable ``(logits, y) -> per-example loss`` (ascended; for
    ``targeted=True`` `y` holds the targets and ``−loss`` is ascended). With ``restarts > 1`` each example keeps
    the first successful run, else the run with the highest objective. `logits_fn` may be an :class:`EOT`.
    `loop`: ``auto`` | ``unroll`` | ``fori`` | ``scan`` (see ``choose_loop``). `x_init` continues from a given
    point (projected onto the ball) instead of a random start.
    """
    check_inputs(x, y, eps=eps, name="pgd")
    if norm not in NORMS:
        raise ValueError(f"pgd: unknown norm {norm!r}; use one of {NORMS}")
    if steps < 0 or restarts < 1:
        raise ValueError(f"pgd: need steps >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
    loss_fn = resolve_loss(loss)
    x = jnp.asarray(x, jnp.float32)
    best, best_ok, best_val = None, None, None
    for r in range(restarts):
        k = jax.random.fold_in(key, r)
        x_adv = _pgd_run(logits_fn, x, y, k, eps, step_size, steps, norm, random_start, loss_fn, targeted, loop,
                         x_init)
        if restarts == 1:
            return x_adv
        ok = success(logits_fn, x_adv, y, targeted)
        val = objective(logits_fn, loss_fn, x_adv, y, k, targeted)
        if best is None:
            best, best_ok, best_val = x_adv, ok, val
            continue
        take = (ok & ~best_ok) | ((ok == best_ok) & ~best_ok & (val > best_val))
        best = jnp.where(take[:, None, None, None], x_adv, best)
        best_ok, best_val = best_ok | ok, jnp.where(take, val, best_val)
    return best


def pgd_snapshots(logits_fn: Callable, x, y, *, key, eps: float, step_size: float, snapshots=(5, 10, 20, 30, 50),
                  **pgd_kwargs) -> dict[int, jax.Array]:
    """One PGD trajectory with a fixed step size, returning the iterate after each step count in `snapshots`.

    PGD-k for every k in `snapshots` at the cost of PGD-max(k): the run is split into segments, each continuing
    from the previous one (``x_init``). ``0`` in `snapshots` gives the clean input.
    """
    snaps = sorted(set(int(k) for k in snapshots))
    out, x_cur, done = {}, None, 0
    for i, k in enumerate(snaps):
        if k == 0:
            out[0] = jnp.asarray(x, jnp.float32)
            continue
        x_cur = pgd(logits_fn, x, y, key=jax.random.fold_in(key, i), eps=eps, step_size=step_size, steps=k - done,
                    x_init=x_cur, **pgd_kwargs)
        out[k], done = x_cur, k
    return out


def fgsm(logits_fn: Callable, x, y, *, eps: float, targeted: bool = False, loss="ce"):
    """Fast gradient sign method (Goodfellow et al. 2015): ``clip(x + eps·sign(∇loss), 0, 1)`` — one PGD step."""
    check_inputs(x, y, eps=eps, name="fgsm")
    return pgd(logits_fn, x, y, key=jax.random.PRNGKey(0), eps=eps, step_size=eps, steps=1, norm="linf",
               random_start=False, loss=loss, targeted=targeted)


def le_pgd(logits_fn: Callable, x, y, *, key, eps: float, step_size: float, steps: int, lam: float,
           temperature: float = 1.0, base_loss="ce", **pgd_kwargs):
    """Low-energy PGD: PGD ascending ``loss(x) − lam · T·logsumexp(logits(x)/T)`` (= loss + lam·energy).

    It fools the classifier while keeping logsumexp low (energy high, as on clean data), to evade an
    energy-threshold detector. ``lam = 0`` is plain PGD.
    """
    loss = energy_regularised(lam, resolve_loss(base_loss), temperature)
    return pgd(logits_fn, x, y, key=key, eps=eps, step_size=step_size, steps=steps, loss=loss, **pgd_kwargs)
