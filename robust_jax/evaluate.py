"""Evaluating attacks against a classifier: one report format for every attack and every study.

``evaluate_attacks`` runs the named attacks on (x, y) against a (possibly stochastic) classifier and returns one
row per attack: clean accuracy, adversarial accuracy, fooling rate (untargeted: fraction of originally-correct
examples whose prediction changes; targeted: success rate), mean L0/L2/Linf of the perturbations, seconds, and
sanity warnings (``robust_jax.attacks.diagnostics``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import numpy as np

from robust_jax import attacks, metrics
from robust_jax.attacks import diagnostics

ATTACKS = ("fgsm", "pgd", "cw_l2", "jsma", "blackbox")


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
        return lambda v, x, y, k: attacks.fgsm(logits_builder(v), x, y, eps=cfg.eps)
    if name == "pgd":
        step = cfg.pgd_step_size or 2.5 * cfg.eps / cfg.pgd_steps
        return lambda v, x, y, k: attacks.pgd(logits_builder(v), x, y, key=k, eps=cfg.eps, step_size=step,
                                              steps=cfg.pgd_steps, restarts=cfg.pgd_restarts)
    if name == "cw_l2":
        from robust_jax.attacks.cw import cw_l2

        return lambda v, x, y, k: cw_l2(logits_builder(v), x, y, steps=cfg.cw_steps, lr=cfg.cw_lr,
                                        binary_search_steps=cfg.cw_binary_search_steps,
                                        initial_const=cfg.cw_initial_const, confidence=cfg.cw_confidence, key=k)
    if name == "jsma":
        from robust_jax.attacks.jsma import jsma

        return lambda v, x, t, k: jsma(logits_builder(v), x, t, theta=cfg.jsma_theta, gamma=cfg.jsma_gamma)
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
    x_holdout=None,
    stochastic_fn: Callable | None = None,
    progress: bool = True,
    return_adversarials: bool = False,
) -> list[dict]:
    """Run `names` against the classifier. `predict(x) -> logits` (numpy, the defended prediction);
    `logits_builder(variables) -> logits_fn` is what gradient attacks differentiate. Black-box needs `x_holdout`
    (the attacker's small set, disjoint from x). `return_adversarials` adds each row's ``x_adv`` array."""
    x, y = np.asarray(x, np.float32), np.asarray(y)
    clean_logits = predict(x)
    clean_pred = clean_logits.argmax(-1)
    rows = []
    for i, name in enumerate(names):
        k = jax.random.fold_in(key, i)
        t0 = time.time()
        target, extra = None, {}
        if name == "blackbox":
            from robust_jax.attacks.blackbox import blackbox_attack

            if x_holdout is None:
                raise ValueError("blackbox needs x_holdout (the attacker's holdout set)")
            oracle = lambda z: np.asarray(predict(np.asarray(z, np.float32))).argmax(-1)
            x_adv, report = blackbox_attack(oracle, x_holdout, x, y, key=k, eps=cfg.eps,
                                            rounds=cfg.blackbox_rounds, lam=cfg.blackbox_lam)
            extra = {"blackbox": {kk: v for kk, v in report.items() if np.isscalar(v) or isinstance(v, str)}}
        else:
            fn = _attack_fn(name, cfg, logits_builder)
            labels = y
            if name == "jsma":
                target = random_targets(y, clean_logits.shape[-1], jax.random.fold_in(k, 99))
                labels = target
            x_adv = attacks.run_attack(fn, variables, x, labels, key=k, batch_size=cfg.batch_size,
                                       progress=progress, desc=name)
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

