"""AutoAttack (Croce & Hein, ICML 2020): the per-point worst case over an ensemble of parameter-free attacks.

    x_adv = attacks.autoattack(logits_fn, x, y, key=key, norm="linf", eps=8/255)  # version="standard"

Versions (the reference's, fra31/auto-attack ``autoattack.py``; :func:`protocol` lists the attacks and parameters):

- ``standard``: APGD-CE (1 restart), APGD-T (9 target classes, 1 restart each), FAB-T (9 targets, 1 restart each),
  Square (5000 queries, ``p_init`` 0.8) — 100 iterations for the first three;
- ``plus``: APGD-CE and APGD-DLR (5 restarts each), untargeted FAB (5 restarts), Square, APGD-T, FAB-T;
- ``rand`` (randomised defences): APGD-CE and APGD-DLR with EOT over 20 samples (``eot_samples``): pass the
  stochastic model as an :class:`EOT` (``attacks.eot(fn, 20)``); success is judged on its prediction;
- ``custom``: the attacks named in `attacks_to_run`, with the reference's constructor defaults (APGD-CE / APGD-DLR /
  FAB with 5 restarts, APGD-T and FAB-T 9 targets × 1 restart, Square 5000 queries).

Each attack runs on the points still robust after the previous ones; a point's adversarial example is the first
one found. Inside :func:`autoattack` (a pure, jit-able function) every attack runs on the whole batch and per-point
masks decide what is kept (same shapes throughout); the host-side runner (``experiments/autoattack.py``) instead
drops the fooled points between attacks. Every computation is per example (no batch statistics) and each example
draws its randomness from ``fold_in(fold_in(key, attack id), indices[i])``: results do not depend on the batch
size or on the other examples, and are deterministic for a key. :func:`checks` and :func:`square_flag` are the
reference's warning flags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from robust_jax.attacks import diagnostics
from robust_jax.attacks._core import EOT, check_inputs, cross_entropy, input_grad, is_success
from robust_jax.attacks.apgd import apgd, apgd_t
from robust_jax.attacks.fab import fab, fab_t
from robust_jax.attacks.square import square
from robust_jax.models import logits_of

__all__ = ["ATTACKS", "VERSIONS", "autoattack", "checks", "passes", "protocol", "run_protocol_attack",
           "square_flag"]

VERSIONS = ("standard", "plus", "rand", "custom")
# name -> (function, stable id used to derive the attack's key: the same attack gets the same key in every version)
ATTACKS: dict[str, tuple[Callable, int]] = {
    "apgd-ce": (apgd, 0), "apgd-t": (apgd_t, 1), "fab-t": (fab_t, 2), "square": (square, 3),
    "apgd-dlr": (apgd, 4), "fab": (fab, 5),
}
_DEFAULTS = {  # the reference's constructor defaults (used by version="custom")
    "apgd-ce": {"loss": "ce", "steps": 100, "restarts": 5, "rho": 0.75},
    "apgd-dlr": {"loss": "dlr", "steps": 100, "restarts": 5, "rho": 0.75},
    "apgd-t": {"steps": 100, "restarts": 1, "n_target_classes": 9, "rho": 0.75},
    "fab": {"steps": 100, "restarts": 5, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9},
    "fab-t": {"steps": 100, "restarts": 1, "n_target_classes": 9, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9},
    "square": {"n_queries": 5000, "p_init": 0.8, "loss": "margin"},
}
_VERSIONS = {
    "standard": (("apgd-ce", {"restarts": 1}), ("apgd-t", {}), ("fab-t", {}), ("square", {})),
    "plus": (("apgd-ce", {}), ("apgd-dlr", {}), ("fab", {}), ("square", {}), ("apgd-t", {}), ("fab-t", {})),
    "rand": (("apgd-ce", {"restarts": 1}), ("apgd-dlr", {"restarts": 1})),
}


def protocol(version: str = "standard", attacks_to_run: Sequence[str] | None = None,
             options: dict | None = None) -> list[tuple[str, dict]]:
    """The attacks of a version, in order, with their parameters: ``[(name, kwargs)]``.

    `attacks_to_run` is only allowed (and required) with ``version="custom"`` (as in the reference). `options`
    (``{name: {param: value}}``) overrides parameters — e.g. smaller budgets for a quick look; results with
    overrides are not AutoAttack's."""
    if version not in VERSIONS:
        raise ValueError(f"unknown version {version!r}; use one of {VERSIONS}")
    if version == "custom":
        if not attacks_to_run:
            raise ValueError("version='custom' needs attacks_to_run (a list of attack names)")
        unknown = [a for a in attacks_to_run if a not in ATTACKS]
        if unknown or len(set(attacks_to_run)) != len(attacks_to_run):
            raise ValueError(f"attacks_to_run must be distinct names from {sorted(ATTACKS)}, "
                             f"got {list(attacks_to_run)}")
        spec = [(a, {}) for a in attacks_to_run]
    else:
        if attacks_to_run:
            raise ValueError(f"attacks_to_run is only used with version='custom' (the {version!r} version fixes "
                             f"its attacks: {[a for a, _ in _VERSIONS[version]]})")
        spec = list(_VERSIONS[version])
    options = dict(options or {})
    unknown = [k for k in options if k not in dict(spec)]
    if unknown:
        raise ValueError(f"options for attacks not in the protocol: {unknown} (protocol: {[a for a, _ in spec]})")
    return [(a, {**_DEFAULTS[a], **kw, **options.get(a, {})}) for a, kw in spec]


