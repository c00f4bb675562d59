"""Energy-based adversarial detection and its evasion by LE-PGD (the energy study; README).

    python -m experiments.energy_detection --dataset=cifar10            # ResNet-10 checkpoint, eps 8/255
    python -m experiments.energy_detection --dataset=mnist              # BasicCNN checkpoint, eps 0.3

Energy is ``E(x) = −T·logsumexp(logits/T)`` (see robust_jax/energy.py for the sign convention); the detector
flags ``−E >= threshold``. Temperature and threshold are fitted on validation data (clean ``train[45000:]`` vs
PGD on it) and applied unchanged to test data. The deployed detector (fitted on PGD with --fixed_steps) then faces
LE-PGD (--lams) and, with --apgd (default on), APGD-based adaptive attacks: LE-APGD (--apgd_lams) and
detector-aware APGD (``attacks.detector_apgd``: misclassified *and* below the deployed threshold). Writes
results.json, results.md and PNG figures to --out_dir.
"""

from __future__ import annotations

import functools
import json
import time
import types

from absl import flags

from experiments import cli

DEFAULTS = {"cifar10": ("cifar10_resnet10", 8 / 255, 16 / 255), "mnist": ("mnist_basic_cnn", 0.3, 0.4)}
cli.dataset("cifar10", DEFAULTS, "dataset; sets the default checkpoint and budgets (cifar10: cifar10_resnet10, eps "
            "8/255, big_eps 16/255; mnist: mnist_basic_cnn, 0.3, 0.4)")
cli.checkpoint({d: v[0] for d, v in DEFAULTS.items()})
cli.conv_impl()
cli.data_dir()
cli.count("num_examples", 500, "test examples (the first N of the test split)")
cli.count("num_val", 1000, "validation examples for fitting the detector's temperature and threshold")
cli.eps("eps", None, "PGD / LE-PGD Linf budget (default per --dataset: 8/255 cifar10, 0.3 mnist)")
cli.eps("big_eps", None, "second, larger budget for PGD-50 (default per --dataset: 16/255 cifar10, 0.4 mnist)")
cli.eps("step_size", None, "PGD step size (default eps/4)")
cli.int_list("steps", [0, 5, 10, 20, 30, 50], "PGD step counts for the energy curve")
cli.int_list("detector_steps", [5, 10, 30, 50], "PGD step counts for the detector table", lower=1)
cli.count("fixed_steps", 30, "the deployed detector is fitted on PGD with this many steps")
cli.float_list("lams", [0.1, 0.3, 1.0, 3.0, 10.0], "LE-PGD lambdas")
cli.count("le_steps", 30, "LE-PGD steps")
flags.DEFINE_enum("threshold", "youden", ["youden", "fpr"], "threshold rule (fitted on validation)")
flags.DEFINE_float("target_fpr", 0.01, "target FPR for --threshold=fpr", lower_bound=0.0, upper_bound=1.0)
cli.batch_size(250, "attack batch size")
cli.seed()
cli.out_dir("energy_detection")
cli.count("mc_num_examples", 100, "MC-dropout comparison: N test and N validation examples (0 = skip; 200 adds "
          "~1.5 min)", lower=0)
cli.count("mc_samples", 8, "MC-dropout comparison: dropout masks per prediction and per EOT attack step")
flags.DEFINE_float("mc_lam", 3.0, "MC-dropout comparison: LE-PGD lambda", lower_bound=0.0)
flags.DEFINE_bool("apgd", True, "APGD rows against the deployed detector: LE-APGD at --apgd_lams and detector-aware "
                  "APGD (--noapgd skips them); each row costs 100 APGD steps per test image, about as much as "
                  "PGD-50 on the test and validation images together (~1.5 min at the default N=500 on a quiet "
                  "2-core host)")
cli.float_list("apgd_lams", [3.0], "LE-APGD lambdas (the headline 3; add 1 with --apgd_lams=1,3)")
cli.count("apgd_steps", 100, "LE-APGD and detector-aware APGD iterations")
FLAGS = flags.FLAGS

