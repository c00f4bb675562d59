"""Auto-PGD (APGD; Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020) and its DLR losses, as configurations of :mod:`robust_jax.attacks.engine`.

APGD is PGD with momentum whose step size ``η`` adapts per example: ``η`` starts at ``2ε`` and is halved at
*checkpoints* ``w_j = ⌈p_j·N_iter⌉`` (``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)``) when

1. the objective increased in at most a fraction ``rho`` of the steps since the last checkpoint, or
2. ``η`` was not halved at the last checkpoint and the best objective has not improved since then,

and after a halving the iterate restarts from the best point found so far. The step itself is
``z = P(x + η·s(∇f))``, ``x⁺ = P(x + α(z − x) + (1 − α)(x − x_prev))`` with ``α = 0.75`` (``α = 1`` on the first
step), ``s`` = sign (Linf) or L2-normalisation, ``P`` the projection onto the ball and the box. That step and its
per-example state (``η``, the previous iterate, the best point and its gradient, the increase counter, the checkpoint
bookkeeping) are one optax-style transform, :func:`apgd_step`, driven by ``engine.run`` with ``keep="best"``.

Facts checked against the reference implementation (fra31/auto-attack, ``autopgd_base.py``):
checkpoint lengths use integer steps — first ``max(⌊0.22·N⌋, 1)``, then shrinking by ``max(⌊0.03·N⌋, 1)`` down to
``max(⌊0.06·N⌋, 1)`` (for N = 100: 22, 41, 57, 70, 80, 87, 93, 99, the paper's ``p_j``); condition 1 halves when
the number of increases is ``<= rho·window`` (the paper writes ``<``; they differ only when ``rho·window`` is an
integer, e.g. a 16-step window); condition 2 is off at the first checkpoint; the random start is ``x + ε·t/‖t‖``
(Linf: ``t`` uniform in [−1, 1]^d scaled to Linf norm 1, L2: ``t`` Gaussian), clipped to [0, 1]; the best point used
for restarts is the highest objective seen (strictly higher replaces). One deliberate difference: at the first
checkpoint the reference compares the first step's loss with an uninitialised zero (an indexing artifact of its
loss buffer); here it is compared with the loss at the starting point, as in the paper.

Randomness is per example: example ``i`` draws from ``fold_in(key, indices[i])`` (``indices`` defaults to
``arange(N)``), so an example's result does not depend on the batch it is in when ``indices`` are its positions in
the dataset (the host-side runner of ``experiments/autoattack.py`` passes them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from robust_jax.attacks import engine
from robust_jax.attacks._core import check_inputs, is_success, loss_and_logits, resolve_loss
from robust_jax.attacks.engine import bcast, flat_norm, project
from robust_jax.models import logits_of

NORMS = ("linf", "l2")

__all__ = ["apgd", "apgd_step", "apgd_t", "dlr_loss", "dlr_loss_targeted", "example_keys", "step_checkpoints",
           "top_other_classes"]


# ------------------------------------------------------------------------------------------------------ losses
def dlr_loss(logits, y):
    """Difference of Logits Ratio: ``−(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e−12)``, z_π sorted decreasingly.

    Positive once misclassified; invariant to shifting and (positively) rescaling the logits. Needs >= 3 classes."""
    if logits.shape[-1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[-1]}")
    top = jax.lax.top_k(logits, 3)[0]
    onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=bool)
    z_y = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
    return -(z_y - other) / (top[..., 0] - top[..., 2] + 1e-12)


def dlr_loss_targeted(logits, y, target):
    """Targeted DLR: ``−(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e−12)`` for the true class y and target t (ascend it
    to push x towards t). Needs >= 4 classes."""
    if logits.shape[-1] < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, got {logits.shape[-1]}")
    top = jax.lax.top_k(logits, 4)[0]
    pick = lambda c: jnp.take_along_axis(logits, c[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return -(pick(y) - pick(target)) / (top[..., 0] - 0.5 * (top[..., 2] + top[..., 3]) + 1e-12)


def resolve_apgd_loss(loss) -> Callable:
    """``"dlr"`` -> :func:`dlr_loss`; otherwise as ``resolve_loss`` (``"ce"``, ``"cw"`` or a callable)."""
    if isinstance(loss, str) and loss == "dlr":
        return dlr_loss
    return resolve_loss(loss)


# ------------------------------------------------------------------------------------------- shared plumbing
def example_keys(key, n: int, indices=None):
    """One PRNG key per example: ``fold_in(key, indices[i])`` (default ``indices = arange(n)``)."""
    idx = jnp.arange(n, dtype=jnp.int32) if indices is None else jnp.asarray(indices).astype(jnp.int32)
    if idx.shape != (n,):
        raise ValueError(f"indices must have shape ({n},), got {idx.shape}")
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)


def fold_keys(keys, tag):
    """``fold_in(k, tag)`` for every per-example key."""
    return jax.vmap(lambda k: jax.random.fold_in(k, tag))(keys)


def per_example(keys, fn, shape):
    """Stack ``fn(key_i, shape)`` over the per-example keys (shape excludes the batch axis)."""
    return jax.vmap(lambda k: fn(k, shape))(keys)


def norm_of(delta, norm: str):
    """Per-example Linf or L2 norm of a batch, shape (N,)."""
    flat = delta.reshape(delta.shape[0], -1)
    if norm == "linf":
        return jnp.max(jnp.abs(flat), axis=1)
    return jnp.sqrt(jnp.sum(jnp.square(flat), axis=1))


def sphere_start(keys, x, radius, norm: str):
    """The reference's random start: ``clip(x + radius·t/‖t‖, 0, 1)`` with t uniform in [−1, 1]^d (Linf) or
    Gaussian (L2), one draw per example; `radius` a scalar or (N,)."""
    if norm == "linf":
        t = per_example(keys, lambda k, s: jax.random.uniform(k, s, x.dtype, -1.0, 1.0), x.shape[1:])
    else:
        t = per_example(keys, lambda k, s: jax.random.normal(k, s, x.dtype), x.shape[1:])
    t = t / (bcast(norm_of(t, norm), t) + 1e-12)
    r = jnp.broadcast_to(jnp.asarray(radius, x.dtype), (x.shape[0],))
    return jnp.clip(x + bcast(r, x) * t, 0.0, 1.0)


def first_success(run: Callable, n_runs: int, x):
    """Per example, the first successful of `n_runs` runs (``run(r) -> engine.Result``), else the one with the
    highest score, else `x` (where no run has a finite score): ``engine.first_success`` from the clean batch —
    sequential, as the reference runs its restarts and target classes on the points still robust."""
    n = x.shape[0]
    none = engine.Result(x, jnp.zeros((n,), bool), jnp.full((n,), -jnp.inf, jnp.float32))
    return engine.first_success(run, n_runs, init=none)


def top_other_classes(logits, y, k: int):
    """The `k` classes with the largest logits other than y, in decreasing order: (N, k). For a correctly
    classified example these are ranks 2..k+1 — the reference's target classes for APGD-T and FAB-T."""
    onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=bool)
    return jax.lax.top_k(jnp.where(onehot, -jnp.inf, logits), k)[1]


