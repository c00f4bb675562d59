"""The energy study's LE-PGD λ sweep (experiments/energy_detection.py defaults): cifar10_resnet10, Linf eps 8/255,
30 steps of eps/4, λ in 0.1, 0.3, 1, 3, 10 (all λ in one compiled call), the first 500 test images, seed 0.

    python -m experiments.sweep --config=energy_lambda

The table gives accuracy under LE-PGD per λ (the study's detection rates need the fitted detector: run
``experiments.energy_detection`` for those).
"""

from robust_jax.sweep import Cell, Sweep

LAMS = [0.1, 0.3, 1.0, 3.0, 10.0]

SWEEP = Sweep(
    "energy_lambda",
    [Cell("cifar10_resnet10", "le_pgd", LAMS, params={"eps": 8 / 255, "steps": 30, "rel_step_size": 0.25,
                                                       "loop": "fori"},
          n=500, batch_size=100, group="cifar10_le_pgd_lambda")],
    description="LE-PGD lambda sweep of the energy study (cifar10_resnet10, eps 8/255, 30 steps)",
)
