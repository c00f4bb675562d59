"""Square Attack (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020): score-based random search, Linf and L2, on
the attack engine without gradients (``use_grad=False``).

Each query changes the current best perturbation on a random square window of side ``s`` (all channels) and keeps
the candidate if the margin loss ``z_y − max_{j≠y} z_j`` decreased (or the point became misclassified):

- Linf: the window is set to ``±ε`` per channel (a random sign per channel), then projected on the ball and the box;
  the start is vertical stripes of ``±ε`` (a random sign per column and channel).
- L2: the window receives a "+/−" pair of nested-rectangle patterns (``_eta``) with a random sign per channel and
  random orientation, mixed with the window's old content, while a second random window is zeroed and its mass moved
  into the first; the whole perturbation is then rescaled to norm ε (and clipped to the box). The start is a 5 × 5
  grid of such patterns.

The window side follows ``s = round(sqrt(p·h·w))`` (at least 1 for Linf; at least 3 and odd for L2) with the
reference's piecewise-constant schedule ``p = p_init / 2^k``, halving after query 10, 50, 200, 500, 1000, 2000, 4000,
6000 and 8000 (``rescale_schedule=True`` stretches it to ``n_queries`` as if it were 10 000; AutoAttack does not).
Defaults are AutoAttack's: ``n_queries = 5000``, ``p_init = 0.8``, margin loss, one restart. One query per
iteration plus the start, each a forward pass; an example stops (is frozen) at its first success.

On the engine the iterate *is* the candidate: its evaluation is the query, the optimizer (:func:`square_step`) keeps
the best point in its state and proposes the next candidate, and ``keep="best"`` with ``early_stop=True`` returns the
first successful candidate, else the one with the lowest margin. (Passing the candidate through the step's
``objective`` instead would make the engine also re-evaluate the unchanged best point every step: two forward
passes per query instead of one.) Windows, signs and orientations are drawn per example (the reference shares one
window across the batch), from ``fold_in(key, indices[i])`` and the step, so results do not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from robust_jax.attacks import engine
from robust_jax.attacks._core import cross_entropy, cw_margin, is_success
from robust_jax.attacks.apgd import example_keys, fold_keys, validate_common
from robust_jax.attacks.engine import bcast, flat_norm, project
from robust_jax.models import logits_of

__all__ = ["p_schedule", "square", "square_step", "window_sizes"]

P_BOUNDARIES = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # p halves after each of these iterations
LOSSES = ("margin", "ce")


def p_schedule(i, n_queries: int = 5000, p_init: float = 0.8, rescale: bool = False):
    """The fraction p of pixels changed at iteration `i` (0-based): ``p_init / 2^k`` with k the number of
    :data:`P_BOUNDARIES` strictly below ``i`` (rescaled to 10 000 queries if `rescale`). Works on ints and traced
    arrays."""
    level = _level(i, n_queries, rescale)
    return p_init / 2.0 ** level


def _level(i, n_queries, rescale):
    if isinstance(i, (int, np.integer)):
        it = int(i / n_queries * 10000) if rescale else int(i)
        return sum(it > b for b in P_BOUNDARIES)
    it = (i.astype(jnp.float32) / n_queries * 10000).astype(jnp.int32) if rescale else i
    return jnp.searchsorted(jnp.asarray(P_BOUNDARIES), it, side="left")


def window_sizes(p_init: float, h: int, w: int, norm: str) -> np.ndarray:
    """Window side per schedule level (``len(P_BOUNDARIES) + 1`` levels), capped at the image size."""
    out = []
    for k in range(len(P_BOUNDARIES) + 1):
        s = int(round(float(np.sqrt(p_init / 2.0**k * h * w))))
        if norm == "linf":
            s = max(s, 1)
        else:
            s = max(s, 3)
            s += 1 - s % 2
        out.append(min(s, h, w))
    return np.asarray(out, np.int32)


# ------------------------------------------------------------------------------------------- L2 patterns
def _eta(i, j, s, size: int):
    """The L2 update pattern of side `s` at in-window coordinates (i, j) (integer arrays that broadcast together;
    0 outside the s × s window): nested rectangles on the top ``s // 2`` rows minus nested rectangles on the other
    rows, each half of norm 1/√2 (the whole of norm 1); +1 for s = 1.

    In a half of a × s cells centred at (a // 2, s // 2), ring k (side 2k + 1) adds 1/(k+1)² for k up to
    ``K = s // 2``, so a cell at Chebyshev distance d from the centre holds ``ring[d] = Σ_{k=d..K} 1/(k+1)²``.
    Computed on the index grids directly (`s` may be traced; `size`: a static bound on it): no loop over rings,
    blocks or cells, so the graph does not grow with the window or the image."""
    big_k = s // 2
    k = jnp.arange(size // 2 + 1)
    ring = jnp.cumsum(jnp.where(k <= big_k, 1.0 / (k + 1.0) ** 2, 0.0)[::-1])[::-1]  # smallest terms first

    def half_norm(a):  # of the a × s half: ring[d]² times the number of its cells at distance d
        within = ((jnp.minimum(a // 2, k) + jnp.minimum(a - 1 - a // 2, k) + 1)
                  * (jnp.minimum(big_k, k) + jnp.minimum(s - 1 - big_k, k) + 1))  # cells at distance <= k
        count = jnp.diff(within, prepend=0)
        return jnp.sqrt(jnp.sum(count * ring**2))

    top = i < big_k
    a = jnp.where(top, big_k, s - big_k)  # rows of the half the cell is in
    d = jnp.maximum(jnp.abs(jnp.where(top, i, i - big_k) - a // 2), jnp.abs(j - big_k))
    value = ring[jnp.clip(d, 0, big_k)]
    halves = jnp.where(top, value / jnp.maximum(half_norm(big_k), 1e-30), -value / half_norm(s - big_k)) / jnp.sqrt(2.0)
    inside = (i >= 0) & (i < s) & (j >= 0) & (j < s)
    return jnp.where(inside, jnp.where(s > 1, halves, value), 0.0)


def _pattern(r, c, s, flip, h: int, w: int, size: int):
    """(N, h, w): per example the pattern of side s with top-left corner (r, c), transposed where `flip`."""
    rows = jnp.arange(h)[None, :, None] - r[:, None, None]
    cols = jnp.arange(w)[None, None, :] - c[:, None, None]
    flip = flip[:, None, None]
    return _eta(jnp.where(flip, cols, rows), jnp.where(flip, rows, cols), s, size)


def _window(r, c, s, h: int, w: int):
    """(N, h, w) bool masks of the s × s windows with top-left corners (r, c) (each (N,)), s a scalar."""
    rows = jnp.arange(h)[None, :]
    cols = jnp.arange(w)[None, :]
    in_r = (rows >= r[:, None]) & (rows < r[:, None] + s)
    in_c = (cols >= c[:, None]) & (cols < c[:, None] + s)
    return in_r[:, :, None] & in_c[:, None, :]


def _corner(key, s, size: int):
    """Random top-left coordinate in [0, size − s) (0 when s == size), as the reference draws it."""
    return jnp.floor(jax.random.uniform(key) * (size - s)).astype(jnp.int32)


def _signs(key, shape):
    return jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0)


# ------------------------------------------------------------------------------------------------- the step
class SquareState(NamedTuple):
    x_best: jax.Array
    best: jax.Array  # (N,) best objective (the negated margin loss: ascended)


def _init_linf(keys, x, eps):
    n, h, w, c = x.shape
    stripes = jax.vmap(lambda k: _signs(k, (1, w, c)))(keys)  # (N, 1, w, c): one sign per column and channel
    return jnp.clip(x + eps * stripes, 0.0, 1.0)


def _init_l2(keys, x, eps):
    n, h, w, c = x.shape
    s = max(h // 5, 1)
    first = (h - 5 * s) // 2
    nr, nc = min(h // s, (h - first) // s), min(w // s, (w - first) // s)
    if nr < 1 or nc < 1:  # no block fits
        return x
    k_sign, k_flip = fold_keys(keys, 0), fold_keys(keys, 1)
    signs = jax.vmap(lambda k: _signs(k, (nr, nc, c)))(k_sign)
    flips = jax.vmap(lambda k: jax.random.bernoulli(k, 0.5, (nr, nc)))(k_flip)
    # per pixel: its block (i, j) of the nr × nc grid of s × s blocks starting at (first, first), and its place in it
    bi, ri = jnp.divmod(jnp.arange(h) - first, s)
    bj, rj = jnp.divmod(jnp.arange(w) - first, s)
    on = ((bi >= 0) & (bi < nr))[:, None] & ((bj >= 0) & (bj < nc))[None, :]  # (h, w)
    bi, bj = jnp.clip(bi, 0, nr - 1)[:, None], jnp.clip(bj, 0, nc - 1)[None, :]
    flip = flips[:, bi, bj]  # (N, h, w)
    ri, rj = ri[None, :, None], rj[None, None, :]
    e = _eta(jnp.where(flip, rj, ri), jnp.where(flip, ri, rj), s, s)
    delta = jnp.where(on[None, :, :, None], e[..., None] * signs[:, bi, bj, :], 0.0).astype(x.dtype)
    return jnp.clip(x + eps * delta / (flat_norm(delta) + 1e-12), 0.0, 1.0)


def square_step(x, eps, norm: str, keys, *, n_queries: int = 5000, p_init: float = 0.8,
                rescale_schedule: bool = False) -> optax.GradientTransformationExtraArgs:
    """Square's random search as an optax-style transform (see the module docstring): it receives ``value`` (the
    objective to ascend) and ``success`` at the current candidate, updates the best point and returns the step to
    the next candidate. `keys`: one PRNG key per example; `x`: the clean batch."""
    n, h, w, c = x.shape
    sizes = window_sizes(p_init, h, w, norm)

    def init(v):
        return SquareState(v, jnp.full((n,), -jnp.inf, jnp.float32))

    def candidate_linf(x_best, ks, s):
        r = jax.vmap(lambda k: _corner(jax.random.fold_in(k, 0), s, h))(ks)
        q = jax.vmap(lambda k: _corner(jax.random.fold_in(k, 1), s, w))(ks)
        sign = jax.vmap(lambda k: _signs(jax.random.fold_in(k, 2), (c,)))(ks)  # (N, c)
        mask = _window(r, q, s, h, w)[..., None]
        return project(x_best + mask * (2.0 * eps) * sign[:, None, None, :], x, eps, "linf")

    def candidate_l2(x_best, ks, s):
        draw = lambda i, size: jax.vmap(lambda k: _corner(jax.random.fold_in(k, i), s, size))(ks)
        r1, c1, r2, c2 = draw(0, h), draw(1, w), draw(3, h), draw(4, w)
        sign = jax.vmap(lambda k: _signs(jax.random.fold_in(k, 2), (c,)))(ks)  # (N, c)
        flip = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 5), 0.5))(ks)
        m1, m2 = _window(r1, c1, s, h, w)[..., None], _window(r2, c2, s, h, w)[..., None]
        delta = x_best - x
        sq = lambda a: jnp.sum(jnp.square(a), axis=(1, 2))  # per example and channel: (N, c)
        budget = jnp.maximum(eps**2 - jnp.sum(jnp.square(delta), axis=(1, 2, 3)), 0.0) / c
        union = jnp.sum(jnp.square(jnp.where(m1 | m2, delta, 0.0)), axis=(1, 2, 3))
        old = jnp.where(m1, delta, 0.0)
        old = old / (jnp.sqrt(sq(old))[:, None, None, :] + 1e-12)
        pattern = _pattern(r1, c1, s, flip, h, w, int(sizes.max()))  # (N, h, w)
        new = pattern[..., None] * sign[:, None, None, :] + old
        new = new / (jnp.sqrt(sq(new))[:, None, None, :] + 1e-12) * jnp.sqrt(budget + union)[:, None, None, None]
        delta = jnp.where(m1, new, jnp.where(m2, 0.0, delta))
        return jnp.clip(x + eps * delta / (flat_norm(delta) + 1e-12), 0.0, 1.0)

    def update(descent, st: SquareState, v, *, value, success, step, **_):
        del descent
        better = success | (value > st.best)
        x_best = jnp.where(bcast(better, v), v, st.x_best)
        best = jnp.where(better, value.astype(jnp.float32), st.best)
        level = _level(step, n_queries, rescale_schedule)
        s = jnp.asarray(sizes)[level]
        ks = fold_keys(fold_keys(keys, 2), step)
        nxt = (candidate_linf if norm == "linf" else candidate_l2)(x_best, ks, s)
        return nxt - v, SquareState(x_best, best)

    return optax.GradientTransformationExtraArgs(init, update)


def square(logits_fn: Callable, x, y, *, key, eps, norm: str = "linf", n_queries: int = 5000, p_init: float = 0.8,
           loss: str = "margin", rescale_schedule: bool = False, indices=None, loop: str = "auto",
           validate: bool = True):
    """Untargeted Square Attack (see the module docstring) in the Linf or L2 ball of radius `eps`: `n_queries`
    random-search iterations after the start (``n_queries + 1`` forward passes per example at most; examples stop
    at their first success). `loss`: ``"margin"`` (AutoAttack's) or ``"ce"`` (candidates are kept when the
    cross-entropy rises). Returns the first misclassified candidate, else the best one. Score-based: needs only
    ``logits_fn(x)`` (an :class:`EOT` is queried through its prediction). `indices`: per-example key indices."""
    validate_common("square", x, y, eps, norm, max(n_queries, 1), 1, validate)
    if loss not in LOSSES:
        raise ValueError(f"square: unknown loss {loss!r}; use one of {LOSSES}")
    if not 0.0 < float(p_init) <= 1.0:
        raise ValueError(f"square: p_init must be in (0, 1], got {p_init}")
    keys = example_keys(key, x.shape[0], indices)
    loss_fn = cw_margin if loss == "margin" else cross_entropy
    x0 = (_init_linf if norm == "linf" else _init_l2)(fold_keys(keys, 1), x, eps)

    def value_fn(z, k):
        logits = logits_of(logits_fn(z))
        return engine.Evaluation(loss_fn(logits, y), is_success(logits, y))

    step = square_step(x, eps, norm, keys, n_queries=n_queries, p_init=p_init, rescale_schedule=rescale_schedule)
    return engine.run(value_fn, x0, key=jax.random.split(key)[1], steps=n_queries, optimizer=step, keep="best",
                      early_stop=True, use_grad=False, loop=loop).x