def check_classes(name: str, n_classes: int, *, min_classes: int = 2, n_targets: int | None = None):
    if n_classes < min_classes:
        raise ValueError(f"{name}: needs at least {min_classes} classes, the model has {n_classes}")
    if n_targets is not None and not 1 <= n_targets <= n_classes - 1:
        raise ValueError(f"{name}: n_target_classes must be in [1, {n_classes - 1}] for {n_classes} classes, "
                         f"got {n_targets}")


def validate_common(name, x, y, eps, norm, steps, restarts, validate):
    check_inputs(x, y, eps=eps, name=name, validate=validate)
    if norm not in NORMS:
        raise ValueError(f"{name}: unknown norm {norm!r}; use one of {NORMS}")
    if jnp.ndim(eps) != 0:
        raise ValueError(f"{name}: eps must be a scalar")
    if steps < 1 or restarts < 1:
        raise ValueError(f"{name}: need steps >= 1 and restarts >= 1, got steps={steps}, restarts={restarts}")


# ------------------------------------------------------------------------------------------ step-size schedule
def step_checkpoints(steps: int) -> list[int]:
    """APGD's checkpoints ``w_1 < w_2 < ... <= steps``: after how many steps the step size may be halved.

    The paper's ``w_j = ⌈p_j·N⌉`` with ``p_1 = 0.22`` and ``p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)``, in
    the reference's integer form: windows of ``max(⌊0.22N⌋, 1)`` steps, each the previous minus ``max(⌊0.03N⌋, 1)``,
    never below ``max(⌊0.06N⌋, 1)``. ``step_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]``."""
    if steps < 1:
        raise ValueError(f"need steps >= 1, got {steps}")
    window, smallest, shrink = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    out, w = [], window
    while w <= steps:
        out.append(w)
        window = max(window - shrink, smallest)
        w += window
    return out