# The checkpoints' convolutions have a custom VJP (robust_jax.conv), so a rolled loop runs as fast as an unrolled one
# on CPU and compiles in constant time (benchmarks/README.md): the 30- and 50-step attacks here compile in seconds.
LOOP = "fori"
# The original study's detection table (CIFAR-10, ResNet-10): DR / FPR / FNR in %.
ORIGINAL_STUDY = {"pgd5": (83, 19, 17), "pgd10": (93, 4, 7), "pgd30": (98, 1, 2), "pgd50": (98, 0.7, 2),
        "pgd50_big": (99, 0.02, 0.1)}
MC_DROPOUT = {"cifar10": "cifar10_allconv", "mnist": "mnist_basic_cnn"}  # issue 4's epistemic (dropout) models
ORIGINAL_CONFUSION = {"TN": 98.78, "FP": 1.22, "FN": 2.14, "TP": 97.86, "accuracy_TN": 83.83}
EVADED = 0.05  # the headline LE-PGD lambda: the smallest at which the deployed detector flags fewer than 5%


def settings() -> types.SimpleNamespace:
    """The validated flags with the per-dataset defaults filled in."""
    ckpt, eps_default, big_default = DEFAULTS[FLAGS.dataset]
    eps = FLAGS.eps if FLAGS.eps is not None else eps_default
    cli.require(eps > 0, f"--eps={FLAGS.eps}: the attacks need a budget > 0")
    return types.SimpleNamespace(
        dataset=FLAGS.dataset, checkpoint=FLAGS.checkpoint or ckpt, eps=eps,
        big_eps=FLAGS.big_eps if FLAGS.big_eps is not None else big_default, step_size=FLAGS.step_size or eps / 4,
        curve_steps=sorted(set(FLAGS.steps) | {0}), det_steps=sorted(FLAGS.detector_steps),
        lams=sorted(FLAGS.lams), fixed=FLAGS.fixed_steps)


def main(argv):
    del argv
    import jax

    from robust_jax import checkpoints, data

    started = time.time()
    s = settings()
    m = checkpoints.load(s.checkpoint)  # f32 evaluation kernels: every reported number
    ma = m.for_use("attack", FLAGS.conv_impl)  # the kernels the attacks differentiate
    sp = data.splits(s.dataset)
    x_test, y_test = data.load(s.dataset, f"{sp['test']}[:{FLAGS.num_examples}]", data_dir=FLAGS.data_dir)
    x_val, y_val = data.load(s.dataset, data.head(s.dataset, sp["val"], FLAGS.num_val), data_dir=FLAGS.data_dir)
    x_test, x_val = data.to_float(x_test), data.to_float(x_val)
    cli.say(f"energy_detection: {s.dataset}, checkpoint {s.checkpoint} (test acc {m.card['test_accuracy']:.4f}), "
            f"N_test={len(x_test)}, N_val={len(x_val)}, eps={_eps(s.eps)}, step={_eps(s.step_size)}, "
            f"seed={FLAGS.seed}, devices={jax.device_count()}, attack gradients: {ma.model.conv_impl}")

    key = jax.random.PRNGKey(FLAGS.seed)
    logits, seconds = attack_logits(m, ma, s, x_test, y_test, x_val, y_val, key)
    conv = {"eval": m.model.conv_impl, "attack": ma.model.conv_impl}
    results = {"config": config_record(s, len(x_test), len(x_val), jax.device_count(), conv),
               **analyse(s, logits, y_test)}
    if FLAGS.apgd:
        t = time.time()
        results["apgd"] = apgd_detection(m, ma, s, x_test, y_test, logits["test"][0], results["detector"],
                                         jax.random.fold_in(key, 7))
        seconds["apgd"] = time.time() - t
    else:
        results["apgd"] = "not run: --noapgd"
    if FLAGS.mc_num_examples > 0 and MC_DROPOUT[s.dataset] in checkpoints.available():
        t = time.time()
        results["mc_dropout"] = mc_dropout_detection(s, x_val, y_val, x_test, y_test, jax.random.fold_in(key, 6))
        seconds["mc_dropout"] = time.time() - t
    else:
        results["mc_dropout"] = f"not run: checkpoint {MC_DROPOUT[s.dataset]} absent or --mc_num_examples=0"
    seconds["total"] = time.time() - started
    results["seconds"] = seconds

    out = cli.output_folder(FLAGS.out_dir, f"results/energy_detection/{s.dataset}")
    figures = make_figures(s, logits, results, y_test, out)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "results.md").write_text(markdown(results, figures))
    cli.finish(out, summary(results), started=started, files=["results.md", "results.json", *figures])


