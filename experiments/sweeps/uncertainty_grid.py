"""The uncertainty study's grid (experiments/uncertainty_robustness.py) as a sweep: every defence of
``robust_jax.evaluate.DEFENCES`` — none, MC-dropout (epistemic), heteroscedastic head (aleatoric) — under both attack
protocols of ``robust_jax.evaluate.PROTOCOLS`` — the original study's one stochastic pass per gradient step, and the
adaptive EOT over 8 draws per step — by FGSM and PGD-10 (random start, step 2.5·eps/10 as in ``evaluate.AttackConfig``)
at a few Linf eps, on MNIST (BasicCNN) and CIFAR-10 (AllConvNet). Accuracy is that of the defended prediction: the
mean softmax over 20 dropout masks / logit draws (``Defence.probs``), drawn with explicit keys. Images: the study's
(``test[150:650]``: it keeps the first 150 test images for the black-box attacker), seed 0.

    python -m experiments.sweep --config=uncertainty_grid                                   # both datasets
    python -m experiments.sweep --config=uncertainty_grid --checkpoints=mnist_basic_cnn,mnist_basic_cnn_hetero

Checkpoints as in the study: the dropout-trained network serves ``none`` and ``epistemic`` (same weights), its
heteroscedastic twin ``aleatoric``. ``none`` has no randomness, so both protocols differentiate the same logits
(``Defence.attacked``; the study repeats its row for the adaptive protocol): it gets one cell per attack, under the
first protocol (tests/test_sweep.py checks that the other gives the same result). 10 cells per dataset. The committed
run (``results/sweeps/uncertainty_grid``) has both datasets' cells, all with the f32 attack kernels (``custom_vjp``):
``--conv_impl=custom_vjp`` reuses them.
"""

from robust_jax.evaluate import DEFENCES, PROTOCOLS
from robust_jax.sweep import Cell, Sweep

CHECKPOINTS = {  # dataset -> defence -> checkpoint (as experiments/uncertainty_robustness.py picks them)
    "mnist": {"none": "mnist_basic_cnn", "epistemic": "mnist_basic_cnn", "aleatoric": "mnist_basic_cnn_hetero"},
    "cifar10": {"none": "cifar10_allconv", "epistemic": "cifar10_allconv", "aleatoric": "cifar10_allconv_hetero"},
}
ATTACKS = {"fgsm": {}, "pgd": {"steps": 10, "rel_step_size": 0.25, "norm": "linf"}}
EPS = {  # dataset -> attack -> Linf budgets (PGD's smaller: at FGSM's larger ones it leaves nothing to compare)
    "mnist": {"fgsm": [0.1, 0.2, 0.3], "pgd": [0.05, 0.1, 0.15]},
    "cifar10": {"fgsm": [2 / 255, 4 / 255, 8 / 255], "pgd": [1 / 255, 2 / 255, 4 / 255]},
}
MC_SAMPLES, EOT_SAMPLES = 20, 8  # the study's defaults (T, S)
SPLIT, N = "test[150:]", 500
BATCH = {"mnist": 100, "cifar10": 50}  # multiples of 1, 2, 4 devices: the same results on any of them


def protocols(defence: str) -> tuple[str, ...]:
    """The protocols a defence is attacked with: both, except for the deterministic network, whose protocols
    differentiate the same logits (``Defence.attacked``): one cell, under the first protocol."""
    return PROTOCOLS[:1] if defence == "none" else PROTOCOLS


SWEEP = Sweep(
    "uncertainty_grid",
    [Cell(CHECKPOINTS[ds][defence], attack, EPS[ds][attack], params=params, split=SPLIT, n=N, batch_size=BATCH[ds],
          defence=defence, protocol=protocol, mc_samples=MC_SAMPLES, eot_samples=EOT_SAMPLES,
          group=f"{ds}_{attack}_defences", label=f"{defence} ({protocol})")
     for ds in CHECKPOINTS for attack, params in ATTACKS.items() for defence in DEFENCES
     for protocol in protocols(defence)],
    description="The uncertainty study's grid: defences (none / MC-dropout / heteroscedastic) x attack protocols "
                "(one stochastic pass per step / EOT) x FGSM and PGD-10 x eps, MNIST and CIFAR-10",
)