def passes(name: str, params: dict, n_classes: int, eot_samples: int = 1) -> dict[str, int]:
    """Forward and backward passes of the model per attacked example (upper bounds: every iteration is counted,
    also after an example is fooled). An EOT model multiplies gradient passes by its samples."""
    if name.startswith("apgd"):
        runs = params["restarts"] * (params["n_target_classes"] if name == "apgd-t" else 1)
        fwd = runs * (params["steps"] * eot_samples + 1) + (1 if name == "apgd-t" else 0)
        return {"forward": fwd, "backward": runs * params["steps"] * eot_samples}
    if name.startswith("fab"):
        runs = params["restarts"] * (params["n_target_classes"] if name == "fab-t" else 1)
        per_bwd = 1 if name == "fab-t" else n_classes
        return {"forward": runs * (2 * params["steps"] + 1) + 1, "backward": runs * params["steps"] * per_bwd}
    if name == "square":
        return {"forward": params["n_queries"] + 1, "backward": 0}
    raise ValueError(f"unknown attack {name!r}")


def run_protocol_attack(name: str, params: dict, logits_fn, x, y, *, key, norm: str, eps, indices=None,
                        validate: bool = False):
    """One attack of the protocol on a batch: ``x_adv`` (the key is ``fold_in(key, id of the attack)``)."""
    fn, ident = ATTACKS[name]
    return fn(logits_fn, x, y, key=jax.random.fold_in(key, ident), eps=eps, norm=norm, indices=indices,
              validate=validate, **params)


def _model_for(version: str, logits_fn, eot_samples: int):
    if version != "rand":
        return logits_fn
    if not isinstance(logits_fn, EOT):
        raise ValueError("autoattack: version='rand' attacks a randomised model with EOT: pass it wrapped as "
                         "attacks.eot(fn, num_samples) (fn(key, x) -> logits)")
    return dataclasses.replace(logits_fn, num_samples=eot_samples)


def autoattack(
    logits_fn: Callable,
    x,
    y,
    *,
    key,
    eps,
    norm: str = "linf",
    version: str = "standard",
    attacks_to_run: Sequence[str] | None = None,
    options: dict | None = None,
    eot_samples: int = 20,
    indices=None,
    return_robust: bool = False,
    validate: bool = True,
):
    """AutoAttack (see the module docstring): per example the adversarial example of the first attack of the
    protocol that fools the model (x itself for points misclassified from the start or never fooled).

    `eps` is the Linf or L2 budget (a scalar); `version` / `attacks_to_run` / `options` as in :func:`protocol`;
    ``version="rand"`` needs an :class:`EOT` `logits_fn` (its samples set to `eot_samples`). `indices`: per-example
    key indices (default ``arange(N)``; pass dataset positions to make results independent of batching).
    ``return_robust=True`` also returns ``{"clean": mask, <attack>: mask after it, ...}``: the per-point robust
    masks (True = still correctly classified). Pure and jit-able."""
    check_inputs(x, y, eps=eps, name="autoattack", validate=validate)
    spec = protocol(version, attacks_to_run, options)
    model = _model_for(version, logits_fn, eot_samples)
    robust = jnp.argmax(logits_of(model(x)), axis=-1) == y  # correctly classified
    masks = {"clean": robust}
    x_adv = x
    for name, params in spec:
        cand = run_protocol_attack(name, params, model, x, y, key=key, norm=norm, eps=eps, indices=indices)
        fooled = robust & is_success(logits_of(model(cand)), y)
        x_adv = jnp.where(fooled[:, None, None, None], cand, x_adv)
        robust = robust & ~fooled
        masks[name] = robust
    return (x_adv, masks) if return_robust else x_adv