def attack_logits(m, ma, s, x_test, y_test, x_val, y_val, key):
    """Logits (of `m`) after every attack (differentiating `ma`, the same weights with the attack kernels):
    {"test"/"val": {steps: PGD logits (0 = clean)}, "test_big"/"val_big": PGD at big_eps, "le": {lam: LE-PGD logits
    on test}}, and the seconds each family took."""
    import jax
    import numpy as np

    from robust_jax import attacks, runner

    def pgd(eps_, steps_):  # one trajectory, logits at every snapshot; compiled once per budget
        def attack(v, x, y, k):
            snaps = attacks.pgd_snapshots(functools.partial(ma.apply, v), x, y, key=k, eps=eps_,
                                          step_size=s.step_size * eps_ / s.eps, snapshots=steps_, loop=LOOP)
            return {n: m.apply(v, xa) for n, xa in snaps.items()}
        return attack

    def le_pgd(v_lam, x, y, k):  # lambda is traced: one compilation for the whole sweep
        v, lam = v_lam
        xa = attacks.le_pgd(functools.partial(ma.apply, v), x, y, key=k, eps=s.eps, step_size=s.step_size,
                            steps=FLAGS.le_steps, lam=lam, loop=LOOP)
        return m.apply(v, xa)

    run = functools.partial(runner.run_attack, batch_size=FLAGS.batch_size)
    main_pgd = pgd(s.eps, sorted(set(s.curve_steps) | set(s.det_steps) | {s.fixed}))
    big, big_pgd = max(s.det_steps), pgd(s.big_eps, (max(s.det_steps),))
    out, seconds, t = {}, {}, time.time()
    out["test"] = run(main_pgd, m.variables, x_test, y_test, key=jax.random.fold_in(key, 1),
                      desc=f"PGD test eps={_eps(s.eps)}")
    out["val"] = run(main_pgd, m.variables, x_val, y_val, key=jax.random.fold_in(key, 2),
                     desc=f"PGD val eps={_eps(s.eps)}")
    seconds["pgd"], t = time.time() - t, time.time()
    out["test_big"] = run(big_pgd, m.variables, x_test, y_test, key=jax.random.fold_in(key, 3),
                          desc=f"PGD test eps={_eps(s.big_eps)}")[big]
    out["val_big"] = run(big_pgd, m.variables, x_val, y_val, key=jax.random.fold_in(key, 4),
                         desc=f"PGD val eps={_eps(s.big_eps)}")[big]
    seconds["pgd_big_eps"], t = time.time() - t, time.time()
    out["le"] = {lam: run(le_pgd, (m.variables, np.float32(lam)), x_test, y_test, key=jax.random.fold_in(key, 5),
                          desc=f"LE-PGD lam={lam:g}") for lam in s.lams}
    seconds["le_pgd"] = time.time() - t
    return out, seconds