class APGDState(NamedTuple):
    eta: jax.Array  # (N,) step size
    x_prev: jax.Array  # the point the previous step started from (momentum)
    x_best: jax.Array  # highest-objective point so far, and its gradient (restarts go there)
    g_best: jax.Array
    f_best: jax.Array  # (N,)
    f_prev: jax.Array  # (N,) objective at the previous iterate
    increases: jax.Array  # (N,) int32: steps since the last checkpoint that increased the objective
    f_best_check: jax.Array  # (N,) best objective at the last checkpoint
    halved_check: jax.Array  # (N,) bool: was eta halved at the last checkpoint (True before the first)


def apgd_step(x, eps, norm: str, steps: int, *, rho: float = 0.75, momentum: float = 0.75,
              initial_step=None) -> optax.GradientTransformationExtraArgs:
    """APGD's step as an optax-style transform for ``engine.run`` (see the module docstring): it receives the
    descent direction ``−∇f`` at the current iterate and ``value=f`` (per example), ``step=i``; returns the update
    to the next iterate. `x` is the clean batch (centre of the ball), `steps` the run's length (fixes the
    checkpoints); `initial_step` defaults to ``2·eps``."""
    checkpoints = np.asarray(step_checkpoints(steps), np.int32)
    windows = np.diff(np.concatenate([[0], checkpoints])).astype(np.float32)
    eta0 = 2.0 * eps if initial_step is None else initial_step

    def direction(g):
        if norm == "linf":
            return jnp.sign(g)
        return g / (flat_norm(g) + 1e-12)

    def init(v):
        n = v.shape[0]
        f = jnp.full((n,), -jnp.inf, v.dtype)
        return APGDState(eta=jnp.broadcast_to(jnp.asarray(eta0, v.dtype), (n,)), x_prev=v, x_best=v,
                         g_best=jnp.zeros_like(v), f_best=f, f_prev=f, increases=jnp.zeros((n,), jnp.int32),
                         f_best_check=f, halved_check=jnp.ones((n,), bool))

    def update(descent, s: APGDState, v, *, value, step, **_):
        g, f = -descent, value
        first = step == 0
        increases = s.increases + ((f > s.f_prev) & ~first).astype(jnp.int32)
        better = first | (f > s.f_best)
        where = lambda m, a, b: jnp.where(bcast(m, a), a, b)
        x_best, g_best, f_best = where(better, v, s.x_best), where(better, g, s.g_best), jnp.where(better, f,
                                                                                                   s.f_best)
        hit = step == checkpoints
        at_check = jnp.any(hit)
        window = jnp.sum(jnp.where(hit, windows, 0.0))
        oscillating = increases.astype(jnp.float32) <= rho * window  # condition 1
        stalled = ~s.halved_check & (s.f_best_check >= f_best)  # condition 2
        halve = at_check & (oscillating | stalled)
        eta = jnp.where(halve, 0.5 * s.eta, s.eta)
        here, g = where(halve, x_best, v), where(halve, g_best, g)  # restart from the best point
        z = project(here + bcast(eta, here) * direction(g), x, eps, norm)
        a = jnp.where(first, 1.0, momentum).astype(here.dtype)
        x_next = project(here + a * (z - here) + (1.0 - a) * (here - s.x_prev), x, eps, norm)
        state = APGDState(eta=eta, x_prev=here, x_best=x_best, g_best=g_best, f_best=f_best, f_prev=f,
                          increases=jnp.where(at_check, 0, increases),
                          f_best_check=jnp.where(at_check, f_best, s.f_best_check),
                          halved_check=jnp.where(at_check, halve, s.halved_check))
        return x_next - v, state

    return optax.GradientTransformationExtraArgs(init, update)


# ------------------------------------------------------------------------------------------------- attacks
def _run(logits_fn, x, y, keys, key, *, eps, norm, steps, rho, loss_fn, targeted, success_y, loop,
         success_fn=None):
    """One APGD run from the reference's random start: ``engine.Result`` (best point: successful first, then the
    highest objective). ``success_y``/``targeted`` judge success (or ``success_fn(logits, success_y)``);
    ``loss_fn(logits, y)`` is ascended."""
    x0 = sphere_start(keys, x, eps, norm)

    def value_fn(z, k):
        value, logits = loss_and_logits(logits_fn, loss_fn, z, y, k, targeted)
        ok = is_success(logits, success_y, targeted) if success_fn is None else success_fn(logits, success_y)
        return engine.Evaluation(value, ok)

    return engine.run(value_fn, x0, key=key, steps=steps, optimizer=apgd_step(x, eps, norm, steps, rho=rho),
                      project=lambda v: project(v, x, eps, norm), keep="best", loop=loop)


