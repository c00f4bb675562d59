"""The one attack loop: an objective, an optax-style step, a projection and per-example bookkeeping.

Every iterative attack in :mod:`robust_jax.attacks` is a configuration of :func:`run` (in the spirit of optax and
DeepMind's ``adversarial_robustness/jax``):

- ``value_fn(x, key) -> Evaluation(value, success, score)``: the per-example objective to **ascend** at the
  (decoded) point ``x``, whether ``x`` already fools the model, and the score used to keep the best point
  (defaults to the objective). A ``value`` of shape ``(N, K)`` asks for K gradients (one per column, e.g. JSMA's
  two forward derivatives); column 0 is the objective.
- ``optimizer``: an ``optax.GradientTransformation`` that receives the *descent* direction ``−∇value`` (so optax's
  minimising conventions hold: :func:`sign_ascent` for Linf, :func:`l2_ascent` for L2, ``optax.adam`` for CW) and
  may take the extra keyword arguments ``value``, ``success``, ``key``, ``step`` and ``objective`` (a function
  ``v -> Evaluation`` at the step's key, for score-based steps such as random search). Plain optax transforms are
  wrapped with ``optax.with_extra_args_support``.
- ``project(v) -> v``: back into the feasible set (eps-ball and [0, 1] box); ``decode(v) -> x``: from the optimised
  variable to pixels (identity, or ``tanh`` space for CW).
- ``keep``: ``"last"`` returns the final iterate; ``"best"`` returns per example the best point seen (evaluated at
  every iterate including the last): successful points beat unsuccessful ones, then the higher score wins.
  ``early_stop=True`` freezes an example at its first success.

The loop runs as ``lax.fori_loop`` or unrolled (``loop``, see ``robust_jax.attacks._core.choose_loop``). Step ``i``
uses the key ``fold_in(key, i)``. Restarts are a ``vmap`` over keys (:func:`best_of`) or a sequential scan
(:func:`first_success`; both apply one selection rule, :func:`keep_first_success`), eps sweeps a ``vmap`` over
budgets (in the attacks). Nothing here knows about models: EOT lives in the ``value_fn``
(``robust_jax.attacks._core.loss_and_logits``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from robust_jax.attacks._core import iterate

KEEP = ("last", "best")


class Evaluation(NamedTuple):
    value: jax.Array  # (N,) objective to ascend, or (N, K): K objectives, column 0 the main one
    success: jax.Array  # (N,) bool
    score: jax.Array | None = None  # (N,) keep-best score (default: the objective)


class Result(NamedTuple):
    x: jax.Array  # the returned points (pixels)
    success: jax.Array | None  # (N,) success at the returned points (None for keep="last" unless evaluate_last)
    score: jax.Array | None  # (N,) their score


def bcast(mask, like):
    """Reshape a per-example vector to broadcast against a batch ``like`` (N, ...)."""
    return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))


def flat_norm(v, keepdims: bool = True):
    """Per-example L2 norm of a batch."""
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=keepdims))


# ------------------------------------------------------------------------------------------ steps (optax-style)
def sign_ascent(step_size) -> optax.GradientTransformationExtraArgs:
    """Linf steepest ascent: ``v ← v + step_size · sign(∇value)`` (given the descent direction ``−∇value``)."""
    return optax.with_extra_args_support(optax.chain(optax.scale_by_sign(), optax.scale(-step_size)))


def normalise_per_example() -> optax.GradientTransformation:
    """Divide each example's update by its L2 norm (floored at 1e-12)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: u / jnp.maximum(flat_norm(u), 1e-12), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def l2_ascent(step_size) -> optax.GradientTransformationExtraArgs:
    """L2 steepest ascent: ``v ← v + step_size · ∇value / ‖∇value‖₂`` per example."""
    return optax.with_extra_args_support(optax.chain(normalise_per_example(), optax.scale(-step_size)))


def step_for(norm: str, step_size) -> optax.GradientTransformationExtraArgs:
    if norm == "linf":
        return sign_ascent(step_size)
    if norm == "l2":
        return l2_ascent(step_size)
    raise ValueError(f"unknown norm {norm!r}; use linf or l2")