def analyse(s, logits, y_test) -> dict:
    """Energy vs PGD steps, the detector per attack (fitted on validation for each), the deployed detector (fitted on
    PGD-fixed_steps) with its confusion matrix and FPR target, and LE-PGD against it."""
    import numpy as np

    from robust_jax import energy, evaluate, metrics

    test, val = logits["test"], logits["val"]
    fit = lambda adv, method=FLAGS.threshold: energy.fit_detector(val[0], adv, method=method,  # noqa: E731
                                                                   target_fpr=FLAGS.target_fpr)
    report = lambda det, adv: evaluate.energy_detector_report(det, test[0], adv, y_test)  # noqa: E731
    e = lambda z: np.asarray(energy.energy(z))  # noqa: E731
    r = {"energy_vs_steps": [{"steps": n, "mean_energy": float(e(test[n]).mean()),
                              "std_energy": float(e(test[n]).std()), "accuracy": metrics.accuracy(test[n], y_test)}
                             for n in s.curve_steps]}
    table = [{"attack": f"pgd{n}", "steps": n, "eps": s.eps, **report(fit(val[n]), test[n])[0],
              "original_study": ORIGINAL_STUDY.get(f"pgd{n}")} for n in s.det_steps]
    big = max(s.det_steps)
    table.append({"attack": f"pgd{big}_big", "steps": big, "eps": s.big_eps,
                  **report(fit(logits["val_big"]), logits["test_big"])[0],
                  "original_study": ORIGINAL_STUDY.get(f"pgd{big}_big")})
    r["detector_table"] = table

    det = fit(val[s.fixed])  # the deployed detector
    fixed, scores, labels = report(det, test[s.fixed])
    correct = np.r_[test[0].argmax(-1) == y_test, test[s.fixed].argmax(-1) == y_test]
    r["detector"] = {**det, "fitted_on": f"val clean vs PGD-{s.fixed}"}
    r["confusion_pgd"] = {"steps": s.fixed, **metrics.detection_confusion(scores, labels, det["threshold"], correct),
                          "original_study": ORIGINAL_CONFUSION}
    det_fpr = fit(val[s.fixed], "fpr")  # the threshold set for FPR <= target on validation (the target is at 1%)
    at_fpr = report(det_fpr, test[s.fixed])[0]
    met = lambda x: bool(x["tpr"] >= 0.98 and x["fpr"] <= 0.01)  # noqa: E731
    r["target_pgd"] = {"steps": s.fixed,
                       FLAGS.threshold: {"tpr": fixed["tpr"], "fpr": fixed["fpr"], "met": met(fixed)},
                       f"val_fpr_{FLAGS.target_fpr:g}": {"tpr": at_fpr["tpr"], "fpr": at_fpr["fpr"],
                                                         "threshold": det_fpr["threshold"], "met": met(at_fpr)}}
    r["pgd_fixed"] = fixed
    r["le_pgd"] = [{"attack": "le_pgd", "lam": lam, "steps": FLAGS.le_steps, "eps": s.eps,
                    **report(det, logits["le"][lam])[0], "mean_energy": float(e(logits["le"][lam]).mean())}
                   for lam in s.lams]
    evaded = [x for x in r["le_pgd"] if x["tpr"] < EVADED]
    head = evaded[0] if evaded else r["le_pgd"][-1]
    r["le_pgd_headline"] = {"lam": head["lam"], "tpr": head["tpr"], "auroc": head["auroc"], "evaded": bool(evaded),
                            "rule": f"smallest lambda with detection rate < {EVADED:.0%} (else the largest)"}
    return r


def apgd_detection(m, ma, s, x_test, y_test, clean_logits, det, key) -> dict:
    """The deployed detector (fitted on validation PGD, applied unchanged) against APGD-based adaptive attacks on
    test: LE-APGD (APGD on CE + λ·E at T=1, as LE-PGD) at each --apgd_lams, and detector-aware APGD (APGD on
    ``min(margin, threshold − T·logsumexp(z/T))`` at the deployed T and threshold; success = misclassified and not
    flagged). Rows as LE-PGD's, plus ``fooled_undetected``: the fraction of test images misclassified and not
    flagged (the attack's success against classifier + detector)."""
    import jax
    import numpy as np

    from robust_jax import attacks, energy, evaluate, runner

    kw = dict(eps=s.eps, steps=FLAGS.apgd_steps, loop=LOOP)

    def le_apgd(v_lam, x, y, k):  # lambda traced: one compilation for every lambda
        v, lam = v_lam
        return m.apply(v, attacks.le_apgd(functools.partial(ma.apply, v), x, y, key=k, lam=lam, **kw))

    def detector_apgd(v_det, x, y, k):  # the detector traced too
        v, thr, t = v_det
        return m.apply(v, attacks.detector_apgd(functools.partial(ma.apply, v), x, y, key=k, threshold=thr,
                                                temperature=t, **kw))

    run = functools.partial(runner.run_attack, batch_size=FLAGS.batch_size)
    thr, t = np.float32(det["threshold"]), np.float32(det["temperature"])
    adv = {("le_apgd", lam): run(le_apgd, (m.variables, np.float32(lam)), x_test, y_test,
                                 key=jax.random.fold_in(key, i), desc=f"LE-APGD lam={lam:g}")
           for i, lam in enumerate(FLAGS.apgd_lams)}
    adv[("detector_apgd", None)] = run(detector_apgd, (m.variables, thr, t), x_test, y_test,
                                       key=jax.random.fold_in(key, 99), desc="detector-aware APGD")
    rows = []
    for (name, lam), z in adv.items():
        flagged = np.asarray(energy.detect(z, det))
        rows.append({"attack": name, "lam": lam, "steps": FLAGS.apgd_steps, "eps": s.eps,
                     **evaluate.energy_detector_report(det, clean_logits, z, y_test)[0],
                     "fooled_undetected": float(np.mean((z.argmax(-1) != y_test) & ~flagged)),
                     "mean_energy": float(np.mean(energy.energy(z)))})
    return {"steps": FLAGS.apgd_steps, "lams": list(FLAGS.apgd_lams),
            "objectives": {"le_apgd": "CE + lam*E, E = -logsumexp(logits) (T=1); success = misclassified",
                           "detector_apgd": "min(max_{j!=y} z_j - z_y, threshold - T*logsumexp(z/T)) at the "
                                            "deployed T and threshold; success = misclassified and not flagged"},
            "rows": rows}


