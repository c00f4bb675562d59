"""Can uncertainty estimates mitigate adversarial attacks? (the first deck's study)

    python -m experiments.uncertainty_robustness --dataset=mnist      # BasicCNN: fgsm, cw_l2, jsma, blackbox
    python -m experiments.uncertainty_robustness --dataset=cifar10    # AllConvNet: fgsm

The defaults are sized so the MNIST run finishes within 15 minutes on 2 CPU cores (FGSM and black-box on 500 test
images, CW-L2 and JSMA on the first 50, CW with 3 binary-search steps of 50 Adam steps; with ``--num_examples=1000``
it took 16 min). ``results/uncertainty_robustness/mnist`` was run with ``--num_examples=1000``;
``results/uncertainty_robustness/mnist_reference`` with ``--num_examples_slow=100 --cw_steps=100
--cw_binary_search_steps=5``.

Defences: ``none`` (deterministic network), ``epistemic`` (MC-dropout: the same dropout-trained network, mean
softmax of T masks), ``aleatoric`` (heteroscedastic head, Kendall & Gal 2017: mean softmax of T logit samples
μ + σ·ε). Every defence is attacked two ways:

- ``deck``: as a CleverHans user would have: the attack differentiates one forward pass per gradient step (for
  MC-dropout a fresh dropout mask each step; for the aleatoric head its mean logits μ).
- ``adaptive``: EOT (Athalye et al. 2018) over S dropout masks / logit-noise draws per step, and CW-L2 with a
  confidence margin (``--adaptive_cw_confidence``; Carlini & Wagner 2017 broke MC-dropout detection this way) — the
  honest number.

The deterministic model and the black-box attack (labels only) have no randomness to adapt to: their adaptive
rows repeat the deck rows (marked ``"same_as_deck": true``). Accuracy is always that of the defended prediction.
Writes results.json ({"rows": [...]}), results.md and PNG figures to --out_dir.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

from absl import app, flags, logging

flags.DEFINE_string("dataset", "mnist", "mnist | cifar10")
flags.DEFINE_list("attacks", None, "attacks (default: fgsm,cw_l2,jsma,blackbox on mnist; fgsm on cifar10)")
flags.DEFINE_list("defences", ["none", "epistemic", "aleatoric"], "defences")
flags.DEFINE_list("protocols", ["deck", "adaptive"], "attack protocols")
flags.DEFINE_integer("num_examples", 500, "N test examples for fgsm and blackbox (the reference runs: 1000)")
flags.DEFINE_integer("num_examples_slow", 50, "N test examples for cw_l2 and jsma (the first of the N above)")
flags.DEFINE_float("eps", None, "FGSM / black-box Linf budget (default 0.3 mnist, 8/255 cifar10)")
flags.DEFINE_list("eps_sweep", None, "FGSM eps values for the accuracy-vs-eps figure (default per dataset)")
flags.DEFINE_integer("mc_samples", 20, "T: dropout masks / logit samples in each defended prediction")
flags.DEFINE_integer("eot_samples", 8, "S: samples per gradient step of the adaptive (EOT) attacks")
flags.DEFINE_integer("cw_steps", 50, "CW-L2 Adam steps per binary-search step")
flags.DEFINE_integer("cw_binary_search_steps", 3, "CW-L2 binary-search steps")
flags.DEFINE_float("adaptive_cw_confidence", 5.0,
                   "CW-L2 confidence margin kappa (logits) of the adaptive protocol; the deck protocol uses 0. A "
                   "minimal (kappa=0) example sits on the decision boundary, where a stochastic predictive flips "
                   "back at random: the adaptive attacker asks for a margin on every EOT sample")
flags.DEFINE_integer("blackbox_rounds", 6, "substitute training rounds (Jacobian augmentation)")
flags.DEFINE_integer("batch_size", 250, "attack batch size")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR)")
flags.DEFINE_string("out_dir", None, "output dir (default results/uncertainty_robustness/<dataset>)")
FLAGS = flags.FLAGS

CHECKPOINTS = {  # defence -> checkpoint; epistemic = MC-dropout on the deterministic network's weights
    "mnist": {"none": "mnist_basic_cnn", "epistemic": "mnist_basic_cnn", "aleatoric": "mnist_basic_cnn_hetero"},
    "cifar10": {"none": "cifar10_allconv", "epistemic": "cifar10_allconv", "aleatoric": "cifar10_allconv_hetero"},
}
DEFAULT_ATTACKS = {"mnist": ["fgsm", "cw_l2", "jsma", "blackbox"], "cifar10": ["fgsm"]}
DEFAULT_EPS = {"mnist": 0.3, "cifar10": 8 / 255}
DEFAULT_SWEEP = {"mnist": [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3],
                 "cifar10": [0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255]}
# The deck's numbers (%, None / Epistemic / Aleatoric). Metric: "adv" = adversarial accuracy, "fool" = fooling rate.
DECK = {
    "mnist": {"clean": ("acc", {"none": "99.37", "epistemic": "98.50", "aleatoric": "99.35"}),
              "fgsm": ("adv", {"none": "9.96", "epistemic": "22.92", "aleatoric": "8.75"}),
              "cw_l2": ("fool", {"none": "99–100", "epistemic": "30–37", "aleatoric": "67–80"}),
              "jsma": ("fool", {"none": "89–92", "epistemic": "22–27", "aleatoric": "73–81"}),
              "blackbox": ("adv", {"none": "67.78", "epistemic": "63.29", "aleatoric": "62.08"})},
    "cifar10": {"clean": ("acc", {"none": "77.84", "epistemic": "76.28", "aleatoric": "78.00"}),
                "fgsm": ("adv", {"none": "9.98", "epistemic": "12.44", "aleatoric": "10.38"})},
}
# Which uncertainty score each defence would use to flag inputs (all scores are saved).
MAIN_SCORE = {"none": "predictive_entropy", "epistemic": "mutual_information", "aleatoric": "aleatoric_variance"}


@dataclasses.dataclass
class Defence:
    """A defended classifier: a stochastic predictive and the logits each protocol attacks."""

    name: str
    checkpoint: str
    model: object  # checkpoints.Classifier
    probs: Callable  # jitted (variables, x, key) -> (softmax samples (T, B, C), log_var (B, C) or None)
    attacked: dict[str, Callable]  # protocol -> (variables -> logits_fn for the attacks)
    stochastic_fn: Callable | None  # (variables) -> (key, x) -> logits, for the diagnostics


def make_defence(name: str, checkpoint: str, mc_samples: int, eot_samples: int) -> Defence:
    import jax

    from robust_jax import attacks, checkpoints, uncertainty
    from robust_jax.models import logits_of

    m = checkpoints.load(checkpoint)
    apply = m.apply
    if name == "none":
        probs = lambda v, x, k: (jax.nn.softmax(logits_of(apply(v, x)), -1)[None], None)
        det = lambda v: (lambda x: logits_of(apply(v, x)))
        return Defence(name, checkpoint, m, jax.jit(probs), {"deck": det, "adaptive": det}, None)
    if name == "epistemic":
        sample = lambda v: uncertainty.mc_dropout_logits_fn(apply, v)
        probs = lambda v, x, k: (uncertainty.mc_dropout_probs(apply, v, x, k, mc_samples), None)
        attacked = {"deck": lambda v: attacks.eot(sample(v), 1),
                    "adaptive": lambda v: attacks.eot(sample(v), eot_samples)}
        return Defence(name, checkpoint, m, jax.jit(probs), attacked, sample)
    if name == "aleatoric":
        if not m.card["architecture"].get("hetero"):
            raise ValueError(f"aleatoric defence needs a heteroscedastic checkpoint; {checkpoint} is not one")

        def probs(v, x, k):
            outputs = apply(v, x)
            return uncertainty.hetero_probs(outputs, k, mc_samples), outputs[1]

        sample = lambda v: (lambda k, x: uncertainty.hetero_samples(apply(v, x), k, 1)[0])
        attacked = {"deck": lambda v: (lambda x: logits_of(apply(v, x))),
                    "adaptive": lambda v: attacks.eot(sample(v), eot_samples)}
        return Defence(name, checkpoint, m, jax.jit(probs), attacked, sample)
    raise ValueError(f"unknown defence {name!r}; use none, epistemic or aleatoric")


def predictive(defence: Defence, x, key, batch_size: int = 500):
    """(log mean softmax (N, C), uncertainty scores {name: (N,)}) of the defended prediction, in batches."""
    import jax
    import numpy as np

    from robust_jax import sharding, uncertainty

    def fn(xb):
        p, log_var = defence.probs(defence.model.variables, xb, key)
        s = uncertainty.scores(p, log_var)
        return jax.numpy.log(jax.numpy.clip(p.mean(0), 1e-30)), s

    logp, s = sharding.run_sharded(fn, np.asarray(x, np.float32), batch_size=batch_size)
    return logp, s


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax
    import numpy as np

    from robust_jax import attacks, data, evaluate, metrics, plotting

    t_start = time.time()
    ds = FLAGS.dataset
    if ds not in CHECKPOINTS:
        raise app.UsageError(f"--dataset must be one of {sorted(CHECKPOINTS)}")
    names = FLAGS.attacks or DEFAULT_ATTACKS[ds]
    unknown = set(names) - {"fgsm", "cw_l2", "jsma", "blackbox"}
    if unknown:
        raise app.UsageError(f"unknown attacks {sorted(unknown)}; use fgsm, cw_l2, jsma, blackbox")
    eps = FLAGS.eps if FLAGS.eps is not None else DEFAULT_EPS[ds]
    sweep = [float(e) for e in FLAGS.eps_sweep] if FLAGS.eps_sweep else DEFAULT_SWEEP[ds]
    out = Path(FLAGS.out_dir or f"results/uncertainty_robustness/{ds}")
    out.mkdir(parents=True, exist_ok=True)
    cfg = evaluate.AttackConfig(eps=eps, cw_steps=FLAGS.cw_steps, cw_binary_search_steps=FLAGS.cw_binary_search_steps,
                                blackbox_rounds=FLAGS.blackbox_rounds, batch_size=FLAGS.batch_size)
    test = data.splits(ds)["test"]
    h, n = cfg.blackbox_holdout, FLAGS.num_examples
    x_hold, _ = data.load(ds, f"{test}[:{h}]", data_dir=FLAGS.data_dir)
    x, y = data.load(ds, f"{test}[{h}:{h + n}]", data_dir=FLAGS.data_dir)
    x, x_hold = data.to_float(x), data.to_float(x_hold)
    n_slow = min(FLAGS.num_examples_slow, len(x))
    key = jax.random.PRNGKey(FLAGS.seed)
    print(f"uncertainty_robustness: {ds}, defences {FLAGS.defences}, attacks {names}, protocols {FLAGS.protocols}, "
          f"N={len(x)} (cw/jsma N={n_slow}), eps={eps:.4f}, T={FLAGS.mc_samples}, EOT S={FLAGS.eot_samples}, "
          f"seed={FLAGS.seed}, devices={jax.device_count()}")

    rows, sweeps, uncertainty_scores, warnings = [], {}, {}, {}
    correct_adv = {}  # (defence, attack, protocol) -> per-example correctness of the defended prediction
    for d_i, dname in enumerate(FLAGS.defences):
        defence = make_defence(dname, CHECKPOINTS[ds][dname], FLAGS.mc_samples, FLAGS.eot_samples)
        pred_key = jax.random.fold_in(key, 1000 + d_i)
        predict = lambda z, defence=defence, pred_key=pred_key: predictive(defence, z, pred_key)[0]
        clean_logp, clean_scores = predictive(defence, x, pred_key)
        uncertainty_scores[dname] = {"clean": {k: np.asarray(v) for k, v in clean_scores.items()}}
        for p_i, protocol in enumerate(FLAGS.protocols):
            deterministic = dname == "none"
            builder = defence.attacked[protocol]
            for a_i, attack in enumerate(names):
                same = (deterministic and protocol == "adaptive") or (attack == "blackbox" and protocol == "adaptive")
                if same and "deck" in FLAGS.protocols:
                    prev = next(r for r in rows if r["defence"] == dname and r["attack"] == attack
                                and r["protocol"] == "deck")
                    rows.append({**prev, "protocol": "adaptive", "same_as_deck": True})
                    correct_adv[dname, attack, "adaptive"] = correct_adv[dname, attack, "deck"]
                    continue
                n_a = n_slow if attack in ("cw_l2", "jsma") else len(x)
                adaptive = protocol == "adaptive"
                a_cfg = dataclasses.replace(cfg, eot_samples=FLAGS.eot_samples if adaptive else 0,
                                            cw_confidence=FLAGS.adaptive_cw_confidence if adaptive else 0.0)
                t0 = time.time()
                (row,) = evaluate.evaluate_attacks(
                    [attack], predict, defence.model.variables, x[:n_a], y[:n_a],
                    key=jax.random.fold_in(key, 100 * a_i + 10 * p_i + d_i), cfg=a_cfg, logits_builder=builder,
                    x_holdout=x_hold, progress=True,
                    stochastic_fn=defence.stochastic_fn(defence.model.variables) if defence.stochastic_fn else None,
                    return_adversarials=True)
                x_adv = row.pop("x_adv")
                adv_logp, adv_scores = predictive(defence, x_adv, pred_key)
                correct_adv[dname, attack, protocol] = np.asarray(adv_logp).argmax(-1) == y[:n_a]
                uncertainty_scores[dname][f"{attack}_{protocol}"] = {k: np.asarray(v) for k, v in adv_scores.items()}
                row.update(dataset=ds, defence=dname, protocol=protocol, checkpoint=defence.checkpoint,
                           seed=FLAGS.seed, eps=cfg.eps if attack in ("fgsm", "blackbox") else None,
                           mc_samples=FLAGS.mc_samples if dname != "none" else 1,
                           eot_samples=FLAGS.eot_samples if protocol == "adaptive" and dname != "none" else 0,
                           cw_confidence=a_cfg.cw_confidence if attack == "cw_l2" else None, same_as_deck=False)
                warnings[f"{dname}/{protocol}"] = row["warnings"]
                rows.append(row)
                print(f"  {dname:9s} {protocol:8s} {attack:8s} n={row['n']:5d} clean {100 * row['accuracy']:6.2f}% "
                      f"adv {100 * row['adversarial_accuracy']:6.2f}% fooling {100 * row['fooling_rate']:6.2f}% "
                      f"({time.time() - t0:.0f} s)", flush=True)
            # FGSM eps sweep (accuracy of the defended prediction vs eps)
            if "fgsm" in names and (protocol == "deck" or not deterministic):
                accs = []
                for e in sweep:
                    if e == 0:
                        accs.append(metrics.accuracy(clean_logp.argmax(-1), y))
                        continue
                    fn = lambda v, xb, yb, k, e=e, builder=builder: attacks.fgsm(builder(v), xb, yb, eps=e)
                    xa = attacks.run_attack(fn, defence.model.variables, x, y, key=key, batch_size=cfg.batch_size,
                                            progress=False)
                    accs.append(metrics.accuracy(predict(xa).argmax(-1), y))
                sweeps[f"{dname} ({protocol})"] = accs
        print(f"{dname}: done at {time.time() - t_start:.0f} s", flush=True)

    # the attacker may use either protocol: an example counts as robust only if it survives both
    worst_case = [{"defence": d, "attack": a, "n": int(len(c)),
                   "adversarial_accuracy": float(np.mean(c & correct_adv.get((d, a, "adaptive"), c)))}
                  for (d, a, p), c in correct_adv.items() if p == "deck"]

    # ---------------------------------------------------------------------- detection by uncertainty (AUROC)
    detection = []
    for dname, per in uncertainty_scores.items():
        for setting, s in per.items():
            if setting == "clean":
                continue
            attack, protocol = setting.rsplit("_", 1)
            n_a = len(next(iter(s.values())))
            for score, adv in s.items():
                clean = per["clean"][score][:n_a]
                sc = np.concatenate([clean, adv])
                sign = -1.0 if score == "max_probability" else 1.0  # low confidence = uncertain
                lab = np.concatenate([np.zeros(n_a), np.ones(n_a)])
                detection.append({"defence": dname, "attack": attack, "protocol": protocol, "score": score,
                                  "auroc": metrics.auroc(sign * sc, lab), "n": int(n_a)})

    # ----------------------------------------------------------------------------------------------- figures
    figures = []
    if sweeps:
        figures.append(plotting.lines([round(e, 4) for e in sweep], {k: 100 * np.asarray(v) for k, v in sweeps.items()},
                                      out / "fgsm_accuracy_vs_eps.png", xlabel="FGSM eps (Linf, pixels in [0, 1])",
                                      ylabel="accuracy of the defended prediction (%)",
                                      title=f"{ds}: FGSM accuracy vs eps per defence").name)
    main_attack = names[0]
    for dname, per in uncertainty_scores.items():
        score = MAIN_SCORE[dname]
        series = {"clean": per["clean"][score]}
        for setting, s in per.items():
            if setting != "clean" and setting.startswith(main_attack):
                series[setting] = s[score]
        figures.append(plotting.histograms(series, out / f"uncertainty_hist_{dname}.png", xlabel=score,
                                           title=f"{ds}, {dname}: {score}, clean vs {main_attack}").name)
        curves = {}
        for sname in ("predictive_entropy", "mutual_information", "aleatoric_variance"):
            if sname not in per["clean"]:
                continue
            for setting, s in per.items():
                if setting == "clean" or not setting.endswith("adaptive" if dname != "none" else "deck"):
                    continue
                n_a = len(s[sname])
                sc = np.concatenate([per["clean"][sname][:n_a], s[sname]])
                lab = np.concatenate([np.zeros(n_a), np.ones(n_a)])
                fpr, tpr, _ = metrics.roc_curve(sc, lab)
                curves[f"{sname}, {setting}"] = (fpr, tpr, metrics.auroc(sc, lab))
        if curves:
            figures.append(plotting.roc_curves(curves, out / f"uncertainty_roc_{dname}.png",
                                               title=f"{ds}, {dname}: detecting adversarials by uncertainty").name)

    # ------------------------------------------------------------------------------------------------ output
    seconds = time.time() - t_start
    result = {"dataset": ds, "seed": FLAGS.seed, "eps": eps, "mc_samples": FLAGS.mc_samples,
              "eot_samples": FLAGS.eot_samples, "num_examples": len(x), "num_examples_slow": n_slow,
              "checkpoints": {d: CHECKPOINTS[ds][d] for d in FLAGS.defences}, "attack_config": dataclasses.asdict(cfg),
              "rows": rows, "worst_case": worst_case, "eps_sweep": {"eps": sweep, "accuracy": sweeps},
              "detection": detection,
              "deck": {k: {"metric": v[0], **v[1]} for k, v in DECK[ds].items()}, "figures": figures,
              "warnings": warnings, "seconds": seconds}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float))
    md = markdown(ds, rows, detection, eps, n_slow, len(x), seconds, worst_case)
    (out / "results.md").write_text(md)
    print(md)


def markdown(ds, rows, detection, eps, n_slow, n, seconds, worst_case=()) -> str:
    pct = lambda v: "—" if v is None else f"{100 * v:.2f}"  # noqa: E731
    defences = list(dict.fromkeys(r["defence"] for r in rows))
    lines = [f"# Uncertainty vs. attacks — {ds}", "",
             f"N = {n} test images (CW-L2 and JSMA: first {n_slow}); FGSM / black-box eps = {eps:.4f}. "
             "`deck` = attack as in the deck (one stochastic pass per gradient / the mean logits); "
             "`adaptive` = EOT over the defence's randomness (CW-L2 with a confidence margin). Values in %. "
             "Last column: adversarial accuracy when the attacker uses whichever protocol fools each example.", "",
             "| defence | metric | deck | ours (deck protocol) | ours (adaptive) | ours (worst case, adv. acc.) |",
             "|---|---|---|---|---|---|"]
    worst = {(w["defence"], w["attack"]): w["adversarial_accuracy"] for w in worst_case}
    deck = DECK[ds]
    for d in defences:
        first = next(r for r in rows if r["defence"] == d)
        lines.append(f"| {d} | clean accuracy | {deck['clean'][1].get(d, '—')} | {pct(first['accuracy'])} | "
                     f"{pct(first['accuracy'])} | |")
        for attack in dict.fromkeys(r["attack"] for r in rows):
            metric, values = deck.get(attack, ("adv" if attack in ("fgsm", "blackbox") else "fool", {}))
            key = "adversarial_accuracy" if metric == "adv" else "fooling_rate"
            label = f"{attack} {'adv. accuracy' if metric == 'adv' else 'fooling rate'}"
            got = {r["protocol"]: r for r in rows if r["defence"] == d and r["attack"] == attack}
            cells = [pct(got[p][key]) + (" (=deck)" if got[p].get("same_as_deck") else "") if p in got else "—"
                     for p in ("deck", "adaptive")]
            lines.append(f"| {d} | {label} | {values.get(d, '—')} | {cells[0]} | {cells[1]} | "
                         f"{pct(worst.get((d, attack)))} |")
    lines += ["", "Detection of adversarial inputs by uncertainty (AUROC, clean vs adversarial; adaptive protocol, "
              "deck protocol where the attack has no adaptive form; — where a score does not apply):",
              "",
              "| defence | attack | predictive entropy | mutual information | aleatoric variance |",
              "|---|---|---|---|---|"]
    for d in defences:
        for attack in dict.fromkeys(x["attack"] for x in detection if x["defence"] == d):
            got = {p: {x["score"]: x["auroc"] for x in detection
                       if x["defence"] == d and x["attack"] == attack and x["protocol"] == p}
                   for p in ("deck", "adaptive")}
            get = got["adaptive"] or got["deck"]
            if d == "none":  # a deterministic network has no mutual information (it is 0 for every input)
                get.pop("mutual_information", None)
            cell = lambda s, get=get: f"{get[s]:.3f}" if s in get else "—"  # noqa: E731
            lines.append(f"| {d} | {attack} | {cell('predictive_entropy')} | {cell('mutual_information')} | "
                         f"{cell('aleatoric_variance')} |")
    lines += ["", f"Run time {seconds:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
