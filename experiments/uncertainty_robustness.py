"""Can uncertainty estimates mitigate adversarial attacks? (the uncertainty study; README, "the original study")

    python -m experiments.uncertainty_robustness --dataset=mnist      # BasicCNN: fgsm, cw_l2, jsma, blackbox
    python -m experiments.uncertainty_robustness --dataset=cifar10    # AllConvNet: fgsm

The defaults are sized so the MNIST run finishes within 15 minutes on 2 CPU cores (9.5 min on a quiet 2-core host,
benchmarks/README.md; FGSM and black-box on 500 test images, CW-L2 and JSMA on the first 50, CW
with 3 binary-search steps of 100 Adam steps: it fools 100% of the undefended network's correctly classified images,
where 3 x 50 steps fooled 96%).
``results/uncertainty_robustness/mnist`` is this default run (re-run on a loaded host, hence its longer run time);
``results/uncertainty_robustness/mnist_reference`` (earlier attack code) was run with
``--num_examples_slow=100 --cw_steps=100 --cw_binary_search_steps=5``.

Defences: ``none`` (deterministic network), ``epistemic`` (MC-dropout: the same dropout-trained network, mean
softmax of T masks), ``aleatoric`` (heteroscedastic head, Kendall & Gal 2017: mean softmax of T logit samples
μ + σ·ε). Every defence is attacked two ways:

- ``single_pass`` (the original study's protocol): as a CleverHans user would have: the attack differentiates one
  forward pass per gradient step (for MC-dropout a fresh dropout mask each step; for the aleatoric head its mean
  logits μ).
- ``adaptive``: EOT (Athalye et al. 2018) over S dropout masks / logit-noise draws per step, and CW-L2 with a
  confidence margin (``--adaptive_cw_confidence``; Carlini & Wagner 2017 broke MC-dropout detection this way) — the
  honest number.

The deterministic model and the black-box attack (labels only) have no randomness to adapt to: their adaptive
rows repeat the single-pass rows (marked ``"same_as_single_pass": true``). Accuracy is always that of the defended
prediction, computed with the f32 evaluation kernels, as are the uncertainty scores; FGSM differentiates the
checkpoint with the attack kernels of --conv_impl, CW-L2 and JSMA (which stop at the decision boundary) the
evaluation kernels (``evaluate.BOUNDARY_ATTACKS``).
Writes results.json ({"rows": [...]}), results.md and PNG figures to --out_dir.
"""

from __future__ import annotations

import dataclasses
import json
import time
import types

from absl import flags

from experiments import cli
from robust_jax.evaluate import DEFENCES, PROTOCOLS

ATTACKS = ("fgsm", "cw_l2", "jsma", "blackbox")
CHECKPOINTS = {  # defence -> checkpoint; epistemic = MC-dropout on the deterministic network's weights
    "mnist": {"none": "mnist_basic_cnn", "epistemic": "mnist_basic_cnn", "aleatoric": "mnist_basic_cnn_hetero"},
    "cifar10": {"none": "cifar10_allconv", "epistemic": "cifar10_allconv", "aleatoric": "cifar10_allconv_hetero"},
}
DEFAULT_ATTACKS = {"mnist": ["fgsm", "cw_l2", "jsma", "blackbox"], "cifar10": ["fgsm"]}
DEFAULT_EPS = {"mnist": 0.3, "cifar10": 8 / 255}
DEFAULT_SWEEP = {"mnist": [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3],
                 "cifar10": [0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255]}

cli.dataset("mnist", CHECKPOINTS, "dataset (and its checkpoints: " + "; ".join(
    f"{d}: {', '.join(sorted(set(c.values())))}" for d, c in CHECKPOINTS.items()) + ")")
cli.names("attacks", None, ATTACKS, "attacks (default: fgsm,cw_l2,jsma,blackbox on mnist; fgsm on cifar10)")
cli.names("defences", list(DEFENCES), DEFENCES, "defences")
cli.names("protocols", list(PROTOCOLS), PROTOCOLS, "attack protocols")
cli.count("num_examples", 500, "N test examples for fgsm and blackbox (the reference runs: 1000)")
cli.count("num_examples_slow", 50, "N test examples for cw_l2 and jsma (the first of the N above)")
cli.eps("eps", None, "FGSM / black-box Linf budget (default per --dataset: 0.3 mnist, 8/255 cifar10)")
cli.eps_list("eps_sweep", None, "FGSM budgets for the accuracy-vs-eps figure (default per --dataset: mnist "
             "0,0.05,...,0.3; cifar10 0,1/255,2/255,4/255,8/255,16/255)")
