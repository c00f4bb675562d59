"""Jacobian-based Saliency Map Attack (JSMA; Papernot et al. 2016), the pairwise variant, batched and jit-able."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from robust_jax.attacks import engine
from robust_jax.attacks._core import _concrete, check_inputs
from robust_jax.models import logits_of

# Pair scores are computed in row blocks of at most this many float32 elements (N * rows * d), bounding memory.
_PAIR_BLOCK_ELEMENTS = 1 << 24


def best_pair(a, b, mask, sign):
    """The pair p < q in the search space maximising the pair saliency map, for every example.

    ``alpha = a_p + a_q`` and ``beta = b_p + b_q`` (``a``: derivative of the target output, ``b``: of the sum of
    the other outputs; both (N, d)); ``mask`` (N, d) is the search space. Admissible pairs have ``sign·alpha > 0``
    and ``sign·beta < 0`` (``sign`` = +1 to increase features, −1 to decrease them); their saliency is
    ``−alpha·beta`` (= ``|alpha|·|beta|``). Returns ``(p, q, found)``, each (N,); ``found`` is False when no pair is
    admissible (then p, q are meaningless). Exact search over all d(d−1)/2 pairs: the best partner of every p is
    found in row blocks (at most ``_PAIR_BLOCK_ELEMENTS`` scores alive at once), then the best row is recomputed.
    """
    n, d = a.shape
    # Work with u = sign·a (must sum > 0) and v = −sign·b (must sum > 0); features outside the search space get
    # u = −inf, so every pair touching them has alpha = −inf. The score relu(alpha)·relu(beta') is the saliency
    # −alpha·beta on admissible pairs and 0 elsewhere (admissible pairs score > 0).
    u = jnp.where(mask, sign * a, -jnp.inf)
    v = jnp.where(mask, -sign * b, 0.0)
    idx = jnp.arange(d)

    def scores(u_p, v_p, p):  # (N, R), (N, R), (N or 1, R) -> (N, R, d): scores of the pairs (p, q) for all q
        alpha = jnp.maximum(u_p[:, :, None] + u[:, None, :], 0.0)
        beta = jnp.maximum(v_p[:, :, None] + v[:, None, :], 0.0)
        return jnp.where(p[:, :, None] < idx, alpha * beta, 0.0)

    rows = max(1, min(d, _PAIR_BLOCK_ELEMENTS // max(1, n * d)))
    blocks = -(-d // rows)
    pad = blocks * rows - d

    def split(w, fill):  # (N, d) -> (blocks, N, rows)
        w = jnp.pad(w, ((0, 0), (0, pad)), constant_values=fill)
        return jnp.moveaxis(w.reshape(n, blocks, rows), 1, 0)

    if blocks == 1:
        row_best = jnp.max(scores(u, v, idx[None]), axis=-1)  # (N, d): best score of a pair starting at p
    else:
        p_rows = jnp.pad(idx, (0, pad), constant_values=d).reshape(blocks, 1, rows)
        row_best = jax.lax.map(lambda args: jnp.max(scores(*args), axis=-1),
                               (split(u, -jnp.inf), split(v, 0.0), p_rows))
        row_best = jnp.moveaxis(row_best, 0, 1).reshape(n, -1)[:, :d]
    p = jnp.argmax(row_best, axis=-1)
    found = jnp.max(row_best, axis=-1) > 0.0
    take = lambda w: jnp.take_along_axis(w, p[:, None], axis=-1)  # (N, 1)
    q = jnp.argmax(scores(take(u), take(v), p[:, None])[:, 0], axis=-1)
    return p, q, found


def _best_pair_among(a, b, mask, sign, candidates: int):
    """:func:`best_pair` restricted to the `candidates` searchable features with the largest ``sign·(a − b)``."""
    rank = jnp.where(mask, sign * (a - b), -jnp.inf)
    _, cand = jax.lax.top_k(rank, candidates)  # (N, k)
    take = lambda v: jnp.take_along_axis(v, cand, axis=-1)
    i, j, found = best_pair(take(a), take(b), take(mask), sign)
    pick = lambda k: jnp.take_along_axis(cand, k[:, None], axis=-1)[:, 0]
    return pick(i), pick(j), found


def saliency_step(theta, sign, candidates: int | None, movable) -> optax.GradientTransformationExtraArgs:
    """JSMA's step as an optax-style transform on flattened pixels (N, d): from the forward derivatives, pick the
    most salient admissible pair per example and move both features by `theta` (clipped to [0, 1]); the state is the
    search space, from which saturated features drop out. Examples with no admissible pair do not move."""

    def init(v):
        return movable(v)

    def update(descent, space, v, **_):
        g = -descent  # ascent directions: (N, d) for F_t alone, (2, N, d) for (F_t, sum of the others)
        if g.ndim == 2:
            a, b = g, -g  # softmax outputs sum to one: d(sum of the others) = -dF_t
        else:
            a, b = g[0], g[1]
        if candidates is None:
            p, q, found = best_pair(a, b, space, sign)
        else:
            p, q, found = _best_pair_among(a, b, space, sign, candidates)
        idx = jnp.arange(v.shape[1])[None, :]
        change = ((idx == p[:, None]) | (idx == q[:, None])) & found[:, None]
        updates = jnp.where(change, jnp.clip(v + theta, 0.0, 1.0) - v, 0.0)
        return updates, space & movable(v + updates)

    return optax.GradientTransformationExtraArgs(init, update)


def jsma(
    logits_fn: Callable,
    x,
    y,
    *,
    key,
    targeted: bool = True,
    theta: float = 1.0,
    gamma: float = 0.1,
    use_logits: bool = False,
    candidates: int | None = None,
    loop: str = "auto",
    validate: bool = True,
):
    """Targeted Jacobian-based Saliency Map Attack on feature pairs (Papernot, McDaniel, Jha, Fredrikson, Celik,
    Swami 2016, "The Limitations of Deep Learning in Adversarial Settings", EuroS&P; Algorithms 2-3). `y` holds the
    target classes (``targeted=True``, the only mode: JSMA is a targeted attack). `key` is required for a uniform
    signature and unused (JSMA is deterministic).

    Each iteration (a step of the attack engine), for every example not yet classified as its target t:

    1. compute the forward derivatives ``a = ∂F_t/∂x`` and ``b = ∂(Σ_{j≠t} F_j)/∂x``, where F is the softmax
       probabilities (``use_logits=False``, the default: JSMA-F, the variant of the paper's experiments; there
       ``b = −a`` because the probabilities sum to one, so the map reduces to ``alpha²`` over pairs with
       ``alpha > 0``) or the logits (``use_logits=True``, JSMA-Z in Carlini & Wagner 2017; two VJPs per step);
    2. over all pairs ``p < q`` of the search space, take ``alpha = a_p + a_q``, ``beta = b_p + b_q`` and pick the pair
       maximising ``−alpha·beta`` subject to ``alpha > 0, beta < 0`` (``theta > 0``, increasing features) or
       ``alpha < 0, beta > 0`` (``theta < 0``, decreasing features);
    3. add `theta` to both features, clip to [0, 1], and drop saturated features (at 1 when increasing, at 0 when
       decreasing) from the search space.

    The search space starts as every feature (each channel of each pixel) that can still move in the direction of
    `theta`; with ``|theta| = 1`` (the paper's MNIST setting) a chosen feature saturates at once, as in the paper.
    There are ``floor(gamma · d / 2)`` iterations (d = H·W·C), so at most a fraction `gamma` of the features changes.
    Examples that reach the target (including those classified as it from the start) stop changing; an example with
    no admissible pair left keeps its current value.

    Cost: the exact pair search is O(N·d²) per iteration, evaluated in row blocks so that at most 2^24 scores are in
    memory at once. ``candidates=k`` restricts the search to the k features with the largest ``sign(theta)·(a − b)``
    (an approximation: O(N·k²) per iteration). Returns the adversarial images, in [0, 1]; :func:`success` (with
    ``targeted=True``) tells which reached the target.
    """
    if not targeted:
        raise ValueError("jsma is a targeted attack: pass targeted=True with y holding the target classes "
                         "(e.g. robust_jax.evaluate.random_targets)")
    check_inputs(x, y, name="jsma", validate=validate)
    if _concrete(theta) and float(theta) == 0.0:
        raise ValueError("jsma: theta must be non-zero (> 0 increases features, < 0 decreases them)")
    if not 0.0 < float(gamma) <= 1.0:
        raise ValueError(f"jsma: gamma (max fraction of features changed) must be in (0, 1], got {gamma}")
    n, d = x.shape[0], x[0].size
    if candidates is not None and not 2 <= candidates <= d:
        raise ValueError(f"jsma: candidates must be in [2, {d}] (or None for the exact search), got {candidates}")
    steps = int(gamma * d / 2)
    sign = jnp.sign(jnp.asarray(theta, jnp.float32))

    def movable(v):  # features that can still move in the direction of theta
        return jnp.where(sign > 0, v < 1.0, v > 0.0)

    def value_fn(z, k):
        logits = logits_of(logits_fn(z))
        out = logits if use_logits else jax.nn.softmax(logits, axis=-1)
        onehot = jax.nn.one_hot(y, out.shape[-1], dtype=out.dtype)
        f_t = jnp.sum(out * onehot, axis=-1)
        value = jnp.stack([f_t, jnp.sum(out * (1.0 - onehot), axis=-1)], axis=1) if use_logits else f_t
        return engine.Evaluation(value, jnp.argmax(logits, axis=-1) == y)

    res = engine.run(value_fn, x.reshape(n, d), key=key, steps=steps,
                     optimizer=saliency_step(theta, sign, candidates, movable), decode=lambda v: v.reshape(x.shape),
                     keep="last", early_stop=True, loop=loop)
    return res.x
