"""Evaluating attacks against a classifier: one report format for every attack and every study.

``evaluate_attacks`` runs the named attacks on (x, y) against a (possibly stochastic) classifier and returns one
row per attack: clean accuracy, adversarial accuracy, fooling rate (untargeted: fraction of originally-correct
examples whose prediction changes; targeted: success rate), mean L0/L2/Linf of the perturbations, seconds, and
sanity warnings (``robust_jax.attacks.diagnostics``).

:class:`Defence` is a defended classifier (deterministic, MC-dropout or heteroscedastic prediction) together with the
``logits_fn`` each attack protocol differentiates; :func:`energy_detector_report` applies a fitted energy detector.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import numpy as np

from robust_jax import attacks, energy, metrics, sharding, uncertainty
from robust_jax.attacks import diagnostics
from robust_jax.blackbox import blackbox_attack
from robust_jax.models import logits_of
from robust_jax.runner import run_attack

ATTACKS = ("fgsm", "pgd", "cw_l2", "jsma", "blackbox")
# Attacks that stop at the decision boundary: CW-L2's minimal perturbations (on the boundary at confidence 0) and
# JSMA, which stops once its in-graph prediction is the target. A forward pass right at the boundary decides their
# success, so they differentiate the model whose predictions are reported (``boundary_logits_builder`` of
# evaluate_attacks), never one with other (e.g. bf16) kernels, whose rounding would pick the side they stop on.
BOUNDARY_ATTACKS = ("cw_l2", "jsma")


@dataclasses.dataclass
class AttackConfig:
    eps: float = 0.3
    pgd_steps: int = 40
    pgd_step_size: float | None = None  # default 2.5 * eps / steps
    pgd_restarts: int = 1
    cw_steps: int = 100
    cw_lr: float = 0.1
    cw_binary_search_steps: int = 5
    cw_initial_const: float = 1.0
    cw_confidence: float = 0.0
    jsma_theta: float = 1.0
    jsma_gamma: float = 0.1
    blackbox_holdout: int = 150
    blackbox_rounds: int = 6
    blackbox_lam: float = 0.1
    eot_samples: int = 0  # > 0: attack the stochastic model through EOT with this many samples
    batch_size: int = 250


def _attack_fn(name: str, cfg: AttackConfig, logits_builder: Callable):
    """``attack(variables, x, y_or_target, key) -> x_adv`` for run_attack. `logits_builder(variables)` gives the
    attacked logits_fn (possibly an EOT wrapper)."""
    if name == "fgsm":
        return lambda v, x, y, k: attacks.fgsm(logits_builder(v), x, y, key=k, eps=cfg.eps)
    if name == "pgd":
        step = cfg.pgd_step_size or 2.5 * cfg.eps / cfg.pgd_steps
        return lambda v, x, y, k: attacks.pgd(logits_builder(v), x, y, key=k, eps=cfg.eps, step_size=step,
                                              steps=cfg.pgd_steps, restarts=cfg.pgd_restarts)
    if name == "cw_l2":
        return lambda v, x, y, k: attacks.cw_l2(logits_builder(v), x, y, steps=cfg.cw_steps, lr=cfg.cw_lr,
                                                binary_search_steps=cfg.cw_binary_search_steps,
                                                initial_const=cfg.cw_initial_const, confidence=cfg.cw_confidence,
                                                key=k)
    if name == "jsma":
        return lambda v, x, t, k: attacks.jsma(logits_builder(v), x, t, key=k, theta=cfg.jsma_theta,
                                               gamma=cfg.jsma_gamma)
    raise ValueError(f"unknown attack {name!r}; known: {ATTACKS}")


def random_targets(y, num_classes: int, key) -> np.ndarray:
    """A uniformly random target class != y per example (seeded)."""
    shift = np.asarray(jax.random.randint(key, (len(y),), 1, num_classes))
    return (np.asarray(y) + shift) % num_classes


def evaluate_attacks(
    names,
    predict: Callable,
    variables,
    x,
    y,
    *,
    key,
    cfg: AttackConfig,
    logits_builder: Callable,
    boundary_logits_builder: Callable | None = None,
    x_holdout=None,
    stochastic_fn: Callable | None = None,
    progress: bool = True,
    return_adversarials: bool = False,
) -> list[dict]:
    """Run `names` against the classifier. `predict(x) -> logits` (numpy, the defended prediction);
    `logits_builder(variables) -> logits_fn` is what gradient attacks differentiate, and what the gradient-masking
    diagnostics look at; `boundary_logits_builder` (default `logits_builder`) is what the :data:`BOUNDARY_ATTACKS`
    differentiate: pass the logits of the model behind `predict` when `logits_builder` uses other convolution
    kernels. Black-box needs `x_holdout` (the attacker's small set, disjoint from x). `return_adversarials` adds each
    row's ``x_adv`` array."""
    x, y = np.asarray(x, np.float32), np.asarray(y)
    clean_logits = predict(x)
    clean_pred = clean_logits.argmax(-1)
    rows = []
    for i, name in enumerate(names):
        k = jax.random.fold_in(key, i)
        t0 = time.time()
        target, extra = None, {}
        if name == "blackbox":
            if x_holdout is None:
                raise ValueError("blackbox needs x_holdout (the attacker's holdout set)")
            oracle = lambda z: np.asarray(predict(np.asarray(z, np.float32))).argmax(-1)
            x_adv, report = blackbox_attack(oracle, x_holdout, x, y, key=k, eps=cfg.eps,
                                            rounds=cfg.blackbox_rounds, lam=cfg.blackbox_lam)
            extra = {"blackbox": {kk: v for kk, v in report.items() if np.isscalar(v) or isinstance(v, str)}}
        else:
            boundary = name in BOUNDARY_ATTACKS and boundary_logits_builder is not None
            fn = _attack_fn(name, cfg, boundary_logits_builder if boundary else logits_builder)
            labels = y
            if name == "jsma":
                target = random_targets(y, clean_logits.shape[-1], jax.random.fold_in(k, 99))
                labels = target
            x_adv = run_attack(fn, variables, x, labels, key=k, batch_size=cfg.batch_size, progress=progress,
                               desc=name)
        seconds = time.time() - t0
        adv_pred = predict(x_adv).argmax(-1)
        row = {"attack": name, "n": len(x), "accuracy": metrics.accuracy(clean_pred, y),
               "adversarial_accuracy": metrics.accuracy(adv_pred, y),
               "fooling_rate": metrics.fooling_rate(clean_pred, adv_pred, y, target=target),
               "targeted": target is not None, "eps": cfg.eps if name in ("fgsm", "pgd", "blackbox") else None,
               **{f"mean_{k_}": v for k_, v in metrics.perturbation_norms(x, x_adv).items()},
               "seconds": seconds, "eot_samples": cfg.eot_samples, **extra}
        if name == "pgd":
            row["pgd_steps"] = cfg.pgd_steps
        if return_adversarials:
            row["x_adv"] = np.asarray(x_adv)
        rows.append(row)
    n_check = min(len(x), 256)
    warn = diagnostics.check(logits_builder(variables), x[:n_check], y[:n_check],
                                     stochastic_fn=stochastic_fn, used_eot=cfg.eot_samples > 0)
    for r in rows:
        r["warnings"] = list(warn)
    return rows


def markdown_table(rows) -> str:
    pct = lambda v: "—" if v is None or v != v else f"{100 * v:.2f}"  # noqa: E731
    lines = ["| attack | n | clean acc % | adv. acc % | fooling / success % | mean L0 % | mean L2 | mean Linf | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['attack']}{' (targeted)' if r['targeted'] else ''} | {r['n']} | {pct(r['accuracy'])} | "
                     f"{pct(r['adversarial_accuracy'])} | {pct(r['fooling_rate'])} | {pct(r['mean_l0'])} | "
                     f"{r['mean_l2']:.3f} | {r['mean_linf']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines)



# ---------------------------------------------------------------------------------------------------- defences
DEFENCES = ("none", "epistemic", "aleatoric")
PROTOCOLS = ("single_pass", "adaptive")


@dataclasses.dataclass
class Defence:
    """A defended classifier: its (stochastic) prediction and the logits each attack protocol differentiates.

    ``kind``: ``"none"`` (the deterministic network), ``"epistemic"`` (MC-dropout: mean softmax over `mc_samples`
    dropout masks), ``"aleatoric"`` (a heteroscedastic head: mean softmax over `mc_samples` logit draws μ + σ·ε).
    `model` is a :class:`robust_jax.checkpoints.Classifier` (anything with ``apply``, ``variables``, ``card``); its
    forward passes give every reported number (the prediction, uncertainty scores, mean logits). `attack_model`, if
    given, is the same network with other convolution kernels (e.g. ``model.for_use("attack")``, see
    ``models.choose_conv_impl``) whose ``apply`` the attacks differentiate (:meth:`attacked`, :meth:`sample_fn`);
    by default `model` itself.
    Protocols (:meth:`attacked`): ``"single_pass"`` (the protocol of a naive attacker, and of the study this
    project reproduces) attacks one stochastic pass per gradient step (a fresh dropout mask;
    the aleatoric head's mean logits μ); ``"adaptive"`` uses EOT over `eot_samples` masks / logit draws per step.
    Every function of ``variables`` is pure (jit-able, variables traced).
    """

    kind: str
    model: object
    mc_samples: int = 20
    eot_samples: int = 8
    attack_model: object = None

    def __post_init__(self):
        if self.kind not in DEFENCES:
            raise ValueError(f"unknown defence {self.kind!r}; use one of {DEFENCES}")
        if self.kind == "aleatoric" and not self.model.card.get("architecture", {}).get("hetero"):
            raise ValueError(f"the aleatoric defence needs a heteroscedastic checkpoint; "
                             f"{self.model.card.get('name')} is not one")

        def predictive(variables, x, key):
            p, log_var = self.probs(variables, x, key)
            return uncertainty.log_mean_probs(p), uncertainty.scores(p, log_var)

        self._predictive = jax.jit(predictive)  # compiled once per input shape, variables traced

    @property
    def variables(self):
        return self.model.variables

    def sample_fn(self, variables, *, attack: bool = False):
        """``(key, x) -> logits`` of one stochastic pass (None for the deterministic network); through
        `attack_model` if `attack`."""
        apply = self._apply(attack)
        if self.kind == "epistemic":
            return uncertainty.mc_dropout_logits_fn(apply, variables)
        if self.kind == "aleatoric":
            return lambda k, x: uncertainty.hetero_samples(apply(variables, x), k, 1)[0]
        return None

    def attacked(self, protocol: str) -> Callable:
        """``variables -> logits_fn`` that the attacks of `protocol` differentiate (an ``attacks.EOT`` when
        stochastic)."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
        deterministic = lambda v: (lambda x: logits_of(self._apply(True)(v, x)))
        if self.kind == "none" or (self.kind == "aleatoric" and protocol == "single_pass"):
            return deterministic
        samples = 1 if protocol == "single_pass" else self.eot_samples
        return lambda v: attacks.eot(self.sample_fn(v, attack=True), samples)

    def _apply(self, attack: bool):
        return (self.attack_model if attack and self.attack_model is not None else self.model).apply

    def probs(self, variables, x, key):
        """(softmax samples (T, B, C), the head's log-variance (B, C) or None) of the defended prediction."""
        apply = self.model.apply
        if self.kind == "epistemic":
            return uncertainty.mc_dropout_probs(apply, variables, x, key, self.mc_samples), None
        if self.kind == "aleatoric":
            outputs = apply(variables, x)
            return uncertainty.hetero_probs(outputs, key, self.mc_samples), outputs[1]
        return jax.nn.softmax(logits_of(apply(variables, x)), -1)[None], None

    def mean_logits(self, variables, x, key):
        """The defended model's logits for energy: the mean logits over its `mc_samples` stochastic passes
        (the plain logits of the deterministic network; μ for the heteroscedastic head)."""
        if self.kind != "epistemic":
            return logits_of(self.model.apply(variables, x))
        sample = self.sample_fn(variables)
        return jax.numpy.mean(jax.vmap(lambda k: sample(k, x))(jax.random.split(key, self.mc_samples)), 0)

    def predictive(self, x, key, batch_size: int = 500):
        """(log mean softmax (N, C), uncertainty scores {name: (N,)}) of the defended prediction over all of `x`
        (batched over all devices; ``uncertainty.scores``)."""
        variables = sharding.replicate(self.variables)
        return sharding.run_sharded(lambda xb: self._predictive(variables, xb, key), np.asarray(x, np.float32),
                                    batch_size=batch_size)

    def predict(self, x, key, batch_size: int = 500):
        """log mean softmax (N, C) of the defended prediction (the ``predict`` of :func:`evaluate_attacks`)."""
        return self.predictive(x, key, batch_size)[0]


# ------------------------------------------------------------------------------------------- energy detection
def energy_detector_report(detector: dict, clean_logits, adv_logits, labels=None):
    """An energy detector (``energy.fit_detector``, fitted on validation) applied unchanged to test logits.

    Returns (row, scores, is_adversarial): the row holds the rule's TPR (detection rate), FPR, FNR, TNR, the AUROC
    and AUPR of the score at the detector's temperature, the classifier's adversarial accuracy (given the true
    `labels`), and the detector's temperature, threshold and validation AUROC; scores / is_adversarial (clean first)
    are for ROC curves and confusion matrices."""
    t = detector["temperature"]
    clean, adv = np.asarray(energy.score(clean_logits, t)), np.asarray(energy.score(adv_logits, t))
    row = metrics.detection_report(clean, adv, detector["threshold"])
    if labels is not None:
        row["adversarial_accuracy"] = metrics.accuracy(adv_logits, labels)
    row.update(temperature=t, threshold=detector["threshold"], val_auroc=detector.get("val_auroc"))
    return (row, *metrics.stack_scores(clean, adv))
