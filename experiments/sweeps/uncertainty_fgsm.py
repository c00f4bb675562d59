"""The uncertainty study's FGSM eps sweep (experiments/uncertainty_robustness.py's default grid on MNIST), for the
deterministic predictions of its two MNIST checkpoints: mnist_basic_cnn (the undefended / MC-dropout network) and
mnist_basic_cnn_hetero (the aleatoric defence), eps 0…0.3, the first 1000 test images, seed 0.

    python -m experiments.sweep --config=uncertainty_fgsm

The study's defences (MC-dropout, the heteroscedastic prediction) and its EOT protocol: ``uncertainty_grid``.
"""

from robust_jax.sweep import Cell, Sweep

EPS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]

SWEEP = Sweep(
    "uncertainty_fgsm",
    [Cell(c, "fgsm", EPS, n=1000, batch_size=200, group="mnist_fgsm_eps")
     for c in ("mnist_basic_cnn", "mnist_basic_cnn_hetero")],
    description="FGSM eps sweep of the uncertainty study's MNIST checkpoints",
)
