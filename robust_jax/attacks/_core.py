"""Shared pieces of every attack: input validation, losses, EOT, the per-example objective, success.

Conventions: inputs are floating-point pixels in [0, 1], NHWC; labels are integers. A ``logits_fn`` is any callable
``x -> logits`` (or ``x -> (logit_mean, logit_log_variance)`` for a heteroscedastic head: attacks use the mean),
or an :class:`EOT` wrapper of a stochastic model. Under ``jax.jit`` pass the model's variables as traced arguments,
e.g. ``jax.jit(lambda v, x, y, k: pgd(functools.partial(model.apply, v), x, y, key=k, ...))`` (no recompilation when
the weights change). Losses are *ascended* by untargeted attacks; a targeted attack (``targeted=True``, ``y`` holds
the target classes) ascends ``−loss(logits, target)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from robust_jax import energy as energy_lib
from robust_jax.models import logits_of


# --------------------------------------------------------------------------------------------------- validation
def _concrete(v) -> bool:
    return not isinstance(v, jax.core.Tracer)


def _raise_if_bad(ok, lo, hi, any_nan, name):
    if not bool(ok):
        what = "NaN values" if bool(any_nan) else f"values in [{float(lo):.3g}, {float(hi):.3g}]"
        raise ValueError(f"{name}: x must be finite pixels in [0, 1] (attacks work in pixel space; normalise "
                         f"inside the model), got {what}")


def check_inputs(x, y=None, *, eps=None, name: str = "attack", validate: bool = True):
    """Validate an attack's inputs; the one place every attack checks them.

    Static properties are checked at trace time, so they hold under ``jax.jit`` too: ``x`` is a 4-D (NHWC)
    floating-point batch (integer images such as uint8 are an error, not silently rescaled), ``y`` holds one
    integer label per example, and a concrete ``eps`` (scalar or 1-D sweep) is ``>= 0``.
    Values: with ``validate=True`` (the default) ``x`` must be finite and inside [0, 1]. For a concrete ``x`` a bad
    value raises ``ValueError`` at once; for a traced ``x`` (inside ``jit``) the check is compiled in as a host
    callback and a bad batch makes the compiled call fail at run time (a ``JaxRuntimeError`` whose message names the
    problem) — NaN images never pass silently. ``validate=False`` removes the value check (the static ones stay).
    """
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or len(shape) != 4:
        raise ValueError(f"{name}: x must be an NHWC batch (4-D), got shape {shape}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name}: x must hold floating-point pixels in [0, 1], got dtype {dtype} (convert integer "
                        f"images with x.astype(np.float32) / 255)")
    if y is not None:
        if getattr(y, "ndim", None) != 1 or y.shape[0] != shape[0]:
            raise ValueError(f"{name}: y must have shape ({shape[0]},) to match x {shape}, got "
                             f"{getattr(y, 'shape', None)}")
        if not jnp.issubdtype(y.dtype, jnp.integer):
            raise TypeError(f"{name}: y must hold integer class labels, got dtype {y.dtype}")
    if eps is not None and _concrete(eps):
        e = np.asarray(eps, np.float64)
        if e.ndim > 1 or not np.all(np.isfinite(e)) or np.any(e < 0):
            raise ValueError(f"{name}: eps must be >= 0 (a scalar or a 1-D array of budgets), got {eps}")
    if not validate:
        return
    if _concrete(x):
        xv = np.asarray(x)
        if xv.size:
            lo, hi, nan = np.nanmin(xv), np.nanmax(xv), bool(np.isnan(xv).any())
            _raise_if_bad(not nan and lo >= 0.0 and hi <= 1.0, lo, hi, nan, name)
    else:
        ok = jnp.all((x >= 0.0) & (x <= 1.0))  # False on NaN
        jax.debug.callback(lambda *a: _raise_if_bad(*a, name), ok, jnp.nanmin(x), jnp.nanmax(x),
                           jnp.any(jnp.isnan(x)))


# ------------------------------------------------------------------------------------------------------- losses
def cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def cw_margin(logits, y):
    """Carlini-Wagner margin ``max_{j≠y} z_j − z_y`` (positive once misclassified)."""
    onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=bool)
    other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
    return other - jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)


def energy_regularised(lam, base: Callable = cross_entropy, temperature: float = 1.0):
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

    ``fn(key, x) -> logits`` is the stochastic model. Attacks draw ``num_samples`` keys per step and ascend the
    *mean loss* over samples (its gradient is the mean of per-sample gradients), vectorised with ``vmap``. Calling
    the object,
    ``eot(x)``, predicts with the log of the mean softmax over samples drawn from ``key`` (fixed, so predictions
    are reproducible).
    """

    fn: Callable
    num_samples: int
    key: jax.Array = dataclasses.field(default_factory=lambda: jax.random.PRNGKey(0))

    def sample_logits(self, key, x):
        keys = jax.random.split(key, self.num_samples)
        return jax.vmap(lambda k: logits_of(self.fn(k, x)))(keys)  # (S, B, C)

    def __call__(self, x):
        return log_mean_softmax(self.sample_logits(self.key, x))


