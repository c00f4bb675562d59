"""Sanity checks for attack evaluations, surfaced as warnings in results (in the spirit of AutoAttack's flags).

A robustness number is suspect when gradients are masked (zero or NaN on many inputs), when a stochastic model is
attacked without EOT, or when robust accuracy *rises* with a stronger attack (more steps or larger eps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from robust_jax.attacks._core import cross_entropy, input_grad, num_samples


def gradient_health(logits_fn, x, y, *, key=None, zero_tol: float = 0.0) -> dict[str, float]:
    """Fractions of examples whose input gradient of the CE loss is all zero, or not finite."""
    key = jax.random.PRNGKey(0) if key is None else key
    _, g = input_grad(logits_fn, cross_entropy, jnp.asarray(x, jnp.float32), jnp.asarray(y), key=key)
    g = np.asarray(g).reshape(len(x), -1)
    finite = np.isfinite(g).all(1)
    zero = finite & (np.abs(g).max(1) <= zero_tol)
    return {"zero_gradient_fraction": float(zero.mean()), "nonfinite_gradient_fraction": float((~finite).mean())}


def is_stochastic(fn_with_key, x, *, keys=None) -> bool:
    """True if ``fn(key, x)`` gives different logits for two different keys (so attacks need EOT)."""
    k1, k2 = keys if keys is not None else (jax.random.PRNGKey(1), jax.random.PRNGKey(2))
    a, b = np.asarray(fn_with_key(k1, x)), np.asarray(fn_with_key(k2, x))
    return not np.allclose(a, b, rtol=1e-5, atol=1e-6)


def non_monotone(budgets, accuracies, *, tolerance: float) -> list[tuple]:
    """Pairs (budget_i, budget_j, acc_i, acc_j) where a stronger attack left accuracy higher by > tolerance."""
    order = np.argsort(budgets)
    b, a = np.asarray(budgets)[order], np.asarray(accuracies)[order]
    return [(float(b[i]), float(b[i + 1]), float(a[i]), float(a[i + 1]))
            for i in range(len(a) - 1) if a[i + 1] > a[i] + tolerance]


def check(logits_fn, x, y, *, stochastic_fn=None, used_eot: bool | None = None, sweeps: dict | None = None,
          max_zero_fraction: float = 0.1) -> list[str]:
    """Warnings (strings) for an attack evaluation. `sweeps`: {name: (budgets, accuracies)} for monotonicity,
    e.g. {"steps": ([5, 10, 20], [0.12, 0.08, 0.05]), "eps": (...)}; the tolerance is 2 binomial standard errors."""
    warnings = []
    h = gradient_health(logits_fn, x, y)
    if h["zero_gradient_fraction"] > max_zero_fraction:
        warnings.append(f"gradient masking suspected: input gradient is exactly zero on "
                        f"{100 * h['zero_gradient_fraction']:.1f}% of inputs")
    if h["nonfinite_gradient_fraction"] > 0:
        warnings.append(f"non-finite input gradients on {100 * h['nonfinite_gradient_fraction']:.1f}% of inputs")
    eot = num_samples(logits_fn) > 1 or used_eot  # EOT with 1 sample is no EOT
    if stochastic_fn is not None and not eot:
        if is_stochastic(stochastic_fn, x):
            warnings.append("the model is stochastic (two keys disagree) but was attacked without EOT: "
                            "the robust accuracy is likely overestimated; wrap it with attacks.eot")
    n = len(x)
    for name, (budgets, accs) in (sweeps or {}).items():
        tol = 2 * np.sqrt(max(np.mean(accs) * (1 - np.mean(accs)), 1.0 / n) / n)
        for b0, b1, a0, a1 in non_monotone(budgets, accs, tolerance=tol):
            warnings.append(f"robust accuracy rises with a stronger attack ({name} {b0:g} -> {b1:g}: "
                            f"{100 * a0:.1f}% -> {100 * a1:.1f}%): possible gradient masking or a weak attack")
    return warnings