# ------------------------------------------------------------------------------------------------------ flags
def checks(logits_fn, x, y, *, version: str = "standard", attacks: Sequence[str] = (), n_target_classes: int = 9,
           key=None) -> list[str]:
    """The reference's pre-run warning flags on a sample batch (host-side; returns messages, empty if none):
    a randomised model (outputs differ between calls, or an :class:`EOT` model whose samples differ) evaluated
    without ``version="rand"``; outputs that look like probabilities (in [0, 1], summing to 1) instead of logits;
    examples whose input gradient is exactly zero; fewer classes than the DLR losses or the target count need."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    key = jax.random.PRNGKey(0) if key is None else key
    flags = []
    logits = jax.jit(lambda z: logits_of(logits_fn(z)))
    if isinstance(logits_fn, EOT):
        randomised = diagnostics.is_stochastic(jax.jit(logits_fn.fn), x)
    else:  # a pure JAX function cannot be random, but a model calling back to the host can
        randomised = not np.allclose(np.asarray(logits(x)), np.asarray(logits(x)), rtol=1e-5, atol=1e-6)
    if randomised and version != "rand":
        flags.append("randomised defence: the model's outputs change between evaluations; use version='rand' "
                     "(with an EOT-wrapped model)")
    out = np.asarray(logits(x), np.float64)
    if out.max() < 1 + 1e-5 and out.min() > -1e-5 and np.all(np.abs(out.sum(-1) - 1) < 1e-5):
        flags.append("the outputs look like probabilities (in [0, 1], summing to 1): attack the logits")
    grad = jax.jit(lambda z, t: input_grad(logits_fn, cross_entropy, z, t, key=key)[1])
    g = np.asarray(grad(x, y)).reshape(len(x), -1)
    finite = np.isfinite(g).all(1)
    zero = int(np.sum(finite & (np.abs(g).max(1, initial=0.0) == 0)))
    if zero:
        flags.append(f"zero gradients: {zero} of {len(x)} points have an all-zero input gradient (gradient masking "
                     f"makes gradient-based attacks unreliable)")
    if not finite.all():
        flags.append(f"non-finite input gradients on {int(np.sum(~finite))} of {len(x)} points")
    n_cls = out.shape[-1]
    if any(a in ("apgd-dlr", "apgd-t") for a in attacks) and n_cls <= 3:
        flags.append(f"with {n_cls} classes the {'DLR' if n_cls <= 2 else 'targeted DLR'} loss is not usable")
    for a in ("apgd-t", "fab-t"):
        if a in attacks and n_target_classes + 1 > n_cls:
            flags.append(f"{a}: {n_target_classes} target classes but only {n_cls - 1} are possible")
    return flags


def square_flag(robust_accuracy: dict[str, float], tolerance: float = 0.002) -> str | None:
    """The reference's post-run flag: Square (score-based) lowered the robust accuracy by more than `tolerance`
    below the lowest before it (in run order) — white-box attacks missed points a black-box one found (a sign of
    gradient masking). `robust_accuracy`: ``{"clean": acc, <attack>: acc after it, ...}`` in run order."""
    names = list(robust_accuracy)
    if "square" not in names or names.index("square") < 2:  # needs the clean accuracy and an attack before it
        return None
    before = min(robust_accuracy[k] for k in names[: names.index("square")])
    drop = before - robust_accuracy["square"]
    if drop > tolerance:
        return (f"Square lowered the robust accuracy by {100 * drop:.2f} points after the white-box attacks: the "
                f"evaluation may be unreliable (gradient masking?); try more Square queries / restarts or an "
                f"adaptive attack")
    return None
