"""Transformation attacks (Engstrom et al. 2019): the worst of k random transformations, or of an exhaustive grid.

A :class:`Family` is a transformation with per-example parameters (``apply(x, params, key)``, params ``(N, P)``),
a sampler of random parameters within its limits and a grid over them:

    fam = spatial.family("rotation_translation", degrees=30, pixels=3)   # Engstrom's ±30°, ±3 px
    x_adv = spatial.worst_of_k(logits_fn, x, y, key=key, family=fam, k=10)
    x_adv = spatial.grid(logits_fn, x, y, key=key, family=fam, shape=(31, 5, 5))    # 775 candidates, exhaustive

Both have the shape of every attack (``attack(logits_fn, x, y, *, key, ...) -> x_adv``). Their ``*_report``
twins (and :func:`search`, for any candidate list) return a dict of per-example arrays instead: ``x`` (the worst
transformed input), ``params`` (its parameters), ``robust`` (correct under *every* candidate — the worst-case
accuracy is its mean) and ``mean_correct`` (fraction of candidates classified correctly — the expectation over the
family). The worst candidate is a misclassified one if any exists (the one with the highest cross-entropy among
them), else the one with the highest cross-entropy. Candidates are scanned one at a time with ``lax.scan`` (memory
of one batch, forward passes only): an exhaustive search over a fixed list, not an iterative optimiser, so it does
not go through the gradient engine.

Families (limits are keyword arguments of :func:`family`): ``rotation`` (degrees), ``translation`` (pixels, dx and
dy), ``rotation_translation`` (both), ``perspective`` (each corner moves by up to ``pixels`` in x and y),
``noise`` (Gaussian, σ up to ``sigma``; a fresh noise draw per candidate), ``blur`` (motion blur, length up to
``length`` pixels, any angle).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from robust_jax import transforms
from robust_jax.attacks._core import check_inputs, cross_entropy
from robust_jax.models import logits_of


@dataclasses.dataclass(frozen=True)
class Family:
    """A transformation family: ``apply(x, params (N, P), key) -> x'``; ``low``/``high`` bound each parameter."""

    name: str
    apply: Callable
    low: tuple[float, ...]
    high: tuple[float, ...]
    identity: tuple[float, ...]

    @property
    def num_params(self) -> int:
        return len(self.low)

    def sample(self, key, n: int):
        """Parameters uniform in [low, high], shape (n, P)."""
        return jax.random.uniform(key, (n, self.num_params), minval=jnp.array(self.low), maxval=jnp.array(self.high))

    def grid(self, shape: tuple[int, ...]):
        """All combinations of ``shape[i]`` evenly spaced values of parameter i (endpoints included): (K, P)."""
        if len(shape) != self.num_params:
            raise ValueError(f"{self.name}: grid shape needs {self.num_params} entries, got {shape}")
        axes = [np.linspace(lo, hi, s) if s > 1 else np.array([ident])
                for lo, hi, s, ident in zip(self.low, self.high, shape, self.identity, strict=True)]
        return jnp.asarray(list(itertools.product(*axes)), jnp.float32)


def _rotation(x, p, key):
    return transforms.rotate(x, p[:, 0])


def _translation(x, p, key):
    return transforms.translate(x, p[:, 0], p[:, 1])


def _rotation_translation(x, p, key):
    return transforms.translate(transforms.rotate(x, p[:, 0]), p[:, 1], p[:, 2])


def _perspective(x, p, key):
    return transforms.perspective(x, p.reshape(-1, 4, 2))


def _noise(x, p, key):
    return transforms.gaussian_noise(x, p[:, 0], key)


def _blur(x, p, key):
    return transforms.motion_blur(x, p[:, 0], p[:, 1])


FAMILIES = ("rotation", "translation", "rotation_translation", "perspective", "noise", "blur")