cli.count("mc_samples", 20, "T: dropout masks / logit samples in each defended prediction")
cli.count("eot_samples", 8, "S: samples per gradient step of the adaptive (EOT) attacks")
cli.count("cw_steps", 100, "CW-L2 Adam steps per binary-search step")
cli.count("cw_binary_search_steps", 3, "CW-L2 binary-search steps")
flags.DEFINE_float("adaptive_cw_confidence", 5.0,
                   "CW-L2 confidence margin kappa (logits) of the adaptive protocol; the single-pass protocol uses 0. "
                   "A minimal (kappa=0) example sits on the decision boundary, where a stochastic predictive flips "
                   "back at random: the adaptive attacker asks for a margin on every EOT sample", lower_bound=0.0)
cli.count("blackbox_rounds", 6, "substitute training rounds (Jacobian augmentation)")
cli.conv_impl()
cli.batch_size(250, "attack batch size")
cli.seed()
cli.data_dir()
cli.out_dir("uncertainty_robustness")
cli.validate(["dataset", "defences"], lambda v: next(filter(None, (cli.checkpoint_problem(
    v["dataset"], CHECKPOINTS[v["dataset"]][d], f"--defences={d} on --dataset={v['dataset']} needs checkpoint "
    f"{CHECKPOINTS[v['dataset']][d]}") for d in v["defences"])), None))
FLAGS = flags.FLAGS

# The original study's numbers (%, None / Epistemic / Aleatoric).
# Metric: "adv" = adversarial accuracy, "fool" = fooling rate.
ORIGINAL_STUDY = {
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
SLOW = ("cw_l2", "jsma")  # run on the first --num_examples_slow images


def settings() -> types.SimpleNamespace:
    """The validated flags with the per-dataset defaults filled in."""
    from robust_jax import evaluate

    ds = FLAGS.dataset
    eps = FLAGS.eps if FLAGS.eps is not None else DEFAULT_EPS[ds]
    cfg = evaluate.AttackConfig(eps=eps, cw_steps=FLAGS.cw_steps, cw_binary_search_steps=FLAGS.cw_binary_search_steps,
                                blackbox_rounds=FLAGS.blackbox_rounds, batch_size=FLAGS.batch_size)
    return types.SimpleNamespace(dataset=ds, attacks=FLAGS.attacks or DEFAULT_ATTACKS[ds], eps=eps, cfg=cfg,
                                 sweep=FLAGS.eps_sweep if FLAGS.eps_sweep is not None else DEFAULT_SWEEP[ds])


def main(argv):
    del argv
    import jax
    import numpy as np

    from robust_jax import checkpoints, data, metrics

    started = time.time()
    s = settings()
    test, h, n = data.splits(s.dataset)["test"], s.cfg.blackbox_holdout, FLAGS.num_examples
    x_hold, _ = data.load(s.dataset, f"{test}[:{h}]", data_dir=FLAGS.data_dir)
    x, y = data.load(s.dataset, f"{test}[{h}:{h + n}]", data_dir=FLAGS.data_dir)
    x, x_hold = data.to_float(x), data.to_float(x_hold)
    s.n, s.n_slow = len(x), min(FLAGS.num_examples_slow, len(x))
    key = jax.random.PRNGKey(FLAGS.seed)
    cli.say(f"uncertainty_robustness: {s.dataset}, defences {FLAGS.defences}, attacks {s.attacks}, protocols "
            f"{FLAGS.protocols}, N={s.n} (cw/jsma N={s.n_slow}), eps={_eps(s.eps)}, T={FLAGS.mc_samples}, "
            f"EOT S={FLAGS.eot_samples}, seed={FLAGS.seed}, devices={jax.device_count()}")

    study = types.SimpleNamespace(rows=[], sweeps={}, scores={}, correct={}, warnings={}, conv={})
    for d_i, name in enumerate(FLAGS.defences):
        defence = make_defence(name, checkpoints.load(CHECKPOINTS[s.dataset][name]), FLAGS.conv_impl)
        study.conv = cli.kernels(defence.model, defence.attack_model)  # the same on every checkpoint of the host
        attack_defence(defence, d_i, s, x, y, x_hold, key, study)
        cli.say(f"{name}: done at {time.time() - started:.0f} s")
    # the attacker may use either protocol: an example counts as robust only if it survives both
    worst_case = [{"defence": d, "attack": a, "n": int(len(c)),
                   "adversarial_accuracy": float(np.mean(c & study.correct.get((d, a, "adaptive"), c)))}
                  for (d, a, p), c in study.correct.items() if p == "single_pass"]
    detection = [{"defence": d, "attack": setting.rsplit("/", 1)[0], "protocol": setting.rsplit("/", 1)[1],
                  "score": score, "auroc": auroc, "n": int(len(next(iter(adv.values()))))}
                 for d, per in study.scores.items() for setting, adv in per.items() if setting != "clean"
                 for score, auroc in metrics.score_aurocs(per["clean"], adv).items()]

    out = cli.output_folder(FLAGS.out_dir, f"results/uncertainty_robustness/{s.dataset}")
    figures = make_figures(s, study, out)
    seconds = time.time() - started
    result = {"dataset": s.dataset, "seed": FLAGS.seed, "conv_impl": study.conv, "eps": s.eps,
              "mc_samples": FLAGS.mc_samples,
              "eot_samples": FLAGS.eot_samples, "num_examples": s.n, "num_examples_slow": s.n_slow,
              "checkpoints": {d: CHECKPOINTS[s.dataset][d] for d in FLAGS.defences},
              "attack_config": dataclasses.asdict(s.cfg), "rows": study.rows, "worst_case": worst_case,
              "eps_sweep": {"eps": s.sweep, "accuracy": study.sweeps}, "detection": detection,
              "original_study": {k: {"metric": v[0], **v[1]} for k, v in ORIGINAL_STUDY[s.dataset].items()},
              "figures": figures,
              "warnings": study.warnings, "seconds": seconds}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float))
    (out / "results.md").write_text(markdown(s.dataset, study.rows, detection, s.eps, s.n_slow, s.n, seconds,
                                             worst_case, study.conv))
    cli.finish(out, summary(study.rows, worst_case), started=started, files=["results.md", "results.json", *figures])


