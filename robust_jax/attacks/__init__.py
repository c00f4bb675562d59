"""Adversarial attacks: pure, jit-able, batched functions with one shape.

    from robust_jax import attacks
    x_adv = attacks.pgd(logits_fn, x, y, key=key, eps=8/255, step_size=2/255, steps=10)

Every attack is ``attack(logits_fn, x, y, *, key, <params>) -> x_adv``: ``x`` floating-point pixels in [0, 1] (NHWC),
``y`` integer labels (the target classes when ``targeted=True``), ``key`` a PRNG key (required everywhere, also
where an attack does not use it). Inputs are validated in one place (``check_inputs``; also under ``jax.jit``).
``attacks.success(logits_fn, x_adv, y, targeted)`` is the per-example success mask. Iterative attacks are
configurations of one loop, :mod:`robust_jax.attacks.engine`; LE-APGD and detector-aware
APGD against the energy detector are in :mod:`robust_jax.attacks.evasion`. ``eps`` (and LE-PGD's ``lam``) may be a
1-D array: the result gets a leading axis, one batch per value, from one compiled call.
Under ``jax.jit`` pass model variables as traced arguments:
``jax.jit(lambda v, x, y, k: attacks.pgd(functools.partial(m.apply, v), x, y, key=k, eps=0.3, step_size=0.01,
steps=40))`` compiles once for any weights. Stochastic models: wrap with ``attacks.eot``.
"""

from robust_jax.attacks import engine, spatial
from robust_jax.attacks._core import (
    EOT,
    LOSSES,
    check_inputs,
    cross_entropy,
    cw_margin,
    energy_regularised,
    eot,
    input_grad,
    is_success,
    loss_and_logits,
    objective,
    predict,
    success,
)
from robust_jax.attacks.apgd import apgd, apgd_t, dlr_loss, dlr_loss_targeted
from robust_jax.attacks.autoattack import autoattack
from robust_jax.attacks.cw import cw_l2
from robust_jax.attacks.evasion import detector_apgd, detector_margin, evades_detector, le_apgd
from robust_jax.attacks.fab import fab, fab_t
from robust_jax.attacks.gradient import fgsm, le_pgd, pgd, pgd_snapshots, project, random_start, sweep
from robust_jax.attacks.jsma import jsma
from robust_jax.attacks.spatial import Family, family, grid, worst_of_k
from robust_jax.attacks.square import square

__all__ = [
    "EOT", "LOSSES", "check_inputs", "cross_entropy", "cw_margin", "energy_regularised", "eot", "input_grad",
    "is_success", "loss_and_logits", "objective", "predict", "success", "engine", "spatial", "fgsm", "le_pgd", "pgd",
    "pgd_snapshots", "project", "random_start", "sweep", "jsma", "cw_l2", "Family", "family", "grid", "worst_of_k",
    "apgd", "apgd_t", "dlr_loss", "dlr_loss_targeted", "fab", "fab_t", "square", "autoattack", "le_apgd",
    "detector_apgd", "detector_margin", "evades_detector",
]
