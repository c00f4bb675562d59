"""AutoAttack (version "standard": APGD-CE, APGD-T, FAB-T, Square, the reference's parameters) at Linf eps 4/255
and 8/255 on every CIFAR-10 checkpoint.

    python -m experiments.sweep --config=cifar10_autoattack [--num_examples=200]

Sweep attack ``"autoattack"`` (robust_jax/sweep.py) runs the staged host runner of ``experiments.autoattack``
(``robust_jax.autoattack_eval``): each attack only on the points still robust, one eps after the other, per-example
keys from the dataset positions. A cell is resumable inside (state after every chunk). Cost on a 2-core CPU: about
20 min per adversarially trained ResNet-10 and eps at N=1000 (benchmarks/README.md), a minute or two for a network
that APGD-CE breaks everywhere. Committed: the first 200 test images (results/sweeps/cifar10_autoattack_n200), the
images of the committed PGD curve cifar10_robustness_curve_n200.
"""

from experiments.sweeps.cifar10_robustness_curve import cifar10_checkpoints
from robust_jax.sweep import Cell, Sweep

EPS = [4 / 255, 8 / 255]
PARAMS = {"version": "standard", "norm": "linf"}

SWEEP = Sweep(
    "cifar10_autoattack",
    [Cell(c, "autoattack", EPS, params=PARAMS, n=1000, batch_size=200, group="cifar10_autoattack")
     for c in cifar10_checkpoints()],
    description="AutoAttack (standard, Linf) at 4/255 and 8/255 on every CIFAR-10 checkpoint",
)
