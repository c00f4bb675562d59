"""Practical black-box attack by substitute training (Papernot et al. 2017).

N. Papernot, P. McDaniel, I. Goodfellow, S. Jha, Z. B. Celik, A. Swami, "Practical Black-Box Attacks against
Machine Learning", ASIA CCS 2017 (arXiv:1602.02697).

Host-side evaluation, not a pure attack: it trains a model (:mod:`robust_jax.training`) in a Python loop with a
numpy RNG and queries the oracle on the host, so it sits above training, outside :mod:`robust_jax.attacks`.

The attacker sees only the *labels* the target model (the oracle) gives to inputs it chooses. Starting from a
small holdout set ``S_0`` (the paper: 150 MNIST test images, excluded from the evaluation), each substitute
training round ``r = 0, …, rounds``

1. labels the new points of ``S_r`` with the oracle (old points keep their label: the oracle is deterministic,
   so only ``|S_r| − |S_{r−1}|`` queries are spent per round);
2. (re)trains the substitute ``F`` on ``(S_r, oracle labels)`` with the project's train step
   (:func:`robust_jax.training.make_train_step`);
3. unless it is the last round, applies Jacobian-based dataset augmentation

       S_{r+1} = S_r ∪ { clip(x + λ_r · sign(∂F_{O(x)}(x) / ∂x), 0, 1) : x ∈ S_r },

   where ``F_{O(x)}`` is the substitute's logit of the oracle's label, so ``|S_{r+1}| = 2 |S_r|`` and after
   ``rounds`` augmentations the set holds ``|S_0| · 2**rounds`` points (150 · 2**6 = 9600 for the defaults).

The step alternates sign every ``tau`` rounds, the paper's *periodic step size*
``λ_r = λ · (−1)**floor(r / tau)`` (default ``tau=3``; ``tau=None`` keeps ``λ_r = λ``, the basic algorithm): new
points then also come from the other side of the substitute's decision boundaries instead of drifting ever further
in one direction. Measured on MNIST (150 holdout images, oracle ``mnist_basic_cnn``), the constant step made the
substitute's test accuracy *fall* over the rounds (0.83 -> 0.75) while ``tau=3`` raised it (0.83 -> 0.89).
The paper writes the Jacobian of the substitute's output ``F``; here the sign of the gradient of the substitute's
*logit* of the oracle label is used.

Adversarial examples are then crafted on the substitute (FGSM or PGD from :mod:`robust_jax.attacks`)
and *transferred*: the oracle's accuracy on them measures the attack. The oracle is a callable
``oracle(x) -> integer labels`` (for example :func:`label_oracle` around a checkpoint); its outputs are checked to
be integer labels, and nothing differentiates through it (it may be plain numpy).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from robust_jax import sharding, training
from robust_jax.attacks import check_inputs, fgsm, pgd
from robust_jax.models import _normalise, logits_of

CRAFTS = ("fgsm", "pgd")


# ---------------------------------------------------------------------------------------------- the substitute
class SubstituteCNN(nn.Module):
    """Small default substitute in the style of the paper's MNIST substitutes (two conv layers of 32 and 64
    filters, two dense layers of 200 units): conv3x3-32 stride 2, conv3x3-64 stride 2, dense-200, dense-200,
    dense-``num_classes`` (ReLU, no dropout or BatchNorm).

    Downsampling is by strided convolutions rather than max-pooling: on XLA:CPU the max-pool backward pass made a
    training step ~8x slower (0.36 s vs 0.044 s for a batch of 128 MNIST images on a loaded 2-core machine).

    Pixels in [0, 1] (NHWC, any number of channels) are normalised inside: with ``mean``/``std`` given as
    per-channel statistics, else mapped to [−1, 1]. Same call signature as :mod:`robust_jax.models`.
    """

    num_classes: int = 10
    features: Sequence[int] = (32, 64)
    dense: int = 200
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None

    @nn.compact
    def __call__(self, x, train: bool = False, mc_dropout: bool = False):
        if self.mean is not None:
            h = _normalise(x, self.mean, self.std)
        else:
            if x.ndim != 4:
                raise ValueError(f"expected NHWC images, got shape {x.shape}")
            h = x.astype(jnp.float32) * 2.0 - 1.0
        for f in self.features:
            h = nn.relu(nn.Conv(f, (3, 3), strides=(2, 2), padding="SAME")(h))
        h = h.reshape(h.shape[0], -1)
        h = nn.relu(nn.Dense(self.dense)(h))
        h = nn.relu(nn.Dense(self.dense)(h))
        return nn.Dense(self.num_classes, name="logits")(h)


@dataclasses.dataclass
class Substitute:
    """A trained substitute: ``sub(x)`` gives logits (numpy, batched); ``sub.logits_fn()`` is a pure
    ``x -> logits`` for attacks. ``x``/``y`` are the final synthetic training set and its oracle labels;
    ``history`` holds one dict per training round and ``config`` the settings (see :func:`train_substitute`)."""

    model: nn.Module
    variables: Any
    history: list[dict]
    x: np.ndarray
    y: np.ndarray
    config: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self._predict = training.make_predict(self.model)

    def logits_fn(self):
        return lambda x: logits_of(self.model.apply(self.variables, x))

    def __call__(self, x, batch_size: int = 500):
        return sharding.run_sharded(functools.partial(self._predict, self.variables), np.asarray(x, np.float32),
                                    batch_size=batch_size)


# -------------------------------------------------------------------------------------------------- the oracle
def label_oracle(logits_fn: Callable, batch_size: int = 500) -> Callable:
    """Wrap a model as a label-only oracle: ``x -> np.ndarray`` of int32 labels (argmax of the logits).

    Runs in fixed-size padded batches (compiled once). Returning host numpy labels makes the black box explicit:
    no gradient or logit leaks to the attacker. ``logits_fn`` may be a :class:`~robust_jax.checkpoints.Classifier`.
    """
    fn = jax.jit(lambda x: jnp.argmax(logits_of(logits_fn(x)), axis=-1).astype(jnp.int32))

    def oracle(x):
        return sharding.run_sharded(fn, np.asarray(x, np.float32), batch_size=batch_size)

    return oracle


def query_oracle(oracle: Callable, x, num_classes: int | None = None) -> np.ndarray:
    """Call ``oracle(x)`` and check that it returned one integer label per input (not logits or probabilities)."""
    labels = np.asarray(oracle(x))
    if labels.ndim != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"oracle must return one integer label per input, shape ({x.shape[0]},), got shape "
                         f"{labels.shape} (a black-box oracle returns labels, not logits or probabilities)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"oracle must return integer class labels, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)):
        raise ValueError(f"oracle labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int32)


# ------------------------------------------------------------------------------------------------ augmentation
def jacobian_augment(logits_fn: Callable, x, y, lam):
    """Jacobian-based dataset augmentation step (Papernot et al. 2017):
    ``clip(x + lam · sign(∂ logits_fn(x)[y] / ∂x), 0, 1)`` per example, with ``y`` the oracle's labels.

    Only the *substitute's* Jacobian row of the oracle label is used (one vector-Jacobian product). Returns the new
    points only; the caller concatenates them with ``x``. ``lam`` may be negative (periodic step size).
    """

    def label_logit_sum(z):
        logits = logits_of(logits_fn(z))
        return jnp.sum(jnp.take_along_axis(logits, y[:, None].astype(jnp.int32), axis=-1))

    g = jax.grad(label_logit_sum)(x)
    return jnp.clip(x + lam * jnp.sign(g), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------- training
def _index_stream(rng: np.random.Generator, n: int, steps: int, batch_size: int) -> np.ndarray:
    """(steps, batch_size) example indices: consecutive random permutations of range(n), so every batch is full
    (one compiled step shape) even when n < batch_size or n is not a multiple of it."""
    need = steps * batch_size
    perms = [rng.permutation(n) for _ in range(-(-need // n))]
    return np.concatenate(perms)[:need].reshape(steps, batch_size)


@functools.lru_cache(maxsize=8)
def _compiled(model: nn.Module, lr: float, input_shape: tuple):
    """(optimizer, jitted init, train step, augmentation, predict) for a (hashable) Flax model, cached so repeated
    substitute trainings of the same model reuse the compiled functions (compiling dominates small runs; an
    un-jitted ``init`` alone compiled dozens of single ops, ~30 s on a loaded 2-core CPU)."""
    tx = training.make_optimizer("adam", lr, total_steps=1, schedule="constant")
    init = jax.jit(lambda k: training.create_train_state(model, tx, k, input_shape))
    train_step = training.make_train_step(model, tx)
    augment = jax.jit(lambda v, x, y, s: jacobian_augment(lambda z: model.apply(v, z), x, y, s))
    return tx, init, train_step, augment, training.make_predict(model)


def _step_size(lam: float, r: int, tau: int | None) -> float:
    return lam if not tau else lam * (-1.0) ** (r // tau)


def train_substitute(
    oracle: Callable,
    x_holdout,
    *,
    key,
    model: nn.Module | None = None,
    num_classes: int = 10,
    rounds: int = 6,
    lam: float = 0.1,
    tau: int | None = 3,
    epochs_per_round: int = 3,
    min_steps_per_round: int = 50,
    batch_size: int = 128,
    lr: float = 1e-3,
    warm_start: bool = True,
    x_eval=None,
    y_eval=None,
    log: Callable[[str], None] | None = None,
) -> Substitute:
    """Train a substitute of a label-only ``oracle`` from the small set ``x_holdout`` (Papernot et al. 2017, Alg. 1).

    Rounds ``r = 0..rounds`` each label the new points with the oracle, train the substitute (Adam, constant
    ``lr``, cross-entropy on the oracle labels) for ``max(epochs_per_round · ceil(|S_r| / batch_size),
    min_steps_per_round)`` steps of full batches, and — except after the last round — double the set by
    Jacobian-based augmentation with step ``λ_r`` (``lam``; alternating sign every ``tau`` rounds if ``tau``).
    ``min_steps_per_round`` keeps the first rounds (150 points = 2 batches) from being trivially short.
    With ``warm_start`` each round continues from the previous round's weights (fresh optimizer state); else the
    substitute is re-initialised every round.

    `model`: any Flax classifier with the :mod:`robust_jax.models` call signature (default
    ``SubstituteCNN(num_classes)``). `x_eval` (and optionally `y_eval`, true labels) only measure progress: the
    history records the substitute's agreement with the oracle on `x_eval` (those oracle calls are evaluation,
    not attack queries, and are not counted) and its accuracy on `y_eval`.

    Returns a :class:`Substitute`; ``history[r]`` has ``round``, ``size`` (|S_r|), ``queries`` (cumulative oracle
    labels spent by the attacker), ``lam`` (step used to build S_{r+1}, None after the last round), ``steps``,
    ``agreement`` / ``accuracy`` (on the eval set, if given) and
    cumulative wall-clock ``seconds``, of which ``train_seconds`` training and ``oracle_seconds`` answering the
    attacker's queries (the target model's cost, not the attacker's).
    """
    check_inputs(x_holdout, name="train_substitute")
    if rounds < 0:
        raise ValueError(f"train_substitute: rounds must be >= 0, got {rounds}")
    if len(x_holdout) == 0:
        raise ValueError("train_substitute: x_holdout is empty")
    if epochs_per_round < 0 or min_steps_per_round < 0 or batch_size < 1:
        raise ValueError(f"train_substitute: need epochs_per_round >= 0, min_steps_per_round >= 0 and "
                         f"batch_size >= 1, got {epochs_per_round}, {min_steps_per_round}, {batch_size}")
    if tau is not None and tau < 1:
        raise ValueError(f"train_substitute: tau must be None or >= 1, got {tau}")
    if batch_size % sharding.num_devices():
        raise ValueError(f"train_substitute: batch_size {batch_size} must be divisible by the "
                         f"{sharding.num_devices()} devices")
    if x_eval is not None:
        check_inputs(x_eval, y_eval, name="train_substitute (eval set)")
    model = SubstituteCNN(num_classes) if model is None else model
    t0 = time.time()

    x_set = np.asarray(x_holdout, np.float32)
    y_set = query_oracle(oracle, x_set, num_classes)
    queries, t_oracle, t_train = len(x_set), time.time() - t0, 0.0
    oracle_eval = None if x_eval is None else query_oracle(oracle, np.asarray(x_eval, np.float32), num_classes)

    tx, init, train_step, augment, predict_fn = _compiled(model, float(lr), tuple(x_set.shape[1:]))
    labels_of = lambda v, x: sharding.run_sharded(functools.partial(predict_fn, v), x, batch_size=500).argmax(-1)
    k_init, k_data = jax.random.split(key)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(k_data)))
    state = init(k_init)

    history = []
    for r in range(rounds + 1):
        if r > 0:  # fresh optimizer state (new buffers: the train step donates its input state)
            fresh = init(jax.random.fold_in(k_init, r))
            state = state.replace(opt_state=fresh.opt_state) if warm_start else fresh
        state = sharding.replicate(state)
        n = len(x_set)
        steps = max(epochs_per_round * -(-n // batch_size), min_steps_per_round)
        t1 = time.time()
        for idx in _index_stream(rng, n, steps, batch_size):
            state, _ = train_step(state, *sharding.shard_batch((x_set[idx], y_set[idx])))
        variables = jax.device_get(state.variables)
        t_train += time.time() - t1

        entry = {"round": r, "size": n, "queries": queries, "steps": steps}
        if x_eval is not None:
            pred = labels_of(variables, x_eval)
            entry["agreement"] = float(np.mean(pred == oracle_eval))
            if y_eval is not None:
                entry["accuracy"] = float(np.mean(pred == np.asarray(y_eval)))

        if r < rounds:  # Jacobian-based dataset augmentation, then label only the new points
            lam_r = _step_size(lam, r, tau)
            new = sharding.run_sharded(lambda x, y, v=variables, s=lam_r: augment(v, x, y, s), x_set, y_set,
                                       batch_size=500)
            t1 = time.time()
            y_new = query_oracle(oracle, new, num_classes)
            t_oracle += time.time() - t1
            queries += len(new)
            x_set, y_set = np.concatenate([x_set, new]), np.concatenate([y_set, y_new])
            entry["lam"] = lam_r
        else:
            entry["lam"] = None
        entry.update(seconds=time.time() - t0, train_seconds=t_train, oracle_seconds=t_oracle)
        history.append(entry)
        if log is not None:
            log(f"substitute round {r}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                      for k, v in entry.items() if k != "round"))

    config = {"rounds": rounds, "lam": lam, "tau": tau, "epochs_per_round": epochs_per_round,
              "min_steps_per_round": min_steps_per_round, "batch_size": batch_size, "lr": lr,
              "warm_start": warm_start, "holdout_size": len(x_holdout)}
    return Substitute(model, jax.device_get(state.variables), history, x_set, y_set, config)


# ---------------------------------------------------------------------------------------------------- the attack
def blackbox_attack(
    oracle: Callable,
    x_holdout,
    x_eval,
    y_eval,
    *,
    key,
    eps: float,
    craft: str = "fgsm",
    craft_labels: str = "true",
    pgd_steps: int = 10,
    pgd_step_size: float | None = None,
    substitute: Substitute | None = None,
    batch_size_craft: int = 500,
    **substitute_kwargs,
):
    """Papernot et al. 2017 black-box attack: train a substitute on oracle labels (:func:`train_substitute`,
    keyword arguments passed through), craft Linf adversarial examples of radius `eps` on it and transfer them.

    `craft`: ``"fgsm"`` (the paper's choice; Goodfellow et al. 2015) or ``"pgd"`` (`pgd_steps` steps of size
    `pgd_step_size`, default ``2.5 · eps / pgd_steps``, random start). `craft_labels`: ``"true"`` ascends the loss
    of `y_eval`; ``"substitute"`` that of the substitute's own predictions (needs no labels). A trained
    `substitute` may be passed to skip training. `x_holdout` must not overlap `x_eval` (the paper's 150 holdout
    images are excluded from evaluation).

    Returns ``(x_adv, report)``; the report has ``substitute_accuracy`` (substitute vs true labels on x_eval),
    ``substitute_agreement`` (vs the oracle on x_eval), ``oracle_clean_accuracy``, ``oracle_adv_accuracy``,
    ``transfer_rate`` (fraction of x_adv the oracle misclassifies, the rate the paper reports),
    ``transfer_success_rate`` (the same among examples the oracle classified correctly when clean),
    ``substitute_adv_accuracy`` (white-box accuracy of the substitute on its own x_adv), ``eps``, ``craft``,
    ``rounds``, ``lam``, ``tau``, ``holdout_size``, ``substitute_set_size``, ``queries``, ``n_eval``, ``history``
    and ``seconds`` (substitute training, crafting).
    """
    check_inputs(x_holdout, name="blackbox_attack (holdout)")
    check_inputs(x_eval, y_eval, eps=eps, name="blackbox_attack")
    if craft not in CRAFTS:
        raise ValueError(f"blackbox_attack: unknown craft {craft!r}; use one of {CRAFTS}")
    if craft_labels not in ("true", "substitute"):
        raise ValueError(f"blackbox_attack: craft_labels must be 'true' or 'substitute', got {craft_labels!r}")
    if craft == "pgd" and pgd_steps < 1:
        raise ValueError(f"blackbox_attack: pgd_steps must be >= 1, got {pgd_steps}")
    k_sub, k_craft = jax.random.split(key)
    t0 = time.time()
    if substitute is None:
        substitute_kwargs.setdefault("x_eval", x_eval)  # only to record per-round progress in the history
        substitute_kwargs.setdefault("y_eval", y_eval)
        substitute = train_substitute(oracle, x_holdout, key=k_sub, **substitute_kwargs)
    t_sub = time.time() - t0

    x_eval = np.asarray(x_eval, np.float32)
    y_eval = np.asarray(y_eval, np.int32)
    model, variables = substitute.model, substitute.variables
    sub_pred = substitute(x_eval).argmax(-1).astype(np.int32)
    target = y_eval if craft_labels == "true" else sub_pred
    step_size = 2.5 * eps / pgd_steps if pgd_step_size is None else pgd_step_size

    def craft_fn(v, x, y, k):
        f = lambda z: model.apply(v, z)
        if craft == "fgsm":
            return fgsm(f, x, y, key=k, eps=eps)
        return pgd(f, x, y, key=k, eps=eps, step_size=step_size, steps=pgd_steps)

    craft_jit = jax.jit(craft_fn)
    t1 = time.time()
    x_adv = sharding.run_sharded(lambda x, y: craft_jit(variables, x, y, k_craft), x_eval, target,
                                 batch_size=batch_size_craft)
    t_craft = time.time() - t1

    oracle_clean = query_oracle(oracle, x_eval)
    oracle_adv = query_oracle(oracle, x_adv)
    clean_ok = oracle_clean == y_eval
    fooled = oracle_adv != y_eval
    sub_adv = substitute(x_adv).argmax(-1)
    report = {
        "substitute_accuracy": float(np.mean(sub_pred == y_eval)),
        "substitute_agreement": float(np.mean(sub_pred == oracle_clean)),
        "oracle_clean_accuracy": float(np.mean(clean_ok)),
        "oracle_adv_accuracy": float(np.mean(~fooled)),
        "transfer_rate": float(np.mean(fooled)),
        "transfer_success_rate": float(np.mean(fooled[clean_ok])) if clean_ok.any() else float("nan"),
        "substitute_adv_accuracy": float(np.mean(sub_adv == y_eval)),
        "eps": float(eps),
        "craft": craft,
        "rounds": len(substitute.history) - 1,
        "lam": substitute.config.get("lam"),
        "tau": substitute.config.get("tau"),
        "holdout_size": substitute.config.get("holdout_size", int(len(x_holdout))),
        "substitute_set_size": int(len(substitute.x)),
        "queries": substitute.history[-1]["queries"],
        "n_eval": int(len(x_eval)),
        "history": substitute.history,
        "seconds": {"substitute": t_sub, "craft": t_craft},
    }
    return x_adv, report