def make_figures(s, logits, r, y_test, out) -> list[str]:
    """The five figures; returns their file names."""
    import numpy as np

    from robust_jax import energy, evaluate, metrics, plotting

    ds, n, test, det = s.dataset, len(y_test), logits["test"], r["detector"]
    t_det, fixed, head = det["temperature"], s.fixed, r["le_pgd_headline"]
    e = lambda z, t=1.0: np.asarray(energy.energy(z, t))  # noqa: E731
    files = [plotting.histograms(
        {"clean": e(test[0]), **{f"PGD-{k}": e(test[k]) for k in (5, 20) if k in test}}, out / "energy_hist_pgd.png",
        xlabel="energy  E = −logsumexp(logits)",
        title=f"{ds}, N={n} test images: energy of clean vs PGD examples (eps {_eps(s.eps)})")]
    rows = r["energy_vs_steps"]
    files.append(plotting.lines(
        [x["steps"] for x in rows], {"mean energy": np.array([x["mean_energy"] for x in rows])},
        out / "energy_vs_steps.png", xlabel="PGD steps", ylabel="mean energy (lower = larger logsumexp)",
        yerr={"mean energy": np.array([x["std_energy"] for x in rows]) / np.sqrt(n)},
        title=f"{ds}, N={n}: energy falls as PGD ({_eps(s.eps)}) gets stronger (± s.e.m.)"))
    # the LE-PGD histogram at the headline lambda, on the detector's own scale (its temperature), with its threshold
    files.append(plotting.histograms(
        {"clean": e(test[0], t_det), f"PGD-{fixed}": e(test[fixed], t_det),
         f"LE-PGD λ={head['lam']:g}": e(logits["le"][head["lam"]], t_det)}, out / "energy_hist_le_pgd.png",
        xlabel=f"energy  E = −T·logsumexp(logits/T) at the detector's T={t_det:g}",
        vlines={f"deployed threshold (flags E ≤ {-det['threshold']:.3g})": -det["threshold"]},
        title=f"{ds}, N={n}: LE-PGD at λ={head['lam']:g} "
              + ("(the smallest λ detected < 5%)" if head["evaded"] else "(the largest λ: none is detected < 5%)")
              + f"\ndetected: LE-PGD {100 * head['tpr']:.1f}%, PGD-{fixed} {100 * r['pgd_fixed']['tpr']:.1f}%; "
              f"clean flagged {100 * r['pgd_fixed']['fpr']:.1f}%"))
    rocs = {}
    for name, adv in [(f"PGD-{fixed}", test[fixed])] + [(f"LE-PGD λ={lam:g}", logits["le"][lam]) for lam in s.lams]:
        row, scores, labels = evaluate.energy_detector_report(det, test[0], adv, y_test)
        fpr, tpr, _ = metrics.roc_curve(scores, labels)
        rocs[name] = (fpr, tpr, row["auroc"])
    files.append(plotting.roc_curves(
        rocs, out / "roc_pgd_vs_le_pgd.png", points={
            f"deployed threshold on PGD-{fixed}": (r["pgd_fixed"]["fpr"], r["pgd_fixed"]["tpr"])},
        title=f"{ds}, N={n} clean + {n} adversarial test images: energy detector (T={t_det:g})"))
    le = r["le_pgd"]
    series = lambda k: np.array([r["pgd_fixed"][k]] + [x[k] for x in le])  # noqa: E731
    files.append(plotting.lines(
        [0.0] + [x["lam"] for x in le], {"detector AUROC": series("auroc"), "detection rate (TPR)": series("tpr"),
                                         "classifier accuracy": series("adversarial_accuracy")},
        out / "auroc_vs_lambda.png", xlabel="λ (LE-PGD; 0 = PGD)", ylabel="fraction", logx=True,
        title=f"{ds}, N={n}: the price of evading the energy detector"))
    return [f.name for f in files]