def make_defence(name: str, m, conv_impl: str):
    """The defence `name` (``evaluate.DEFENCES``) of checkpoint `m` (loaded with the f32 evaluation kernels: the
    defended prediction and its uncertainty scores), attacked through ``m.for_use("attack", conv_impl)``."""
    from robust_jax import evaluate

    return evaluate.Defence(name, m, FLAGS.mc_samples, FLAGS.eot_samples,
                            attack_model=m.for_use("attack", conv_impl))


def attack_defence(defence, d_i, s, x, y, x_hold, key, study) -> None:
    """Every attack of every protocol against one defence: rows, uncertainty scores of the defended prediction on
    the adversarial examples, per-example correctness, and the FGSM eps sweep (appended to `study`). The attacks
    differentiate ``defence.attacked(protocol)`` (its attack model), the boundary attacks
    (``evaluate.BOUNDARY_ATTACKS``) the same defence through its evaluation model; every prediction and score is the
    defence's (evaluation model). Each row records the kernels its attack differentiated (``conv_impl``)."""
    import jax
    import numpy as np

    from robust_jax import evaluate

    name, deterministic = defence.kind, defence.kind == "none"
    exact = dataclasses.replace(defence, attack_model=None)  # attacked through the evaluation model
    pred_key = jax.random.fold_in(key, 1000 + d_i)
    predict = lambda z: defence.predict(z, pred_key)  # noqa: E731
    clean_logp, clean_scores = defence.predictive(x, pred_key)
    study.scores[name] = {"clean": {k: np.asarray(v) for k, v in clean_scores.items()}}
    for p_i, protocol in enumerate(FLAGS.protocols):
        for a_i, attack in enumerate(s.attacks):
            if protocol == "adaptive" and (deterministic or attack == "blackbox") and "single_pass" in FLAGS.protocols:
                # nothing to adapt to (no randomness / labels only): the adaptive row repeats the single-pass row
                prev = next(r for r in study.rows
                            if (r["defence"], r["attack"], r["protocol"]) == (name, attack, "single_pass"))
                study.rows.append({**prev, "protocol": "adaptive", "same_as_single_pass": True})
                study.correct[name, attack, "adaptive"] = study.correct[name, attack, "single_pass"]
                continue
            n_a = s.n_slow if attack in SLOW else s.n
            adaptive = protocol == "adaptive"
            cfg = dataclasses.replace(s.cfg, eot_samples=FLAGS.eot_samples if adaptive else 0,
                                      cw_confidence=FLAGS.adaptive_cw_confidence if adaptive else 0.0)
            t0 = time.time()
            (row,) = evaluate.evaluate_attacks(
                [attack], predict, defence.variables, x[:n_a], y[:n_a],
                key=jax.random.fold_in(key, 100 * a_i + 10 * p_i + d_i), cfg=cfg,
                logits_builder=defence.attacked(protocol), boundary_logits_builder=exact.attacked(protocol),
                x_holdout=x_hold,
                stochastic_fn=defence.sample_fn(defence.variables), return_adversarials=True)
            adv_logp, adv_scores = defence.predictive(row.pop("x_adv"), pred_key)
            study.correct[name, attack, protocol] = np.asarray(adv_logp).argmax(-1) == y[:n_a]
            study.scores[name][f"{attack}/{protocol}"] = {k: np.asarray(v) for k, v in adv_scores.items()}
            row.update(dataset=s.dataset, defence=name, protocol=protocol, checkpoint=CHECKPOINTS[s.dataset][name],
                       seed=FLAGS.seed, eps=s.eps if attack in ("fgsm", "blackbox") else None,
                       mc_samples=FLAGS.mc_samples if not deterministic else 1,
                       eot_samples=FLAGS.eot_samples if adaptive and not deterministic else 0,
                       cw_confidence=cfg.cw_confidence if attack == "cw_l2" else None, same_as_single_pass=False,
                       conv_impl=cli.attacked_kernels(attack, defence.model, defence.attack_model or defence.model))
            study.warnings[f"{name}/{protocol}"] = row["warnings"]
            study.rows.append(row)
            cli.say(f"  {name:9s} {protocol:8s} {attack:8s} n={row['n']:5d} clean {100 * row['accuracy']:6.2f}% "
                    f"adv {100 * row['adversarial_accuracy']:6.2f}% fooling {100 * row['fooling_rate']:6.2f}% "
                    f"({time.time() - t0:.0f} s)")
        if "fgsm" in s.attacks and (protocol == "single_pass" or not deterministic):
            study.sweeps[f"{name} ({protocol})"] = fgsm_sweep(defence, protocol, s, x, y, key, clean_logp, predict)


