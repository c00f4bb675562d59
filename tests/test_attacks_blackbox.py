"""Papernot et al. 2017 practical black-box attack: Jacobian augmentation, label-only substitute training, transfer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_jax import data
from robust_jax.blackbox import (
    SubstituteCNN,
    blackbox_attack,
    jacobian_augment,
    label_oracle,
    train_substitute,
)

KEY = jax.random.PRNGKey(0)


class TinyMLP(nn.Module):
    """A fast substitute for toy problems (same call signature as robust_jax.models)."""

    num_classes: int = 3
    hidden: int = 32

    @nn.compact
    def __call__(self, x, train=False, mc_dropout=False):
        h = x.reshape(x.shape[0], -1) * 2.0 - 1.0
        return nn.Dense(self.num_classes)(nn.relu(nn.Dense(self.hidden)(h)))


class CountingOracle:
    """A label-only black box in plain numpy: it cannot be traced or differentiated (np.asarray of a tracer
    raises), so the attack can only learn from the integer labels it returns. Records every query."""

    def __init__(self, w):
        self.w = np.asarray(w, np.float32)
        self.queried = []

    def __call__(self, x):
        x = np.asarray(x, np.float32)
        self.queried.append(x.copy())
        return ((x.reshape(len(x), -1) - 0.5) @ self.w).argmax(-1).astype(np.int64)


def _toy(side=4, c=3, n_holdout=10, n_eval=2000, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(side * side, c)).astype(np.float32)
    x_holdout = rng.uniform(0.3, 0.7, size=(n_holdout, side, side, 1)).astype(np.float32)
    x_eval = rng.uniform(size=(n_eval, side, side, 1)).astype(np.float32)
    return CountingOracle(w), x_holdout, x_eval


FAST = dict(epochs_per_round=10, min_steps_per_round=50, batch_size=32, lr=1e-2)


# ------------------------------------------------------------------------------------------ Jacobian augmentation
@pytest.mark.parametrize("lam", [0.1, -0.2])
def test_jacobian_augment_equals_hand_gradient(lam):
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
    f = lambda x: x.reshape(x.shape[0], -1) @ w
    x = jnp.asarray(rng.uniform(size=(6, 4, 4, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 6), jnp.int32)
    # d z_y / d x = w[:, y] for a linear model, by hand
    expected = jnp.clip(x + lam * jnp.sign(w[:, y].T.reshape(x.shape)), 0, 1)
    np.testing.assert_allclose(jacobian_augment(f, x, y, lam), expected, atol=1e-7)


def test_augmentation_doubles_set_steps_by_lam_and_uses_only_oracle_labels():
    oracle, xh, _ = _toy(n_holdout=12)
    lam, rounds = 0.1, 3
    sub = train_substitute(oracle, xh, key=KEY, model=TinyMLP(3), num_classes=3, rounds=rounds, lam=lam, tau=1,
                           epochs_per_round=1, min_steps_per_round=5, batch_size=32)
    n = len(xh)
    assert [h["size"] for h in sub.history] == [n * 2**r for r in range(rounds + 1)]
    assert [h["lam"] for h in sub.history] == [lam, -lam, lam, None]  # periodic step size with tau=1
    assert sub.x.shape == (n * 2**rounds, *xh.shape[1:])
    np.testing.assert_array_equal(sub.x[:n], xh)
    assert sub.x.min() >= 0 and sub.x.max() <= 1
    for r in range(rounds):
        size = n * 2**r
        old, new = sub.x[:size], sub.x[size : 2 * size]
        diff = np.abs(new - old)
        interior = (new > 0) & (new < 1)  # not clipped
        assert diff.max() <= lam + 1e-6
        moved = np.isclose(diff, lam, atol=1e-6)
        assert np.all(moved | ~interior | (diff == 0))
        assert moved[interior].mean() > 0.99  # the substitute's gradient is nonzero almost everywhere
        np.testing.assert_allclose(diff.reshape(size, -1).max(1), lam, atol=1e-6)  # Linf distance = lam
    # the substitute learnt only from the oracle's labels: each point queried exactly once, labels equal its answers
    queried = np.concatenate(oracle.queried)
    assert len(queried) == sub.history[-1]["queries"] == len(sub.x)
    np.testing.assert_array_equal(queried, sub.x)
    np.testing.assert_array_equal(sub.y, CountingOracle(oracle.w)(sub.x))


def test_oracle_must_return_labels_and_bad_inputs_raise():
    oracle, xh, xe = _toy()
    logits_oracle = lambda x: np.asarray(x).reshape(len(x), -1) @ oracle.w
    with pytest.raises(ValueError, match="labels, not logits"):
        train_substitute(logits_oracle, xh, key=KEY, model=TinyMLP(3), rounds=1)
    with pytest.raises(ValueError, match="integer class labels"):
        train_substitute(lambda x: oracle(x).astype(np.float32), xh, key=KEY, model=TinyMLP(3), rounds=1)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        train_substitute(oracle, xh, key=KEY, model=TinyMLP(2), num_classes=2, rounds=1)
    with pytest.raises(ValueError, match="rounds must be >= 0"):
        train_substitute(oracle, xh, key=KEY, rounds=-1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train_substitute(oracle, xh * 255, key=KEY)
    with pytest.raises(ValueError, match="4-D"):
        train_substitute(oracle, xh[0], key=KEY)
    ye = oracle(xe).astype(np.int32)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        blackbox_attack(oracle, xh, xe, ye, key=KEY, eps=-0.1)
    with pytest.raises(ValueError, match="unknown craft"):
        blackbox_attack(oracle, xh, xe, ye, key=KEY, eps=0.1, craft="cw")
    with pytest.raises(ValueError, match="y must have shape"):
        blackbox_attack(oracle, xh, xe, ye[:-1], key=KEY, eps=0.1)


# ------------------------------------------------------------------------------------------------ substitute quality
def test_substitute_agreement_grows_with_rounds_on_toy_oracle():
    oracle, xh, xe = _toy()
    sub = train_substitute(oracle, xh, key=KEY, model=TinyMLP(3), num_classes=3, rounds=6, lam=0.1, tau=2,
                           x_eval=xe, **FAST)
    agree = [h["agreement"] for h in sub.history]
    # measured (seeds 0-2): 0.63 -> 0.75, 0.63 -> 0.85, 0.66 -> 0.79 after 6 rounds (2000 uniform eval points)
    assert agree[-1] >= agree[0] + 0.08, agree
    assert agree[-1] >= max(agree[:3]) + 0.05, agree
    assert np.mean(sub(sub.x).argmax(-1) == sub.y) >= 0.9  # it fits the oracle labels of its synthetic set


@pytest.mark.parametrize("craft", ["fgsm", "pgd"])
def test_blackbox_attack_on_toy_oracle_transfers(craft):
    oracle, xh, xe = _toy(n_eval=500)
    ye = oracle(xe).astype(np.int32)  # true labels = the oracle's (its clean accuracy is 1)
    eps = 0.15
    x_adv, rep = blackbox_attack(oracle, xh, xe, ye, key=KEY, eps=eps, craft=craft, pgd_steps=3, model=TinyMLP(3),
                                 num_classes=3, rounds=6, lam=0.1, tau=2, **FAST)
    assert x_adv.shape == xe.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    assert np.abs(x_adv - xe).max() <= eps + 1e-6
    assert rep["oracle_clean_accuracy"] == 1.0
    assert rep["oracle_adv_accuracy"] == pytest.approx(1 - rep["transfer_rate"])
    assert rep["transfer_success_rate"] == pytest.approx(rep["transfer_rate"])  # all clean examples correct
    assert rep["substitute_adv_accuracy"] < rep["substitute_accuracy"]
    assert rep["oracle_adv_accuracy"] <= 0.7, rep  # the transferred examples fool the black box
    assert (rep["holdout_size"], rep["substitute_set_size"], rep["rounds"], rep["lam"]) == (10, 640, 6, 0.1)
    assert len(rep["history"]) == 7 and rep["queries"] == 640


def test_substitute_cnn_shapes():
    def out_shape(m, x):  # shapes only (no compilation)
        return jax.eval_shape(lambda: m.apply(m.init(KEY, x), x)).shape

    assert out_shape(SubstituteCNN(10), jnp.zeros((2, 28, 28, 1))) == (2, 10)
    assert out_shape(SubstituteCNN(5, mean=(0.5,) * 3, std=(0.25,) * 3), jnp.zeros((3, 32, 32, 3))) == (3, 5)
    with pytest.raises(ValueError, match="channel"):
        out_shape(SubstituteCNN(10, mean=(0.5,), std=(0.25,)), jnp.zeros((1, 32, 32, 3)))


# ------------------------------------------------------------------------------------------------- on the real model
@pytest.mark.slow
def test_blackbox_fgsm_transfers_to_mnist_cnn(need_checkpoint, real_data):
    """The paper's MNIST setup: 150 test images as the attacker's holdout (excluded from evaluation), 6 rounds of
    Jacobian augmentation (9600 oracle queries), FGSM eps=0.3 crafted on the substitute, evaluated on 1000 other
    test images. The attacker sees only the checkpoint's argmax labels."""
    m = need_checkpoint("mnist_basic_cnn")
    real_data("mnist")
    n_eval = 1000
    x, y = data.load("mnist", f"test[:{150 + n_eval}]")
    x = data.to_float(x)
    x_holdout, x_eval, y_eval = x[:150], x[150:], y[150:]
    oracle = label_oracle(m)
    x_adv, rep = blackbox_attack(oracle, x_holdout, x_eval, y_eval, key=KEY, eps=0.3, craft="fgsm")
    print({k: v for k, v in rep.items() if k != "history"}, [round(h["accuracy"], 3) for h in rep["history"]])
    assert np.abs(x_adv - x_eval).max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert rep["holdout_size"] == 150 and rep["substitute_set_size"] == 150 * 2**6 == rep["queries"]
    acc = [h["accuracy"] for h in rep["history"]]
    # measured (key 0, 2-core CPU): substitute accuracy per round 0.835 0.828 0.824 0.812 0.835 0.811 0.887
    assert rep["substitute_accuracy"] >= 0.84, acc
    assert acc[-1] >= acc[0] + 0.02, acc  # augmentation helps beyond the 150-image substitute
    # measured: oracle clean 0.994, on transferred FGSM 0.551 (transfer rate 0.449)
    assert rep["oracle_clean_accuracy"] >= 0.98
    assert rep["oracle_adv_accuracy"] <= rep["oracle_clean_accuracy"] - 0.3, rep
    # control: random +-0.3 sign noise of the same Linf size hurts the oracle far less (measured 0.822)
    noise = np.sign(np.random.default_rng(0).uniform(-1, 1, x_eval.shape)).astype(np.float32)
    noisy_acc = float(np.mean(oracle(np.clip(x_eval + 0.3 * noise, 0, 1)) == y_eval))
    print("oracle accuracy under random sign noise:", noisy_acc)
    assert rep["oracle_adv_accuracy"] <= noisy_acc - 0.15, (rep["oracle_adv_accuracy"], noisy_acc)
