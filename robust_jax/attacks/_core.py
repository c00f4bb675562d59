"""Shared pieces of every attack: input checks, losses, EOT, the attack objective and its input gradient.

Conventions: inputs are float32 pixels in [0, 1], NHWC; labels are integers. A ``logits_fn`` is any callable
``x -> logits``; under ``jax.jit`` pass the model's variables as traced arguments, e.g.
``jax.jit(lambda v, x, y, k: pgd(functools.partial(model.apply, v), x, y, key=k, ...))`` (no recompilation when the
weights change). Losses are *ascended* by untargeted attacks; a targeted attack ascends ``−loss(logits, target)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from robust_jax import energy as energy_lib
from robust_jax.models import logits_of


# ------------------------------------------------------------------------------------------------- input checks
def _concrete(v) -> bool:
    return not isinstance(v, jax.core.Tracer)


def check_inputs(x, y=None, *, eps=None, name: str = "attack"):
    """Clear errors for bad inputs. Value checks (range, eps sign) run only on concrete (non-traced) values."""
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"{name}: x must be an NHWC batch (4-D), got shape {getattr(x, 'shape', None)}")
    if y is not None:
        if getattr(y, "ndim", None) != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"{name}: y must have shape ({x.shape[0]},) to match x {x.shape}, got "
                             f"{getattr(y, 'shape', None)}")
        if not jnp.issubdtype(jnp.asarray(y).dtype, jnp.integer):
            raise ValueError(f"{name}: y must hold integer class labels, got dtype {jnp.asarray(y).dtype}")
    if eps is not None and _concrete(eps) and float(eps) < 0:
        raise ValueError(f"{name}: eps must be >= 0, got {float(eps)}")
    if _concrete(x):
        lo, hi = float(jnp.min(x)), float(jnp.max(x))
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{name}: x must be pixels in [0, 1] (attacks work in pixel space; normalise inside the "
                             f"model), got range [{lo:.3g}, {hi:.3g}]")


# ------------------------------------------------------------------------------------------------------- losses
def cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def cw_margin(logits, y):
    """Carlini-Wagner margin ``max_{j≠y} z_j − z_y`` (positive once misclassified)."""
    onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=bool)
    other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
    return other - jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)


def energy_regularised(lam: float, base: Callable = cross_entropy, temperature: float = 1.0):
    """``base(logits, y) − lam · T·logsumexp(logits/T)`` = ``base + lam · energy``: the LE-PGD objective."""

    def loss(logits, y):
        return base(logits, y) + lam * energy_lib.energy(logits, temperature)

    return loss


LOSSES: dict[str, Callable] = {"ce": cross_entropy, "cw": cw_margin}


def resolve_loss(loss) -> Callable:
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; use one of {sorted(LOSSES)} or a callable (logits, y) -> loss")
    return LOSSES[loss]


# ---------------------------------------------------------------------------------------------------------- EOT
@dataclasses.dataclass(frozen=True)
class EOT:
    """Expectation over transformation for a stochastic model (MC-dropout masks, random transforms).

    ``fn(key, x) -> logits`` is the stochastic model. Attacks draw ``num_samples`` keys per gradient step and
    average the *loss* over samples (so the gradient is the mean of per-sample gradients), vectorised with
    ``vmap``. Calling the object, ``eot(x)``, predicts with the log of the mean softmax over samples drawn from
    ``key`` (fixed, so predictions are reproducible).
    """

    fn: Callable
    num_samples: int
    key: jax.Array = dataclasses.field(default_factory=lambda: jax.random.PRNGKey(0))

    def sample_logits(self, key, x):
        keys = jax.random.split(key, self.num_samples)
        return jax.vmap(lambda k: logits_of(self.fn(k, x)))(keys)  # (S, B, C)

    def __call__(self, x):
        logp = jax.nn.log_softmax(self.sample_logits(self.key, x), axis=-1)
        return jax.scipy.special.logsumexp(logp, axis=0) - jnp.log(self.num_samples)


def eot(fn: Callable, num_samples: int, key=None) -> EOT:
    """Wrap a stochastic ``fn(key, x) -> logits`` for use by any gradient attack (see :class:`EOT`)."""
    if num_samples < 1:
        raise ValueError(f"eot: num_samples must be >= 1, got {num_samples}")
    return EOT(fn, num_samples, jax.random.PRNGKey(0) if key is None else key)


# ------------------------------------------------------------------------------------------------- objective
def objective(logits_fn, loss_fn: Callable, x, y, key, targeted: bool = False):
    """Per-example attack objective to ascend (averaged over EOT samples when `logits_fn` is an :class:`EOT`)."""
    sign = -1.0 if targeted else 1.0
    if isinstance(logits_fn, EOT):
        per_sample = jax.vmap(lambda z: loss_fn(z, y))(logits_fn.sample_logits(key, x))
        return sign * per_sample.mean(0)
    return sign * loss_fn(logits_of(logits_fn(x)), y)


def input_grad(logits_fn, loss_fn: Callable, x, y, key=None, targeted: bool = False):
    """(per-example objective, gradient of its sum w.r.t. x)."""
    key = jax.random.PRNGKey(0) if key is None else key
    f = lambda z: objective(logits_fn, loss_fn, z, y, key, targeted)
    vals, vjp = jax.vjp(f, x)
    (g,) = vjp(jnp.ones_like(vals))
    return vals, g


def predict(logits_fn, x):
    return jnp.argmax(logits_of(logits_fn(x)), axis=-1)


def success(logits_fn, x_adv, y, targeted: bool = False):
    """Per-example success: misclassified (untargeted) or classified as the target (targeted)."""
    pred = predict(logits_fn, x_adv)
    return pred == y if targeted else pred != y


def choose_loop(loop: str) -> str:
    """Loop form for iterative attacks: ``auto`` unrolls on CPU and keeps a rolled ``fori_loop`` elsewhere.

    XLA:CPU runs the input-gradient of a plain ``lax.conv_general_dilated`` 2.4-5x slower inside a rolled while-loop;
    unrolling is fast for any caller's model. The library's models use ``robust_jax.conv`` (custom VJP), with which
    ``fori`` runs as fast as ``unroll`` and compiles in constant time in the number of steps (benchmarks/README.md)."""
    if loop == "auto":
        return "unroll" if jax.default_backend() == "cpu" else "fori"
    if loop not in ("unroll", "fori", "scan"):
        raise ValueError(f"unknown loop {loop!r}; use auto, unroll, fori or scan")
    return loop


def iterate(body: Callable, init, steps: int, loop: str = "auto"):
    """Run ``state = body(i, state)`` for i in range(steps) with the chosen loop form.

    ``unroll`` traces the body ``steps`` times in a Python loop (``i`` an int32 scalar, as ``fori_loop`` passes it):
    ``lax.fori_loop(..., unroll=True)`` still emits a rolled ``while`` loop when ``steps == 1``."""
    loop = choose_loop(loop)
    if loop == "unroll":
        for i in range(steps):
            init = body(jnp.asarray(i, jnp.int32), init)
        return init
    if loop == "scan":
        return jax.lax.scan(lambda s, i: (body(i, s), None), init, jnp.arange(steps))[0]
    return jax.lax.fori_loop(0, steps, body, init)