def fgsm_sweep(defence, protocol, s, x, y, key, clean_logp, predict) -> list[float]:
    """Accuracy of the defended prediction under FGSM at each budget of the sweep: one compiled attack for all
    budgets (an eps array; its leading axis moved behind the batch so that chunks stay per example)."""
    import jax.numpy as jnp

    from robust_jax import attacks, metrics, runner

    budgets = [e for e in s.sweep if e > 0]
    acc = {0.0: metrics.accuracy(clean_logp.argmax(-1), y)}
    if budgets:
        builder = defence.attacked(protocol)
        fn = lambda v, xb, yb, k: jnp.moveaxis(attacks.fgsm(builder(v), xb, yb, key=k,  # noqa: E731
                                                            eps=jnp.asarray(budgets, jnp.float32)), 0, 1)
        # the same chunks (and per-chunk keys) as one call per budget: the same adversarial examples
        xa = runner.run_attack(fn, defence.variables, x, y, key=key, batch_size=s.cfg.batch_size, progress=False)
        acc.update({e: metrics.accuracy(predict(xa[:, i]).argmax(-1), y) for i, e in enumerate(budgets)})
    return [acc[e] if e > 0 else acc[0.0] for e in s.sweep]


def make_figures(s, study, out) -> list[str]:
    """FGSM accuracy vs eps, and per defence the histogram of its main uncertainty score and detection ROCs."""
    import numpy as np

    from robust_jax import metrics, plotting

    ds, files = s.dataset, []
    if study.sweeps:
        files.append(plotting.lines(
            list(range(len(s.sweep))), {k: 100 * np.asarray(v) for k, v in study.sweeps.items()},
            out / "fgsm_accuracy_vs_eps.png", xlabel="FGSM eps (Linf, pixels in [0, 1])",
            ylabel="accuracy of the defended prediction (%)", xticklabels=[_eps(e) for e in s.sweep],
            title=f"{ds}, N={s.n}: FGSM accuracy vs eps per defence (protocol)"))
    main_attack = s.attacks[0]
    for name, per in study.scores.items():
        score = MAIN_SCORE[name]
        series = {"clean": per["clean"][score], **{k: v[score] for k, v in per.items()
                                                    if k != "clean" and k.startswith(main_attack)}}
        n_main = s.n_slow if main_attack in SLOW else s.n
        files.append(plotting.histograms(series, out / f"uncertainty_hist_{name}.png", xlabel=score,
                                         title=f"{ds}, {name}, N={n_main}: {score}, clean vs {main_attack}"))
        curves = {}
        for sname in ("predictive_entropy", "mutual_information", "aleatoric_variance"):
            for setting, adv in per.items():
                if sname in per["clean"] and setting != "clean" and setting.endswith(
                        "adaptive" if name != "none" else "single_pass"):
                    sc, lab = metrics.stack_scores(per["clean"][sname][:len(adv[sname])], adv[sname])
                    fpr, tpr, _ = metrics.roc_curve(sc, lab)
                    curves[f"{sname}, {setting} (N={len(adv[sname])})"] = (fpr, tpr, metrics.auroc(sc, lab))
        if curves:
            files.append(plotting.roc_curves(curves, out / f"uncertainty_roc_{name}.png",
                                             title=f"{ds}, {name}: detecting adversarials by uncertainty (N clean + N "
                                                   "adversarial per curve)"))
    return [f.name for f in files]


