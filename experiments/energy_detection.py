"""Energy-based adversarial detection and its evasion by LE-PGD (the second deck's energy results).

    python -m experiments.energy_detection --dataset=cifar10            # ResNet-10 checkpoint, eps 8/255
    python -m experiments.energy_detection --dataset=mnist              # BasicCNN checkpoint, eps 0.3

Energy is ``E(x) = −T·logsumexp(logits/T)`` (see robust_jax/energy.py for the sign convention); the detector
flags ``−E >= threshold``. Temperature and threshold are fitted on validation data (clean ``train[45000:]`` vs
PGD on it) and applied unchanged to test data. Writes results.json, results.md and PNG figures to --out_dir.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from absl import app, flags, logging

flags.DEFINE_string("dataset", "cifar10", "cifar10 | mnist")
flags.DEFINE_string("checkpoint", None, "checkpoint name (default: cifar10_resnet10 / mnist_basic_cnn)")
flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR)")
flags.DEFINE_integer("num_examples", 500, "test examples (the first N of the test split)")
flags.DEFINE_integer("num_val", None, "validation examples for fitting the detector (default: num_examples)")
flags.DEFINE_float("eps", None, "Linf budget (default 8/255 for cifar10, 0.3 for mnist)")
flags.DEFINE_float("big_eps", None, "second, larger budget for PGD-50 (default 16/255 / 0.4)")
flags.DEFINE_float("step_size", None, "PGD step size (default eps/4)")
flags.DEFINE_list("steps", ["0", "5", "10", "20", "30", "50"], "PGD step counts for the energy curve")
flags.DEFINE_list("detector_steps", ["5", "10", "30", "50"], "PGD step counts for the detector table")
flags.DEFINE_integer("fixed_steps", 30, "the deployed detector is fitted on PGD with this many steps")
flags.DEFINE_list("lams", ["0.1", "0.3", "1", "3", "10"], "LE-PGD lambdas")
flags.DEFINE_integer("le_steps", 30, "LE-PGD steps")
flags.DEFINE_enum("threshold", "youden", ["youden", "fpr"], "threshold rule (fitted on validation)")
flags.DEFINE_float("target_fpr", 0.01, "target FPR for --threshold=fpr")
flags.DEFINE_integer("batch_size", 250, "attack batch size")
flags.DEFINE_integer("seed", 0, "PRNG seed for the attacks")
flags.DEFINE_string("out_dir", None, "output dir (default results/energy_detection/<dataset>)")
FLAGS = flags.FLAGS

DEFAULTS = {"cifar10": ("cifar10_resnet10", 8 / 255, 16 / 255), "mnist": ("mnist_basic_cnn", 0.3, 0.4)}
# The deck's detection table (CIFAR-10, ResNet-10): DR / FPR / FNR in %.
DECK = {"pgd5": (83, 19, 17), "pgd10": (93, 4, 7), "pgd30": (98, 1, 2), "pgd50": (98, 0.7, 2),
        "pgd50_big": (99, 0.02, 0.1)}
DECK_CONFUSION = {"TN": 98.78, "FP": 1.22, "FN": 2.14, "TP": 97.86, "accuracy_TN": 83.83}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax
    import numpy as np

    from robust_jax import attacks, checkpoints, data, energy, metrics, plotting

    t_start = time.time()
    ds = FLAGS.dataset
    if ds not in DEFAULTS:
        raise app.UsageError(f"--dataset must be one of {sorted(DEFAULTS)}")
    ckpt_name, eps_default, big_default = DEFAULTS[ds]
    ckpt_name = FLAGS.checkpoint or ckpt_name
    eps = FLAGS.eps if FLAGS.eps is not None else eps_default
    big_eps = FLAGS.big_eps if FLAGS.big_eps is not None else big_default
    step_size = FLAGS.step_size or eps / 4
    n, n_val = FLAGS.num_examples, FLAGS.num_val or FLAGS.num_examples
    out = Path(FLAGS.out_dir or f"results/energy_detection/{ds}")
    out.mkdir(parents=True, exist_ok=True)
    curve_steps = sorted({int(s) for s in FLAGS.steps} | {0})
    det_steps = sorted(int(s) for s in FLAGS.detector_steps)
    snap_steps = sorted(set(curve_steps) | set(det_steps) | {FLAGS.fixed_steps})
    lams = [float(v) for v in FLAGS.lams]

    m = checkpoints.load(ckpt_name)
    sp = data.splits(ds)
    x_test, y_test = data.load(ds, f"{sp['test']}[:{n}]", data_dir=FLAGS.data_dir)
    x_val, y_val = data.load(ds, sp["val"], data_dir=FLAGS.data_dir)
    x_val, y_val = x_val[:n_val], y_val[:n_val]
    x_test, x_val = data.to_float(x_test), data.to_float(x_val)
    print(f"energy_detection: {ds}, checkpoint {ckpt_name} (test acc {m.card['test_accuracy']:.4f}), "
          f"N_test={len(x_test)}, N_val={len(x_val)}, eps={eps:.4f}, step={step_size:.4f}, seed={FLAGS.seed}, "
          f"devices={jax.device_count()}")

    def logits_after(variables, x_adv):
        return m.apply(variables, x_adv)

    def pgd_attack(eps_, steps_):
        def attack(v, x, y, k):
            f = functools.partial(m.apply, v)
            snaps = attacks.pgd_snapshots(f, x, y, key=k, eps=eps_, step_size=step_size * eps_ / eps,
                                          snapshots=steps_)
            return {s: logits_after(v, xa) for s, xa in snaps.items()}
        return attack

    def le_attack(v_lam, x, y, k):  # lambda is traced: one compilation for the whole sweep
        v, lam = v_lam
        xa = attacks.le_pgd(functools.partial(m.apply, v), x, y, key=k, eps=eps, step_size=step_size,
                            steps=FLAGS.le_steps, lam=lam)
        return logits_after(v, xa)

    key = jax.random.PRNGKey(FLAGS.seed)
    run = functools.partial(attacks.run_attack, batch_size=FLAGS.batch_size)
    timings = {}
    t = time.time()
    pgd_main, pgd_big = pgd_attack(eps, snap_steps), pgd_attack(big_eps, (max(det_steps),))  # compiled once each
    test_logits = run(pgd_main, m.variables, x_test, y_test, key=jax.random.fold_in(key, 1),
                      desc=f"PGD test eps={eps:.3f}")
    val_logits = run(pgd_main, m.variables, x_val, y_val, key=jax.random.fold_in(key, 2),
                     desc=f"PGD val eps={eps:.3f}")
    timings["pgd"] = time.time() - t
    t = time.time()
    big_steps = max(det_steps)
    test_big = run(pgd_big, m.variables, x_test, y_test, key=jax.random.fold_in(key, 3),
                   desc=f"PGD test eps={big_eps:.3f}")[big_steps]
    val_big = run(pgd_big, m.variables, x_val, y_val, key=jax.random.fold_in(key, 4),
                  desc=f"PGD val eps={big_eps:.3f}")[big_steps]
    timings["pgd_big_eps"] = time.time() - t
    t = time.time()
    le_logits = {lam: run(le_attack, (m.variables, np.float32(lam)), x_test, y_test,
                          key=jax.random.fold_in(key, 5), desc=f"LE-PGD lam={lam}") for lam in lams}
    timings["le_pgd"] = time.time() - t

    acc = lambda z, y: metrics.accuracy(z, y)  # noqa: E731
    results = {"config": {"dataset": ds, "checkpoint": ckpt_name, "num_examples": len(x_test),
                          "num_val": len(x_val), "eps": eps, "big_eps": big_eps, "step_size": step_size,
                          "steps": curve_steps, "detector_steps": det_steps, "fixed_steps": FLAGS.fixed_steps,
                          "lams": lams, "le_steps": FLAGS.le_steps, "threshold": FLAGS.threshold,
                          "target_fpr": FLAGS.target_fpr if FLAGS.threshold == "fpr" else None,
                          "seed": FLAGS.seed, "devices": jax.device_count(),
                          "energy_convention": "E = -T*logsumexp(logits/T); detector score = -E"}}

    # 1. energy vs PGD steps
    e = lambda z: np.asarray(energy.energy(z))  # noqa: E731
    results["energy_vs_steps"] = [
        {"steps": s, "mean_energy": float(e(test_logits[s]).mean()), "std_energy": float(e(test_logits[s]).std()),
         "accuracy": acc(test_logits[s], y_test)} for s in curve_steps]
    plotting.histograms({"clean": e(test_logits[0]), **{f"PGD-{s}": e(test_logits[s]) for s in (5, 20)
                                                         if s in test_logits}},
                        out / "energy_hist_pgd.png", xlabel="energy  E = −logsumexp(logits)",
                        title=f"{ds}: energy of clean vs PGD examples (eps={eps:.3f})")
    rows = results["energy_vs_steps"]
    plotting.lines([r["steps"] for r in rows], {"mean energy": np.array([r["mean_energy"] for r in rows])},
                   out / "energy_vs_steps.png", xlabel="PGD steps", ylabel="mean energy (lower = larger logsumexp)",
                   yerr={"mean energy": np.array([r["std_energy"] for r in rows]) / np.sqrt(len(x_test))},
                   title=f"{ds}: energy falls as PGD gets stronger")

    # 2. detector table: per attack, temperature + threshold fitted on validation, applied to test
    def evaluate(val_adv, test_adv, det=None):
        det = det or energy.fit_detector(val_logits[0], val_adv, method=FLAGS.threshold,
                                         target_fpr=FLAGS.target_fpr)
        t_ = det["temperature"]
        scores = np.r_[np.asarray(energy.score(test_logits[0], t_)), np.asarray(energy.score(test_adv, t_))]
        labels = np.r_[np.zeros(len(x_test)), np.ones(len(test_adv))]
        r = metrics.detection_rates(scores, labels, det["threshold"])
        r.update(auroc=metrics.auroc(scores, labels), aupr=metrics.aupr(scores, labels),
                 adversarial_accuracy=acc(test_adv, y_test), temperature=t_, threshold=det["threshold"],
                 val_auroc=det["val_auroc"])
        return r, det, scores, labels

    table = []
    for s in det_steps:
        r, _, _, _ = evaluate(val_logits[s], test_logits[s])
        table.append({"attack": f"pgd{s}", "steps": s, "eps": eps, **r, "deck": DECK.get(f"pgd{s}")})
    r, _, _, _ = evaluate(val_big, test_big)
    table.append({"attack": f"pgd{big_steps}_big", "steps": big_steps, "eps": big_eps, **r,
                  "deck": DECK.get(f"pgd{big_steps}_big")})
    results["detector_table"] = table

    # 3. the deployed detector (fitted on PGD-fixed_steps) and its confusion matrix
    fixed = FLAGS.fixed_steps
    r_fixed, det, scores, labels = evaluate(val_logits[fixed], test_logits[fixed])
    correct = np.r_[test_logits[0].argmax(-1) == y_test, test_logits[fixed].argmax(-1) == y_test]
    results["detector"] = {**{k: v for k, v in det.items()}, "fitted_on": f"val clean vs PGD-{fixed}"}
    results["confusion_pgd"] = {"steps": fixed, **metrics.detection_confusion(scores, labels, det["threshold"],
                                                                                correct), "deck": DECK_CONFUSION}
    # the same attack with the threshold set for FPR <= target on validation (the target is stated at FPR 1%)
    det_fpr = energy.fit_detector(val_logits[0], val_logits[fixed], method="fpr", target_fpr=FLAGS.target_fpr)
    r_fpr, _, _, _ = evaluate(None, test_logits[fixed], det_fpr)
    results["target_pgd"] = {
        "steps": fixed,
        FLAGS.threshold: {"tpr": r_fixed["tpr"], "fpr": r_fixed["fpr"],
                          "met": bool(r_fixed["tpr"] >= 0.98 and r_fixed["fpr"] <= 0.01)},
        f"val_fpr_{FLAGS.target_fpr:g}": {"tpr": r_fpr["tpr"], "fpr": r_fpr["fpr"], "threshold": det_fpr["threshold"],
                                          "met": bool(r_fpr["tpr"] >= 0.98 and r_fpr["fpr"] <= 0.01)},
    }

    # 4. LE-PGD against the deployed detector
    le_rows, rocs = [], {}
    fpr, tpr, _ = metrics.roc_curve(scores, labels)
    rocs[f"PGD-{fixed}"] = (fpr, tpr, r_fixed["auroc"])
    for lam in lams:
        r, _, s_le, l_le = evaluate(None, le_logits[lam], det)
        le_rows.append({"attack": "le_pgd", "lam": lam, "steps": FLAGS.le_steps, "eps": eps, **r,
                        "mean_energy": float(e(le_logits[lam]).mean())})
        fpr, tpr, _ = metrics.roc_curve(s_le, l_le)
        rocs[f"LE-PGD λ={lam:g}"] = (fpr, tpr, r["auroc"])
    results["le_pgd"] = le_rows
    t_det = det["temperature"]
    lam_show = lams[len(lams) // 2]
    plotting.histograms({"clean": e(test_logits[0]), f"PGD-{fixed}": e(test_logits[fixed]),
                         f"LE-PGD λ={lam_show:g}": e(le_logits[lam_show])}, out / "energy_hist_le_pgd.png",
                        xlabel="energy  E = −logsumexp(logits)",
                        vlines={"threshold (T=1)": -det["threshold"]} if t_det == 1.0 else None,
                        title=f"{ds}: LE-PGD keeps energy at clean levels")
    plotting.roc_curves(rocs, out / "roc_pgd_vs_le_pgd.png", title=f"{ds}: energy detector (T={t_det:g})")
    # 5. beyond the deck: AUROC and accuracy vs lambda
    plotting.lines([0.0] + lams, {"detector AUROC": np.array([r_fixed["auroc"]] + [r["auroc"] for r in le_rows]),
                                  "classifier accuracy": np.array([r_fixed["adversarial_accuracy"]]
                                                                  + [r["adversarial_accuracy"] for r in le_rows]),
                                  "detection rate (TPR)": np.array([r_fixed["tpr"]] + [r["tpr"] for r in le_rows])},
                   out / "auroc_vs_lambda.png", xlabel="λ (LE-PGD; 0 = PGD)", ylabel="fraction", logx=True,
                   title=f"{ds}: the price of evading the energy detector")
    mc = "cifar10_resnet10_mcdropout" if ds == "cifar10" else "mnist_basic_cnn_mcdropout"
    results["mc_dropout"] = ("not run: checkpoint absent" if mc not in checkpoints.available()
                             else "present, not yet evaluated by this script")
    timings["total"] = time.time() - t_start
    results["seconds"] = timings
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out}/results.json, results.md and figures in {timings['total']:.0f} s")


def _pct(v):
    return "—" if v is None or v != v else f"{100 * v:.2f}"


def markdown(r) -> str:
    c = r["config"]
    lines = [f"# Energy detection — {c['dataset']}, `{c['checkpoint']}`", "",
             f"N_test={c['num_examples']}, N_val={c['num_val']}, eps={c['eps']:.4f}, step={c['step_size']:.4f}, "
             f"threshold rule: {c['threshold']}, seed {c['seed']}. Energy E = −T·logsumexp(logits/T); "
             "detector flags −E ≥ threshold (fitted on validation, applied to test).", "",
             "## Energy vs PGD steps", "", "| steps | mean energy | accuracy % |", "|---|---|---|"]
    lines += [f"| {x['steps']} | {x['mean_energy']:.3f} ± {x['std_energy']:.3f} | {_pct(x['accuracy'])} |"
              for x in r["energy_vs_steps"]]
    lines += ["", "## Detector per attack (T and threshold fitted on validation for each attack)", "",
              "| attack | eps | DR % | FPR % | FNR % | AUROC | AUPR | adv. acc % | T | deck DR/FPR/FNR % |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["detector_table"]:
        deck = "/".join(f"{v:g}" for v in x["deck"]) if x.get("deck") else "—"
        lines.append(f"| {x['attack']} | {x['eps']:.4f} | {_pct(x['tpr'])} | {_pct(x['fpr'])} | {_pct(x['fnr'])} | "
                     f"{x['auroc']:.4f} | {x['aupr']:.4f} | {_pct(x['adversarial_accuracy'])} | "
                     f"{x['temperature']:g} | {deck} |")
    cm = r["confusion_pgd"]
    lines += ["", f"## Confusion matrix, PGD-{cm['steps']} (deployed detector)", "",
              "| cell | rate % | count | classifier accuracy in cell % | deck rate % |", "|---|---|---|---|---|"]
    for k in ("TN", "FP", "FN", "TP"):
        lines.append(f"| {k} | {_pct(cm[k]['rate'])} | {cm[k]['count']} | {_pct(cm[k]['accuracy'])} | "
                     f"{cm['deck'][k]} |")
    tgt = r["target_pgd"]
    lines += ["", f"Target on test, PGD-{tgt['steps']}: TPR ≥ 98% at FPR ≤ 1%."]
    for rule, v in tgt.items():
        if rule != "steps":
            lines.append(f"- threshold rule `{rule}` (fitted on validation): TPR {_pct(v['tpr'])}%, "
                         f"FPR {_pct(v['fpr'])}% → {'met' if v['met'] else 'not met'}")
    lines += ["",
              f"## LE-PGD against the deployed detector (T={r['detector']['temperature']:g}, fixed threshold)", "",
              "| λ | DR % | FPR % | AUROC | classifier acc % | mean energy |", "|---|---|---|---|---|---|"]
    for x in r["le_pgd"]:
        lines.append(f"| {x['lam']:g} | {_pct(x['tpr'])} | {_pct(x['fpr'])} | {x['auroc']:.4f} | "
                     f"{_pct(x['adversarial_accuracy'])} | {x['mean_energy']:.3f} |")
    lines += ["", f"MC-dropout model: {r['mc_dropout']}.", "",
              "Figures: energy_hist_pgd.png, energy_vs_steps.png, energy_hist_le_pgd.png, roc_pgd_vs_le_pgd.png, "
              "auroc_vs_lambda.png", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
