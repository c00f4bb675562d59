"""The AutoAttack hook for the CIFAR-10 robustness curve: ``attacks.autoattack`` (version "standard": APGD-CE,
APGD-T, FAB-T, Square) at Linf eps 4/255 and 8/255 on every CIFAR-10 checkpoint.

    python -m experiments.sweep --config=cifar10_autoattack --num_examples=100

Sweep attack ``"autoattack"`` (robust_jax/sweep.py) vmaps the eps values over one ``attacks.autoattack`` call, with
per-example keys from the dataset positions. Expensive on a CPU (Square's 5000 queries and FAB-T's 9 targets per
image): pass ``--num_examples``; for a quick look set ``PARAMS["options"]`` to smaller budgets (then the numbers are
not AutoAttack's). Not run here in full; the hook itself is tested on MNIST with reduced budgets
(tests/test_sweep.py).
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
