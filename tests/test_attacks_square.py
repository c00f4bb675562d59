"""Square's L2 patterns (Andriushchenko et al. 2020): the start and every candidate against a plain reference
construction of the nested-rectangle pattern, and the traced graph's size against the image size."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_jax import attacks
from robust_jax.attacks.apgd import example_keys, fold_keys

square_mod = importlib.import_module("robust_jax.attacks.square")

KEY = jax.random.PRNGKey(0)


# ----------------------------------------------------- the reference: the pattern built ring by ring, in float64
def _rectangles_ref(a, b):
    """An a × b block of nested rectangles centred at (a // 2, b // 2): ring k (side 2k + 1) adds 1/(k+1)²."""
    out = np.zeros((a, b))
    ca, cb = a // 2, b // 2
    for k in range(max(ca, cb) + 1):
        out[max(ca - k, 0):min(ca + k + 1, a), max(cb - k, 0):min(cb + k + 1, b)] += 1.0 / (k + 1) ** 2
    return out / np.sqrt(np.sum(out**2))


def _eta_ref(s):
    """Nested rectangles on the top s // 2 rows minus nested rectangles on the others, unit norm; 1 for s = 1."""
    if s == 1:
        return np.ones((1, 1))
    out = np.concatenate([_rectangles_ref(s // 2, s), -_rectangles_ref(s - s // 2, s)], axis=0)
    return out / np.sqrt(np.sum(out**2))


def _init_l2_ref(keys, x, eps):
    """The L2 start block by block: a grid of ±η_s (or its transpose) of side s = h // 5, centred by `first`."""
    n, h, w, c = x.shape
    s = max(h // 5, 1)
    first = (h - 5 * s) // 2
    nr, nc = min(h // s, (h - first) // s), min(w // s, (w - first) // s)
    signs = np.asarray(jax.vmap(lambda k: square_mod._signs(k, (nr, nc, c)))(fold_keys(keys, 0)))
    flips = np.asarray(jax.vmap(lambda k: jax.random.bernoulli(k, 0.5, (nr, nc)))(fold_keys(keys, 1)))
    e = _eta_ref(s)
    delta = np.zeros(x.shape)
    for i in range(nr):
        for j in range(nc):
            r0, c0 = first + i * s, first + j * s
            for m in range(n):
                block = e.T if flips[m, i, j] else e
                # a negative r0 (images under 5 pixels) is a Python slice from the end: empty, as it always was
                delta[m, r0:r0 + s, c0:c0 + s, :] += block[:, :, None] * signs[m, i, j]
    norm = np.sqrt(np.sum(delta**2, axis=(1, 2, 3), keepdims=True))
    return np.clip(np.asarray(x) + eps * delta / (norm + 1e-12), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------- tests
def test_l2_pattern_is_the_reference_for_every_side():
    """Every side from 1 to 45, odd and even, traced, on a grid reaching past the window (a static side: the
    start's, below)."""
    grid = np.arange(-2, 48)
    eta = jax.jit(lambda s: square_mod._eta(grid[:, None], grid[None, :], s, 45))
    for s in range(1, 46):
        want = np.zeros((len(grid), len(grid)))
        want[2:2 + s, 2:2 + s] = _eta_ref(s)
        np.testing.assert_allclose(eta(s), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(4, 4), (8, 8), (12, 12), (32, 32), (37, 29)])
def test_l2_start_matches_the_reference(shape):
    """Window sides 1 (images under 10 pixels: up to 7 × 7 blocks; under 5 the first block falls off the image),
    2, 6 and 7 (a non-square image)."""
    x = jnp.asarray(np.random.default_rng(0).uniform(0.2, 0.8, size=(3, *shape, 3)), jnp.float32)
    keys = example_keys(KEY, 3)
    got = jax.jit(square_mod._init_l2)(keys, x, 0.5)
    np.testing.assert_allclose(got, _init_l2_ref(keys, x, 0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(16, 16), (4, 4), (12, 20)])
def test_l2_candidates_from_the_clean_point_are_the_reference_pattern(shape):
    """From the clean point (nothing to mix in), a candidate is ε·(±η_s or ±η_sᵀ)/√c per channel on one s × s
    window and 0 elsewhere, with s the schedule's side at the step: 15, 11, 7, 5, 3 on 16 × 16; even sides capped
    at the image: 4 on 4 × 4, 12 on 12 × 20."""
    n, c, eps = 4, 3, 0.5
    x = jnp.full((n, *shape, c), 0.5, jnp.float32)  # the box stays inactive: |pattern| < 1 / √2
    keys = example_keys(KEY, n)
    t = square_mod.square_step(x, eps, "l2", keys)
    candidate = jax.jit(lambda i: t.update(jnp.zeros_like(x), t.init(x), x, value=jnp.zeros(n),
                                           success=jnp.zeros(n, bool), step=i)[0])
    sizes = square_mod.window_sizes(0.8, *shape, "l2")
    for step in (0, 11, 51, 201, 501, 1001, 2001):
        s = int(sizes[square_mod._level(step, 5000, False)])
        delta = np.asarray(candidate(jnp.asarray(step, jnp.int32))) * np.sqrt(c) / eps
        for m in range(n):
            rows, cols = np.nonzero(np.any(delta[m] != 0, axis=-1))
            r, q = rows.min(), cols.min()
            assert rows.max() - r == cols.max() - q == s - 1, (step, m)
            window = delta[m, r:r + s, q:q + s]
            assert np.count_nonzero(delta[m]) == window.size  # nothing outside the window
            e = _eta_ref(s)
            for ch in range(c):
                assert any(np.allclose(window[..., ch], sign * pattern, rtol=1e-5, atol=1e-6)
                           for sign in (1, -1) for pattern in (e, e.T)), (step, m, ch)


def _graph_size(hw, n_queries=3):
    """(equations, constant elements) of the traced L2 attack on hw × hw images, sub-jaxprs included."""
    w = jnp.ones((3, 10), jnp.float32)
    f = lambda x: jnp.mean(x, axis=(1, 2)) @ w  # the model's own graph does not depend on the image size
    fn = lambda x, y, k: attacks.square(f, x, y, key=k, eps=0.5, norm="l2", n_queries=n_queries, loop="fori")
    closed = jax.make_jaxpr(fn)(jnp.full((2, hw, hw, 3), 0.5), jnp.zeros(2, jnp.int32), KEY)

    def count(jaxpr):
        return sum(1 + sum(count(sub) for sub in jax.extend.core.jaxprs_in_params(e.params)) for e in jaxpr.eqns)

    return count(closed.jaxpr), sum(np.size(cst) for cst in closed.consts)


def test_l2_graph_does_not_grow_with_the_image():
    """Same equations and constants for 8 × 8, 32 × 32 and 96 × 96 images (the pattern table this replaced was a
    (10, 2, h, w) constant, and the start unrolled one update per block: 7 × 7 of them on 8 × 8)."""
    sizes = [_graph_size(hw) for hw in (8, 32, 96)]
    assert sizes[0] == sizes[1] == sizes[2], sizes
    assert sizes[0][1] < 100, sizes