def apgd(
    logits_fn: Callable,
    x,
    y,
    *,
    key,
    eps,
    norm: str = "linf",
    loss="ce",
    steps: int = 100,
    restarts: int = 1,
    rho: float = 0.75,
    targeted: bool = False,
    success_fn: Callable | None = None,
    indices=None,
    loop: str = "auto",
    validate: bool = True,
):
    """Auto-PGD (Croce & Hein 2020) in the Linf or L2 ball of radius `eps` (a scalar), inside [0, 1].

    `loss`: ``"ce"`` (APGD-CE), ``"dlr"`` (APGD-DLR, :func:`dlr_loss`) or a callable ``(logits, y) -> loss``
    (ascended; with ``targeted=True`` `y` holds targets and ``−loss`` is ascended, success = classified as the
    target). Each of `restarts` runs starts at a random point of the sphere of radius eps; per example the first
    successful run is kept (else the highest objective). Returns per example the best point seen: an adversarial
    one if any iterate was, else the highest-objective one. `logits_fn` may be an :class:`EOT` (the objective is the
    mean over its samples, success is judged on its prediction). `success_fn` ``(logits, y) -> bool (N,)`` replaces
    the success criterion (misclassified, or classified as the target) that decides which point and which restart is
    kept — e.g. "misclassified and not flagged by a detector" (:func:`robust_jax.attacks.detector_apgd`); it sees
    the logits success is judged on. `indices`: per-example key indices (see the module docstring). Cost per example
    and restart: `steps` forward+backward passes and one forward pass."""
    validate_common("apgd", x, y, eps, norm, steps, restarts, validate)
    loss_fn = resolve_apgd_loss(loss)
    keys = example_keys(key, x.shape[0], indices)
    run_key = jax.random.split(key)[1]  # the engine's (EOT samples), apart from the examples' keys

    def run(r):
        return _run(logits_fn, x, y, fold_keys(keys, r), jax.random.fold_in(run_key, r), eps=eps, norm=norm,
                    steps=steps, rho=rho, loss_fn=loss_fn, targeted=targeted, success_y=y, loop=loop,
                    success_fn=success_fn)

    return first_success(run, restarts, x).x


def apgd_t(
    logits_fn: Callable,
    x,
    y,
    *,
    key,
    eps,
    norm: str = "linf",
    steps: int = 100,
    restarts: int = 1,
    n_target_classes: int = 9,
    rho: float = 0.75,
    indices=None,
    loop: str = "auto",
    validate: bool = True,
):
    """APGD-T: APGD on the targeted DLR loss (:func:`dlr_loss_targeted`) towards each of the `n_target_classes`
    classes with the largest clean logits other than y (the reference's ranks 2..10), `restarts` runs per target,
    in that order; an untargeted attack (success = misclassified), keeping per example the first successful run.
    `y` holds the true labels. Cost per example: ``n_target_classes · restarts`` APGD runs."""
    validate_common("apgd_t", x, y, eps, norm, steps, restarts, validate)
    clean = logits_of(logits_fn(x))
    check_classes("apgd_t", clean.shape[-1], min_classes=4, n_targets=n_target_classes)
    targets = top_other_classes(jax.lax.stop_gradient(clean), y, n_target_classes)  # (N, T)
    keys = example_keys(key, x.shape[0], indices)
    run_key = jax.random.split(key)[1]  # the engine's (EOT samples), apart from the examples' keys

    def run(r):
        t = jax.lax.dynamic_index_in_dim(targets, r // restarts, axis=1, keepdims=False)
        loss_fn = lambda logits, y_: dlr_loss_targeted(logits, y_, t)
        return _run(logits_fn, x, y, fold_keys(keys, r), jax.random.fold_in(run_key, r), eps=eps, norm=norm,
                    steps=steps, rho=rho, loss_fn=loss_fn, targeted=False, success_y=y, loop=loop)

    return first_success(run, n_target_classes * restarts, x).x
