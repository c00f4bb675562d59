"""Robustness curve of every CIFAR-10 checkpoint: accuracy vs Linf eps 0…16/255 under PGD-10 (step eps/4, random
start), the first 1000 test images, seed 0.

    python -m experiments.sweep --config=cifar10_robustness_curve [--num_examples=200]

One cell per checkpoint holds all eps values (one compiled call per batch); the width-16 ResNet-10 regimes share one
executable, the AllConvNets and the width-64 ResNet one each. AutoAttack: ``cifar10_autoattack`` (same checkpoints).
"""

from robust_jax import checkpoints
from robust_jax.sweep import Cell, Sweep

EPS = [e / 255 for e in (0, 1, 2, 3, 4, 6, 8, 12, 16)]
PGD = {"steps": 10, "rel_step_size": 0.25, "norm": "linf", "loop": "fori"}
N = 1000


def cifar10_checkpoints() -> list[str]:
    return [c for c in checkpoints.available() if checkpoints.read_card(c)["dataset"] == "cifar10"]


def batch_size(name: str) -> int:
    """Global batch per call (x len(EPS) attacked copies in memory): smaller for the width-64 ResNet. Multiples of 8,
    so that 1, 2, 4 or 8 devices give identical results."""
    return 40 if checkpoints.read_card(name)["architecture"].get("width", 0) >= 64 else 200


SWEEP = Sweep(
    "cifar10_robustness_curve",
    [Cell(c, "pgd", EPS, params=PGD, n=N, batch_size=batch_size(c), group="cifar10_pgd_curve")
     for c in cifar10_checkpoints()],
    description="PGD-10 Linf robustness curve (eps 0..16/255) of every CIFAR-10 checkpoint",
)
