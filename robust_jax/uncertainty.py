"""Uncertainty: MC-dropout, deep ensembles, the heteroscedastic (aleatoric) head, and uncertainty scores.

All functions are pure and jit-able; sampling is vmapped (one call, not a Python loop):

- MC-dropout (Gal & Ghahramani 2016): T stochastic forward passes with dropout on (``mc_dropout=True``),
  vmapped over T PRNG keys.
- Deep ensembles (Lakshminarayanan et al. 2017): members' variables stacked on a leading axis (:func:`stack`);
  prediction vmapped over members (training too: ``robust_jax.training.make_ensemble_train_step``).
- Heteroscedastic head (Kendall & Gal 2017): the model returns logit mean μ(x) and log-variance log σ²(x);
  the loss is ``−log (1/T) Σ_t softmax(μ + σ·ε_t)[y]``; the predictive is the mean of the sampled softmaxes.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from robust_jax.models import logits_of


# --------------------------------------------------------------------------------------------- MC-dropout
def mc_dropout_probs(apply_fn: Callable, variables, x, key, num_samples: int):
    """Softmax samples (T, B, C) of T dropout masks: ``apply_fn(variables, x, mc_dropout=True, rngs=...)``."""
    keys = jax.random.split(key, num_samples)
    sample = lambda k: jax.nn.softmax(logits_of(apply_fn(variables, x, mc_dropout=True, rngs={"dropout": k})), -1)
    return jax.vmap(sample)(keys)


def mc_dropout_predict(apply_fn: Callable, variables, x, key, num_samples: int):
    """(mean probabilities (B, C), per-sample probabilities (T, B, C))."""
    probs = mc_dropout_probs(apply_fn, variables, x, key, num_samples)
    return probs.mean(0), probs


def mc_dropout_logits_fn(apply_fn: Callable, variables):
    """``(key, x) -> logits`` with a fresh dropout mask per key: the stochastic model for ``attacks.eot``."""
    return lambda key, x: logits_of(apply_fn(variables, x, mc_dropout=True, rngs={"dropout": key}))


def log_mean_probs(probs):
    """log of the mean of (T, B, C) probabilities: 'logits' of the predictive distribution (for attacks)."""
    return jnp.log(jnp.clip(probs.mean(0), 1e-30))


# ----------------------------------------------------------------------------------------------- ensembles
def stack(trees):
    """Stack a list of pytrees (e.g. members' variables) on a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree):
    n = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(n)]


def ensemble_probs(apply_fn: Callable, stacked_variables, x):
    """Members' softmax (M, B, C), vmapped over the stacked variables."""
    return jax.vmap(lambda v: jax.nn.softmax(logits_of(apply_fn(v, x)), -1))(stacked_variables)


def ensemble_predict(apply_fn: Callable, stacked_variables, x):
    probs = ensemble_probs(apply_fn, stacked_variables, x)
    return probs.mean(0), probs


# ------------------------------------------------------------------------------------------ heteroscedastic
def hetero_samples(outputs, key, num_samples: int):
    """Sampled logits μ + σ·ε, shape (T, B, C), from a heteroscedastic head's (μ, log σ²)."""
    mean, log_var = outputs
    eps = jax.random.normal(key, (num_samples, *mean.shape), mean.dtype)
    return mean[None] + jnp.exp(0.5 * log_var)[None] * eps


def hetero_loss(outputs, labels, key, *, num_samples: int = 16):
    """Per-example ``−log (1/T) Σ_t softmax(μ + σ ε_t)[y]`` (Kendall & Gal 2017). → cross-entropy as σ → 0."""
    logp = jax.nn.log_softmax(hetero_samples(outputs, key, num_samples), -1)  # (T, B, C)
    logp_y = jnp.take_along_axis(logp, labels[None, :, None], axis=-1)[..., 0]  # (T, B)
    return -(logsumexp(logp_y, axis=0) - jnp.log(num_samples))


def hetero_probs(outputs, key, num_samples: int = 32):
    """Softmax samples (T, B, C) of the heteroscedastic predictive."""
    return jax.nn.softmax(hetero_samples(outputs, key, num_samples), -1)


def hetero_logits_fn(apply_fn: Callable, variables, num_samples: int = 32):
    """``(key, x) -> log mean softmax`` of the aleatoric predictive: the stochastic model for ``attacks.eot``."""
    return lambda key, x: log_mean_probs(hetero_probs(apply_fn(variables, x), key, num_samples))


# -------------------------------------------------------------------------------------------------- scores
def entropy(p, axis=-1):
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.clip(p, 1e-30)), 0.0), axis=axis)


def scores(probs, log_var=None) -> dict[str, jax.Array]:
    """Uncertainty scores from softmax samples (T, B, C) (T = 1 for a deterministic model).

    ``predictive_entropy`` H[E p] (total) = ``expected_entropy`` E[H p] (aleatoric part) + ``mutual_information``
    (epistemic part, ≥ 0); ``softmax_variance``: variance over samples of the predicted class's probability;
    ``aleatoric_variance``: the head's predicted σ² of the predicted class (if `log_var` is given).
    """
    mean = probs.mean(0)
    total = entropy(mean)
    expected = entropy(probs).mean(0)
    pred = jnp.argmax(mean, -1)
    p_pred = jnp.take_along_axis(probs, jnp.broadcast_to(pred[None, :, None], probs.shape[:2] + (1,)), -1)[..., 0]
    out = {"predictive_entropy": total, "expected_entropy": expected,
           "mutual_information": jnp.maximum(total - expected, 0.0), "softmax_variance": p_pred.var(0),
           "max_probability": mean.max(-1)}
    if log_var is not None:
        out["aleatoric_variance"] = jnp.take_along_axis(jnp.exp(log_var), pred[:, None], -1)[:, 0]
    return out