def _eps(v) -> str:
    from robust_jax.plotting import eps_label

    return eps_label(v)


def summary(rows, worst_case) -> list[str]:
    """Per defence and attack: the headline metric under the stronger protocol (printed at the end)."""
    worst = {(w["defence"], w["attack"]): w["adversarial_accuracy"] for w in worst_case}
    lines = []
    for (d, a), acc in worst.items():
        fool = [r["fooling_rate"] for r in rows if r["defence"] == d and r["attack"] == a]
        lines.append(f"{d:9s} {a:8s}: adversarial accuracy {100 * acc:5.1f}% (worst case over protocols), "
                     f"fooling rate up to {100 * max(fool):5.1f}%")
    return lines


def markdown(ds, rows, detection, eps, n_slow, n, seconds, worst_case=(), conv=None) -> str:
    pct = lambda v: "—" if v is None else f"{100 * v:.2f}"  # noqa: E731
    defences = list(dict.fromkeys(r["defence"] for r in rows))
    lines = [f"# Uncertainty vs. attacks — {ds}", "",
             f"N = {n} test images (CW-L2 and JSMA: first {n_slow}); FGSM / black-box eps = {_eps(eps)}. "
             "`single_pass` = the original study's protocol (one stochastic pass per gradient / the mean logits); "
             "`adaptive` = EOT over the defence's randomness (CW-L2 with a confidence margin). Values in %. "
             "Last column: adversarial accuracy when the attacker uses whichever protocol fools each example."
             + (cli.conv_note(conv, dict.fromkeys(r["attack"] for r in rows)) if conv else ""), "",
             "| defence | metric | original study | ours (single pass) | ours (adaptive) "
             "| ours (worst case, adv. acc.) |",
             "|---|---|---|---|---|---|"]
    worst = {(w["defence"], w["attack"]): w["adversarial_accuracy"] for w in worst_case}
    orig = ORIGINAL_STUDY[ds]
    for d in defences:
        first = next(r for r in rows if r["defence"] == d)
        lines.append(f"| {d} | clean accuracy | {orig['clean'][1].get(d, '—')} | {pct(first['accuracy'])} | "
                     f"{pct(first['accuracy'])} | |")
        for attack in dict.fromkeys(r["attack"] for r in rows):
            metric, values = orig.get(attack, ("adv" if attack in ("fgsm", "blackbox") else "fool", {}))
            key = "adversarial_accuracy" if metric == "adv" else "fooling_rate"
            label = f"{attack} {'adv. accuracy' if metric == 'adv' else 'fooling rate'}"
            got = {r["protocol"]: r for r in rows if r["defence"] == d and r["attack"] == attack}
            same = lambda r: " (=single pass)" if r.get("same_as_single_pass") else ""  # noqa: E731
            cells = [pct(got[p][key]) + same(got[p]) if p in got else "—" for p in PROTOCOLS]
            lines.append(f"| {d} | {label} | {values.get(d, '—')} | {cells[0]} | {cells[1]} | "
                         f"{pct(worst.get((d, attack)))} |")
    lines += ["", "Detection of adversarial inputs by uncertainty (AUROC, clean vs adversarial; adaptive protocol, "
              "single-pass protocol where the attack has no adaptive form; — where a score does not apply):",
              "",
              "| defence | attack | predictive entropy | mutual information | aleatoric variance |",
              "|---|---|---|---|---|"]
    for d in defences:
        for attack in dict.fromkeys(x["attack"] for x in detection if x["defence"] == d):
            got = {p: {x["score"]: x["auroc"] for x in detection
                       if x["defence"] == d and x["attack"] == attack and x["protocol"] == p}
                   for p in PROTOCOLS}
            get = got["adaptive"] or got["single_pass"]
            if d == "none":  # a deterministic network has no mutual information (it is 0 for every input)
                get.pop("mutual_information", None)
            cell = lambda s, get=get: f"{get[s]:.3f}" if s in get else "—"  # noqa: E731
            lines.append(f"| {d} | {attack} | {cell('predictive_entropy')} | {cell('mutual_information')} | "
                         f"{cell('aleatoric_variance')} |")
    lines += ["", f"Run time {seconds:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    cli.run(main)
