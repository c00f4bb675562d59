"""A tiny sweep for the tests (tests/test_sweep.py): MNIST BasicCNN checkpoints, N=32 in global batches of 16.

Cells 0-1: one PGD-3 cell with two eps values per seed; cells 2-3: the same eps one per cell (the eps-array cell
must equal them); cell 4: FGSM on the heteroscedastic checkpoint (another architecture, another executable); cells
5-6: defended cells (robust_jax.evaluate.Defence): MC-dropout under the adaptive (EOT) protocol, and the
heteroscedastic head under the one-stochastic-pass protocol (dropout masks and logit noise drawn per example from
the batch key: they must not depend on the devices either); cell 7: AutoAttack (APGD-CE then APGD-T, 3 steps each)
at two eps, run on the host in stages (robust_jax.autoattack_eval; every process loads the cell's 32 examples).
"""

from robust_jax.evaluate import PROTOCOLS
from robust_jax.sweep import Cell, Sweep

PGD = {"steps": 3, "rel_step_size": 0.25}
EPS = [0.1, 0.3]
COMMON = {"n": 32, "batch_size": 16}
SAMPLES = {"mc_samples": 4, "eot_samples": 2}
AA = {"version": "custom", "attacks_to_run": ["apgd-ce", "apgd-t"],
      "options": {"apgd-ce": {"steps": 3}, "apgd-t": {"steps": 3, "n_target_classes": 2}}}
ONE_PASS, ADAPTIVE = PROTOCOLS  # the original study's protocol and EOT (names from the library: never spelled here)

SWEEP = Sweep("tiny", [
    Cell("mnist_basic_cnn", "pgd", EPS, params=PGD, seed=0, group="pgd", **COMMON),
    Cell("mnist_basic_cnn", "pgd", EPS, params=PGD, seed=1, group="pgd", label="mnist_basic_cnn seed 1", **COMMON),
    Cell("mnist_basic_cnn", "pgd", EPS[:1], params=PGD, seed=0, group="pgd_single", **COMMON),
    Cell("mnist_basic_cnn", "pgd", EPS[1:], params=PGD, seed=0, group="pgd_single", **COMMON),
    Cell("mnist_basic_cnn_hetero", "fgsm", EPS, seed=0, group="fgsm", **COMMON),
    Cell("mnist_basic_cnn", "pgd", EPS, params=PGD, seed=0, group="defended", defence="epistemic",
         protocol=ADAPTIVE, **SAMPLES, **COMMON),
    Cell("mnist_basic_cnn_hetero", "fgsm", EPS, seed=0, group="defended", defence="aleatoric", protocol=ONE_PASS,
         **SAMPLES, **COMMON),
    Cell("mnist_basic_cnn", "autoattack", EPS, params=AA, seed=0, group="autoattack", **COMMON),
])
