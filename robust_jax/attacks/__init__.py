"""Adversarial attacks: pure, jit-able, batched functions of (logits_fn, x, y, key).

    from robust_jax import attacks
    x_adv = attacks.pgd(logits_fn, x, y, key=key, eps=8/255, step_size=2/255, steps=10)

Inputs are float32 pixels in [0, 1] (NHWC) and integer labels; every attack returns adversarial pixels in [0, 1].
Under ``jax.jit`` pass model variables as traced arguments:
``jax.jit(lambda v, x, y, k: attacks.pgd(functools.partial(m.apply, v), x, y, key=k, eps=0.3, step_size=0.01,
steps=40))`` compiles once for any weights. Stochastic models: wrap with ``attacks.eot``.
"""

from robust_jax.attacks._core import (
    EOT,
    LOSSES,
    check_inputs,
    cross_entropy,
    cw_margin,
    energy_regularised,
    eot,
    input_grad,
    objective,
    predict,
    success,
)
from robust_jax.attacks.blackbox import (
    Substitute,
    SubstituteCNN,
    blackbox_attack,
    jacobian_augment,
    label_oracle,
    query_oracle,
    train_substitute,
)
from robust_jax.attacks.cw import cw_l2
from robust_jax.attacks.gradient import fgsm, le_pgd, pgd, pgd_snapshots, project, random_start
from robust_jax.attacks.jsma import jsma
from robust_jax.attacks.runner import run_attack
from robust_jax.attacks.spatial import Family, family, worst_of, worst_of_k

__all__ = [
    "EOT", "LOSSES", "check_inputs", "cross_entropy", "cw_margin", "energy_regularised", "eot", "input_grad",
    "objective", "predict", "success", "fgsm", "le_pgd", "pgd", "pgd_snapshots", "project", "random_start",
    "run_attack", "jsma", "cw_l2", "Substitute", "SubstituteCNN", "blackbox_attack", "jacobian_augment", "label_oracle",
    "query_oracle", "train_substitute", "Family", "family", "worst_of", "worst_of_k",
]