# ----------------------------------------------------------------------------------------------- projections
def project(x_adv, x, eps, norm: str):
    """Project x_adv onto the eps-ball around x (exact for both norms), then onto the [0, 1] box."""
    delta = x_adv - x
    if norm == "linf":
        delta = jnp.clip(delta, -eps, eps)
    elif norm == "l2":
        delta = delta * jnp.minimum(1.0, eps / jnp.maximum(flat_norm(delta), 1e-12))
    else:
        raise ValueError(f"unknown norm {norm!r}; use linf or l2")
    return jnp.clip(x + delta, 0.0, 1.0)


def random_start(key, x, eps, norm: str):
    """A uniform point of the eps-ball, clipped to the box (Linf: uniform per coordinate; L2: uniform in the ball)."""
    if norm == "linf":
        delta = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps
    elif norm == "l2":
        k1, k2 = jax.random.split(key)
        direction = jax.random.normal(k1, x.shape, x.dtype)
        direction = direction / jnp.maximum(flat_norm(direction), 1e-12)
        radius = jax.random.uniform(k2, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype) ** (1.0 / x[0].size)
        delta = direction * radius * eps
    else:
        raise ValueError(f"unknown norm {norm!r}; use linf or l2")
    return jnp.clip(x + delta, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------- the loop
def _value_and_grads(value_fn, decode, v, key):
    """Evaluation at decode(v) and the gradient(s) of its value column(s) w.r.t. v: (K, *v.shape) or v.shape."""

    def f(u):
        ev = value_fn(decode(u), key)
        return ev.value, ev

    value, vjp, ev = jax.vjp(f, v, has_aux=True)
    if value.ndim == 1:
        (g,) = vjp(jnp.ones_like(value))
    else:
        eye = jnp.eye(value.shape[1], dtype=value.dtype)
        g = jax.vmap(lambda e: vjp(jnp.broadcast_to(e, value.shape))[0])(eye)
    return ev, g


def _main(value):
    return value if value.ndim == 1 else value[:, 0]


def _better(ok, score, best_ok, best_score):
    """Per example: does (ok, score) beat the best so far? Success first, then a higher score."""
    return (ok & ~best_ok) | ((ok == best_ok) & (score > best_score))


def run(
    value_fn: Callable,
    v0,
    *,
    key,
    steps: int,
    optimizer: optax.GradientTransformation,
    project: Callable = lambda v: v,
    decode: Callable = lambda v: v,
    keep: str = "last",
    early_stop: bool = False,
    use_grad: bool = True,
    loop: str = "auto",
    record: Sequence[int] = (),
    evaluate_last: bool = False,
):
    """Ascend ``value_fn`` from ``v0`` for `steps` steps (see the module docstring). Returns a :class:`Result`, or
    with `record` (step counts) a dict ``{k: Result after k steps}`` from one trajectory (``0`` = the start); the
    entry for `steps` is always included. ``use_grad=False`` skips the backward pass (score-based steps: the
    optimizer gets zeros and uses its ``objective`` argument). ``evaluate_last``: with ``keep="last"``, also
    evaluate success and score at the final point (one more forward pass)."""
    if keep not in KEEP:
        raise ValueError(f"unknown keep {keep!r}; use one of {KEEP}")
    if steps < 0:
        raise ValueError(f"need steps >= 0, got {steps}")
    optimizer = optax.with_extra_args_support(optimizer)
    n = jax.tree.leaves(v0)[0].shape[0]
    best = keep == "best"

    def evaluate(v, k):
        ev = value_fn(decode(v), k)
        return ev, _main(ev.value) if ev.score is None else ev.score

    def body(i, c):
        k = jax.random.fold_in(key, i)
        if use_grad:
            ev, g = _value_and_grads(value_fn, decode, c["v"], k)
            descent = jax.tree.map(jnp.negative, g)
        else:
            ev = value_fn(decode(c["v"]), k)
            descent = jax.tree.map(jnp.zeros_like, c["v"])
        score = _main(ev.value) if ev.score is None else ev.score
        c = dict(c)
        if best:
            take = _better(ev.success, score, c["best_ok"], c["best_score"])
            if early_stop:
                take = take & c["active"]
            c["best_x"] = jnp.where(bcast(take, c["best_x"]), decode(c["v"]), c["best_x"])
            c["best_ok"] = c["best_ok"] | ev.success
            c["best_score"] = jnp.where(take, score, c["best_score"])
        updates, c["opt"] = optimizer.update(
            descent, c["opt"], c["v"], value=ev.value, success=ev.success, key=k, step=i,
            objective=lambda u: value_fn(decode(u), k))
        v_new = project(optax.apply_updates(c["v"], updates))
        if early_stop:
            c["active"] = c["active"] & ~ev.success
            v_new = jax.tree.map(lambda a, b: jnp.where(bcast(c["active"], a), a, b), v_new, c["v"])
        c["v"] = v_new
        return c

    carry = {"v": v0, "opt": optimizer.init(v0)}
    if best:
        x0 = decode(v0)
        carry.update(best_x=x0, best_ok=jnp.zeros(n, bool), best_score=jnp.full(n, -jnp.inf, x0.dtype))
    if early_stop:
        carry["active"] = jnp.ones(n, bool)

    def result(c, i):
        if best:  # the current point has not been evaluated yet: do it now
            ev, score = evaluate(c["v"], jax.random.fold_in(key, i))
            take = _better(ev.success, score, c["best_ok"], c["best_score"])
            if early_stop:
                take = take & c["active"]
            x = jnp.where(bcast(take, c["best_x"]), decode(c["v"]), c["best_x"])
            return Result(x, c["best_ok"] | ev.success, jnp.where(take, score, c["best_score"]))
        if evaluate_last:
            ev, score = evaluate(c["v"], jax.random.fold_in(key, i))
            return Result(decode(c["v"]), ev.success, score)
        return Result(decode(c["v"]), None, None)

    points = sorted({int(s) for s in record} | {int(steps)})
    if points[0] < 0 or points[-1] > steps:
        raise ValueError(f"record points must be in [0, {steps}], got {sorted(record)}")
    out, done = {}, 0
    for p in points:
        carry = iterate(body, carry, p - done, loop, start=done) if p > done else carry
        done = p
        out[p] = jax.tree.map(jax.lax.stop_gradient, result(carry, p))
    return out if record else out[steps]


def keep_first_success(best: Result, new: Result) -> Result:
    """The selection rule over runs (restarts, target classes), for one pair: per example keep `best` if it
    succeeded, else take `new` if it succeeded or has a strictly higher score (ties keep the earlier run)."""
    score = new.score.astype(best.score.dtype)
    take = ~best.success & (new.success | (score > best.score))
    pick = lambda a, b: jnp.where(bcast(take, a), a, b)
    return Result(pick(new.x, best.x), best.success | new.success, pick(score, best.score))


def first_success(run: Callable, n_runs: int, init: Result | None = None) -> Result:
    """Per example, the first successful of the runs ``run(r) -> Result`` (r = 0 .. n_runs−1), else the one with
    the highest score (:func:`keep_first_success` folded over the runs in order). Sequential (``lax.scan``: one
    run's memory, compiled once). `init` is the result before any run (e.g. the clean batch with score ``−inf``,
    kept where no run has a finite score); by default the first run. A single run is returned as it is (`init`
    unused), as the reference does with one restart."""
    if n_runs < 1:
        raise ValueError(f"need n_runs >= 1, got {n_runs}")
    if init is None or n_runs == 1:
        init, first = run(0), 1
    else:
        first = 0
    if first == n_runs:
        return init
    step = lambda best, r: (keep_first_success(best, run(r)), None)
    return jax.lax.scan(step, init, jnp.arange(first, n_runs))[0]


def best_of(results: Result) -> Result:
    """:func:`first_success` over a leading restart axis (R, N, ...) of results computed together (a ``vmap`` over
    keys): per example the first successful restart, else the one with the highest score. Needs success and score
    (``keep="best"`` or ``evaluate_last=True``)."""
    return first_success(lambda r: jax.tree.map(lambda a: a[r], results), results.x.shape[0])