def log_mean_softmax(sample_logits):
    """log of the mean softmax over axis 0 of ``(S, B, C)`` logits: the prediction of a stochastic model."""
    logp = jax.nn.log_softmax(sample_logits, axis=-1)
    return jax.scipy.special.logsumexp(logp, axis=0) - jnp.log(sample_logits.shape[0])


def eot(fn: Callable, num_samples: int, key=None) -> EOT:
    """Wrap a stochastic ``fn(key, x) -> logits`` for use by any attack (see :class:`EOT`)."""
    if num_samples < 1:
        raise ValueError(f"eot: num_samples must be >= 1, got {num_samples}")
    return EOT(fn, num_samples, jax.random.PRNGKey(0) if key is None else key)


def num_samples(logits_fn) -> int:
    """How many model samples an attack step averages over (1 for a deterministic model)."""
    return logits_fn.num_samples if isinstance(logits_fn, EOT) else 1


# ------------------------------------------------------------------------------------------------- objective
def loss_and_logits(logits_fn, loss_fn: Callable, x, y, key, targeted: bool = False):
    """``(per-example objective to ascend, logits to judge success)`` — the one place EOT is handled.

    Deterministic model: ``±loss(logits(x), y)`` and those logits. :class:`EOT`: the loss averaged over
    ``num_samples`` samples drawn with `key`, and the model's prediction ``logits_fn(x)`` (its own fixed key), so
    that success during an attack is judged as the defended model is evaluated afterwards. (An attack that never
    looks at success — PGD keeping its last iterate — does not pay for that prediction: XLA removes it.)"""
    sign = -1.0 if targeted else 1.0
    if isinstance(logits_fn, EOT):
        samples = logits_fn.sample_logits(key, x)
        return sign * jax.vmap(lambda z: loss_fn(z, y))(samples).mean(0), logits_fn(x)
    logits = logits_of(logits_fn(x))
    return sign * loss_fn(logits, y), logits


def objective(logits_fn, loss_fn: Callable, x, y, key, targeted: bool = False):
    """Per-example attack objective to ascend (averaged over EOT samples for an :class:`EOT`)."""
    return loss_and_logits(logits_fn, loss_fn, x, y, key, targeted)[0]


def input_grad(logits_fn, loss_fn: Callable, x, y, *, key, targeted: bool = False):
    """(per-example objective, gradient of its sum w.r.t. x)."""
    vals, vjp = jax.vjp(lambda z: objective(logits_fn, loss_fn, z, y, key, targeted), x)
    (g,) = vjp(jnp.ones_like(vals))
    return vals, g


def predict(logits_fn, x):
    """Predicted classes (argmax of the logits; an :class:`EOT` predicts with its fixed key)."""
    return jnp.argmax(logits_of(logits_fn(x)), axis=-1)


def is_success(logits, y, targeted: bool = False):
    """Success from logits: misclassified (untargeted) or classified as the target ``y`` (targeted)."""
    pred = jnp.argmax(logits, axis=-1)
    return pred == y if targeted else pred != y


def success(logits_fn, x_adv, y, targeted: bool = False):
    """Per-example success mask of an attack: ``predict(x_adv) != y``, or ``== y`` when `y` holds targets."""
    return is_success(logits_of(logits_fn(x_adv)), y, targeted)


# ------------------------------------------------------------------------------------------------------ loops
UNROLL_MAX_STEPS = 16
LOOPS = ("auto", "unroll", "fori", "scan")


def choose_loop(loop: str, steps: int) -> str:
    """Loop form of an iterative attack. ``auto``: a rolled ``fori_loop`` (compile time independent of the step
    count), except on CPU for short runs (``steps <= UNROLL_MAX_STEPS``), which are unrolled: XLA:CPU runs a plain
    ``lax.conv_general_dilated``'s input gradient slowly inside a while loop (the library's own models use
    ``robust_jax.conv``, which is fast either way)."""
    if loop == "auto":
        return "unroll" if jax.default_backend() == "cpu" and steps <= UNROLL_MAX_STEPS else "fori"
    if loop not in LOOPS:
        raise ValueError(f"unknown loop {loop!r}; use one of {LOOPS}")
    return loop


def iterate(body: Callable, init, steps: int, loop: str = "auto", start: int = 0):
    """Run ``state = body(i, state)`` for i in ``range(start, start + steps)`` with the chosen loop form.

    ``unroll`` traces the body in a Python loop (``i`` an int32 scalar, as ``fori_loop`` passes it):
    ``lax.fori_loop(..., unroll=True)`` still emits a rolled ``while`` loop when ``steps == 1``."""
    loop = choose_loop(loop, steps)
    if loop == "unroll":
        for i in range(start, start + steps):
            init = body(jnp.asarray(i, jnp.int32), init)
        return init
    if loop == "scan":
        return jax.lax.scan(lambda s, i: (body(i, s), None), init, jnp.arange(start, start + steps))[0]
    return jax.lax.fori_loop(start, start + steps, body, init)