def family(name: str, *, degrees: float = 30.0, pixels: float = 3.0, sigma: float = 0.1, length: float = 9.0) -> Family:
    """The named family with its limits (see the module docstring)."""
    limits = {"degrees": degrees, "pixels": pixels, "sigma": sigma, "length": length}
    if any(v < 0 for v in limits.values()):
        raise ValueError(f"transformation limits must be >= 0, got {limits}")
    d, px = float(degrees), float(pixels)
    if name == "rotation":
        return Family(name, _rotation, (-d,), (d,), (0.0,))
    if name == "translation":
        return Family(name, _translation, (-px, -px), (px, px), (0.0, 0.0))
    if name == "rotation_translation":
        return Family(name, _rotation_translation, (-d, -px, -px), (d, px, px), (0.0, 0.0, 0.0))
    if name == "perspective":
        return Family(name, _perspective, (-px,) * 8, (px,) * 8, (0.0,) * 8)
    if name == "noise":
        return Family(name, _noise, (0.0,), (float(sigma),), (0.0,))
    if name == "blur":
        return Family(name, _blur, (1.0, 0.0), (float(length), 180.0), (1.0, 0.0))
    raise ValueError(f"unknown transformation family {name!r}; choose from {FAMILIES}")


def search(logits_fn, x, y, *, key, family: Family, candidates, validate: bool = True) -> dict:
    """Evaluate every candidate (``(K, P)`` shared or ``(K, N, P)`` per example); keep each example's worst.
    Returns the report dict of the module docstring."""
    fam = family
    check_inputs(x, y, name=f"spatial attack ({fam.name})", validate=validate)
    n = x.shape[0]
    candidates = jnp.asarray(candidates, jnp.float32)
    if candidates.ndim == 2:
        candidates = jnp.broadcast_to(candidates[:, None], (candidates.shape[0], n, candidates.shape[1]))
    if candidates.ndim != 3 or candidates.shape[1:] != (n, fam.num_params):
        raise ValueError(f"candidates must be (K, {fam.num_params}) or (K, {n}, {fam.num_params}), "
                         f"got {candidates.shape}")

    def body(carry, inputs):
        best_x, best_p, best_mis, best_loss, n_correct = carry
        i, params = inputs
        xt = jax.lax.stop_gradient(fam.apply(x, params, jax.random.fold_in(key, i)))
        logits = logits_of(logits_fn(xt))
        mis = jnp.argmax(logits, -1) != y
        loss = cross_entropy(logits, y)
        worse = (mis & ~best_mis) | ((mis == best_mis) & (loss > best_loss))
        best_x = jnp.where(worse[:, None, None, None], xt, best_x)
        best_p = jnp.where(worse[:, None], params, best_p)
        carry = (best_x, best_p, best_mis | mis, jnp.where(worse, loss, best_loss), n_correct + (~mis))
        return carry, None

    init = (x, candidates[0], jnp.zeros(n, bool), jnp.full(n, -jnp.inf), jnp.zeros(n, jnp.int32))
    (best_x, best_p, any_mis, _, n_correct), _ = jax.lax.scan(
        body, init, (jnp.arange(candidates.shape[0]), candidates))
    return {"x": best_x, "params": best_p, "robust": ~any_mis,
            "mean_correct": n_correct / candidates.shape[0]}


def worst_of_k_report(logits_fn, x, y, *, key, family: Family, k: int = 10, validate: bool = True) -> dict:
    """Engstrom et al.'s worst-of-k: k random parameter draws per example; the report dict (module docstring)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k_params, k_apply = jax.random.split(key)
    candidates = jax.vmap(lambda kk: family.sample(kk, x.shape[0]))(jax.random.split(k_params, k))
    return search(logits_fn, x, y, key=k_apply, family=family, candidates=candidates, validate=validate)


def worst_of_k(logits_fn, x, y, *, key, family: Family, k: int = 10, validate: bool = True):
    """Engstrom et al.'s worst-of-k attack: the worst of k random transformations per example (x_adv)."""
    return worst_of_k_report(logits_fn, x, y, key=key, family=family, k=k, validate=validate)["x"]


def grid_report(logits_fn, x, y, *, key, family: Family, shape: tuple[int, ...], validate: bool = True) -> dict:
    """Exhaustive search over ``family.grid(shape)`` (the same candidates for every example); the report dict."""
    return search(logits_fn, x, y, key=key, family=family, candidates=family.grid(shape), validate=validate)


def grid(logits_fn, x, y, *, key, family: Family, shape: tuple[int, ...], validate: bool = True):
    """Exhaustive grid attack: the worst of ``family.grid(shape)`` per example (x_adv)."""
    return grid_report(logits_fn, x, y, key=key, family=family, shape=shape, validate=validate)["x"]