def mc_dropout_detection(s, x_val, y_val, x_test, y_test, key) -> dict:
    """The energy detector on issue 4's MC-dropout model vs the same weights run deterministically.

    The MC-dropout model's energy is that of its mean logits over ``--mc_samples`` masks; it is attacked through EOT
    over as many masks per step (PGD and LE-PGD with ``--mc_lam``). Each model's detector (temperature and Youden
    threshold) is fitted on its own validation clean vs PGD examples and applied unchanged to test.
    """
    import jax
    import numpy as np

    from robust_jax import attacks, checkpoints, energy, evaluate, runner

    m = checkpoints.load(MC_DROPOUT[s.dataset])
    ma = m.for_use("attack", FLAGS.conv_impl)
    n, num = FLAGS.mc_num_examples, FLAGS.mc_samples
    rows = {}
    for name, kind in (("deterministic", "none"), ("mc_dropout", "epistemic")):
        d = evaluate.Defence(kind, m, mc_samples=num, eot_samples=num, attack_model=ma)

        def attack(v, x, y, k, d=d):
            k_att, k_le, k_pred = jax.random.split(k, 3)
            f = d.attacked("adaptive")(v)
            xa = attacks.pgd(f, x, y, key=k_att, eps=s.eps, step_size=s.step_size, steps=s.fixed, loop=LOOP)
            xl = attacks.le_pgd(f, x, y, key=k_le, eps=s.eps, step_size=s.step_size, steps=FLAGS.le_steps,
                                lam=FLAGS.mc_lam, loop=LOOP)
            return {a: d.mean_logits(v, z, k_pred) for a, z in (("clean", x), ("pgd", xa), ("le_pgd", xl))}

        # EOT runs `passes` forward passes per image: keep the effective batch (and memory) at --batch_size
        passes = 1 if kind == "none" else num
        run = functools.partial(runner.run_attack, attack, m.variables, batch_size=max(1, FLAGS.batch_size // passes))
        val = run(x_val[:n], y_val[:n], key=jax.random.fold_in(key, 0), desc=f"{name} val")
        test = run(x_test[:n], y_test[:n], key=jax.random.fold_in(key, 1), desc=f"{name} test")
        det = energy.fit_detector(val["clean"], val["pgd"])
        row = {"clean_accuracy": float(np.mean(test["clean"].argmax(-1) == y_test[:n])),
               "temperature": det["temperature"], "clean_mean_energy": float(np.mean(energy.energy(test["clean"])))}
        for a in ("pgd", "le_pgd"):
            row[a] = {**evaluate.energy_detector_report(det, test["clean"], test[a], y_test[:n])[0],
                      "mean_energy": float(np.mean(energy.energy(test[a])))}
        rows[name] = row
    return {"checkpoint": MC_DROPOUT[s.dataset], "conv_impl": {"eval": m.model.conv_impl, "attack": ma.model.conv_impl},
            "num_examples": n, "mc_samples": num, "eot_samples": num,
            "steps": s.fixed, "le_steps": FLAGS.le_steps, "lam": FLAGS.mc_lam, "rows": rows}


def config_record(s, n_test, n_val, devices, conv_impl) -> dict:
    return {"dataset": s.dataset, "checkpoint": s.checkpoint, "conv_impl": conv_impl,
            "num_examples": n_test, "num_val": n_val, "eps": s.eps, "big_eps": s.big_eps, "step_size": s.step_size,
            "steps": s.curve_steps, "detector_steps": s.det_steps, "fixed_steps": s.fixed, "lams": s.lams,
            "le_steps": FLAGS.le_steps, "apgd": FLAGS.apgd, "apgd_lams": list(FLAGS.apgd_lams) if FLAGS.apgd else [],
            "apgd_steps": FLAGS.apgd_steps if FLAGS.apgd else None, "threshold": FLAGS.threshold,
            "target_fpr": FLAGS.target_fpr if FLAGS.threshold == "fpr" else None, "seed": FLAGS.seed,
            "devices": devices, "energy_convention": "E = -T*logsumexp(logits/T); detector score = -E"}


def _eps(v) -> str:
    from robust_jax.plotting import eps_label

    return eps_label(v)


def _pct(v):
    return "—" if v is None or v != v else f"{100 * v:.2f}"


def summary(r) -> list[str]:
    """The run's findings in a few lines (printed at the end)."""
    p, head, c = r["pgd_fixed"], r["le_pgd_headline"], r["config"]
    lines = [f"{c['dataset']}, {c['checkpoint']}, N={c['num_examples']}, eps {_eps(c['eps'])}: energy "
             f"{r['energy_vs_steps'][0]['mean_energy']:.2f} clean -> {r['energy_vs_steps'][-1]['mean_energy']:.2f} "
             f"after PGD-{r['energy_vs_steps'][-1]['steps']}",
             f"deployed detector (T={p['temperature']:g}): PGD-{c['fixed_steps']} detected {_pct(p['tpr'])}% at FPR "
             f"{_pct(p['fpr'])}% (AUROC {p['auroc']:.4f})",
             f"LE-PGD λ={head['lam']:g}: detected {_pct(head['tpr'])}% (AUROC {head['auroc']:.3f})"
             + ("" if head["evaded"] else f" — no λ in the sweep gets below {EVADED:.0%}")]
    if isinstance(r["mc_dropout"], dict):
        mc = r["mc_dropout"]["rows"]
        lines.append("MC-dropout vs deterministic: PGD detected " + " / ".join(
            f"{_pct(mc[k]['pgd']['tpr'])}%" for k in ("mc_dropout", "deterministic")) + ", LE-PGD " + " / ".join(
            f"{_pct(mc[k]['le_pgd']['tpr'])}%" for k in ("mc_dropout", "deterministic")))
    if isinstance(r.get("apgd"), dict):
        lines.append(f"APGD-{r['apgd']['steps']}: " + ", ".join(
            f"{_apgd_name(x)} detected {_pct(x['tpr'])}% (acc {_pct(x['adversarial_accuracy'])}%, fooled and "
            f"undetected {_pct(x['fooled_undetected'])}%)" for x in r["apgd"]["rows"]))
    return lines


def _apgd_name(row) -> str:
    return f"LE-APGD λ={row['lam']:g}" if row["attack"] == "le_apgd" else "detector-aware APGD"


def markdown(r, figures=()) -> str:
    c = r["config"]
    lines = [f"# Energy detection — {c['dataset']}, `{c['checkpoint']}`", "",
             f"N_test={c['num_examples']}, N_val={c['num_val']}, eps={_eps(c['eps'])} ({c['eps']:.4f}), "
             f"step={_eps(c['step_size'])} ({c['step_size']:.4f}), threshold rule: {c['threshold']}, seed "
             f"{c['seed']}. Energy E = −T·logsumexp(logits/T); detector flags −E ≥ threshold (fitted on validation, "
             "applied to test)." + (cli.conv_note(c["conv_impl"]) if isinstance(c["conv_impl"], dict) else ""),
             "", "## Energy vs PGD steps", "", "| steps | mean energy | accuracy % |", "|---|---|---|"]
    lines += [f"| {x['steps']} | {x['mean_energy']:.3f} ± {x['std_energy']:.3f} | {_pct(x['accuracy'])} |"
              for x in r["energy_vs_steps"]]
    lines += ["", "## Detector per attack (T and threshold fitted on validation for each attack)", "",
              "| attack | eps | DR % | FPR % | FNR % | AUROC | AUPR | adv. acc % | T | original study DR/FPR/FNR % |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["detector_table"]:
        orig = "/".join(f"{v:g}" for v in x["original_study"]) if x.get("original_study") else "—"
        lines.append(f"| {x['attack']} | {_eps(x['eps'])} | {_pct(x['tpr'])} | {_pct(x['fpr'])} | {_pct(x['fnr'])} | "
                     f"{x['auroc']:.4f} | {x['aupr']:.4f} | {_pct(x['adversarial_accuracy'])} | "
                     f"{x['temperature']:g} | {orig} |")
    cm = r["confusion_pgd"]
    lines += ["", f"## Confusion matrix, PGD-{cm['steps']} (deployed detector)", "",
              "| cell | rate % | count | classifier accuracy in cell % | original study rate % |",
              "|---|---|---|---|---|"]
    for k in ("TN", "FP", "FN", "TP"):
        lines.append(f"| {k} | {_pct(cm[k]['rate'])} | {cm[k]['count']} | {_pct(cm[k]['accuracy'])} | "
                     f"{cm['original_study'][k]} |")
    tgt = r["target_pgd"]
    lines += ["", f"Target on test, PGD-{tgt['steps']}: TPR ≥ 98% at FPR ≤ 1%."]
    for rule, v in tgt.items():
        if rule != "steps":
            lines.append(f"- threshold rule `{rule}` (fitted on validation): TPR {_pct(v['tpr'])}%, "
                         f"FPR {_pct(v['fpr'])}% → {'met' if v['met'] else 'not met'}")
    head = r["le_pgd_headline"]
    lines += ["",
              f"## LE-PGD against the deployed detector (T={r['detector']['temperature']:g}, fixed threshold)", "",
              "| λ | DR % | FPR % | AUROC | classifier acc % | mean energy |", "|---|---|---|---|---|---|"]
    for x in r["le_pgd"]:
        lines.append(f"| {x['lam']:g} | {_pct(x['tpr'])} | {_pct(x['fpr'])} | {x['auroc']:.4f} | "
                     f"{_pct(x['adversarial_accuracy'])} | {x['mean_energy']:.3f} |")
    lines += ["", f"Headline λ ({head['rule']}): λ={head['lam']:g}, detected {_pct(head['tpr'])}% "
              "(the λ drawn in energy_hist_le_pgd.png)."]
    ap = r.get("apgd")
    if isinstance(ap, str):
        lines += ["", f"APGD rows: {ap}."]
    elif ap is not None:
        lines += ["", f"## APGD against the deployed detector (T={r['detector']['temperature']:g}, fixed threshold; "
                  f"{ap['steps']} iterations)", "",
                  "LE-APGD: APGD (step-size schedule, momentum, keep-best) on CE + λ·E at T=1, as LE-PGD. "
                  "Detector-aware APGD: APGD on min(max_{j≠y} z_j − z_y, threshold − T·logsumexp(z/T)) at the "
                  "deployed T and threshold, keeping per example the best point that is misclassified and not "
                  "flagged. *Fooled & undetected*: test images misclassified and not flagged.", "",
                  "| attack | DR % | FPR % | AUROC | classifier acc % | fooled & undetected % | mean energy |",
                  "|---|---|---|---|---|---|---|"]
        for x in ap["rows"]:
            lines.append(f"| {_apgd_name(x)} | {_pct(x['tpr'])} | {_pct(x['fpr'])} | {x['auroc']:.4f} | "
                         f"{_pct(x['adversarial_accuracy'])} | {_pct(x['fooled_undetected'])} | "
                         f"{x['mean_energy']:.3f} |")
    mc = r["mc_dropout"]
    if isinstance(mc, str):
        lines += ["", f"MC-dropout model: {mc}."]
    else:
        lines += ["", f"## The same detector on the MC-dropout model (`{mc['checkpoint']}`, {mc['mc_samples']} masks, "
                  f"attacks through EOT over {mc['eot_samples']} masks; N={mc['num_examples']})", "",
                  "| model | clean acc % | T | attack | DR % | FPR % | AUROC | adv. acc % | mean E clean → adv |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, row in mc["rows"].items():
            for atk, label in (("pgd", f"PGD-{mc['steps']}"), ("le_pgd", f"LE-PGD λ={mc['lam']:g}")):
                x = row[atk]
                lines.append(f"| {name} | {_pct(row['clean_accuracy'])} | {row['temperature']:g} | {label} | "
                             f"{_pct(x['tpr'])} | {_pct(x['fpr'])} | {x['auroc']:.4f} | "
                             f"{_pct(x['adversarial_accuracy'])} | {row['clean_mean_energy']:.2f} → "
                             f"{x['mean_energy']:.2f} |")
    lines += ["", "Figures: " + ", ".join(figures or ("energy_hist_pgd.png", "energy_vs_steps.png",
                                                       "energy_hist_le_pgd.png", "roc_pgd_vs_le_pgd.png",
                                                       "auroc_vs_lambda.png")), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(main)
