"""Which robustness makes a CNN better calibrated? ECE and reliability diagrams per model and perturbation.

    python -m experiments.calibration --dataset=cifar10

Models: the trade-off study's (``experiments/regimes.py``: standard, PGD-trained, rotation-trained, both, and the
series points at adversarial eps 2/255, 4/255 and rotation ±10°, ±20°). Perturbations (``PERTURBATIONS``): clean;
PGD-10 crafted against each model at eps 2/255 and 8/255; one random draw per image of rotation (±30°), translation
(±3 px), perspective (corners ±3 px), Gaussian noise (σ 0.05 and 0.1) and motion blur (length ≤ 9 px, any angle).

Metrics (``robust_jax.metrics``): top-label ECE with 15 equal-width bins, adaptive (equal-mass) ECE, accuracy, mean
confidence, NLL; and the same ECE after temperature scaling, with one temperature per model fitted on clean
validation data (``train[45000:]``) by NLL — so a model is not "better calibrated" merely because it was trained with
label smoothing (the standard and rotation checkpoints were, the PGD-trained ones were not).
PGD differentiates each checkpoint with the attack kernels of --conv_impl; every logit (ECE, accuracy, the temperature
fit) comes from the f32 evaluation kernels.
Each (model, perturbation) is cached in --out_dir/evals/<model>.json: a rerun only computes what is missing; a PGD
row records its attack kernels (``conv_impl``; rows without it were computed with ``custom_vjp``) and is recomputed
when they differ from this run's.
Writes results.json, results.md, reliability.png (rows: models, columns: perturbations) and
ece_vs_strength.png (ECE along each training knob of ``SERIES``) to --out_dir.
"""

from __future__ import annotations

import json
import time

from absl import flags

from experiments import cli
from experiments.regimes import REGIMES

# name -> ("pgd", eps) or (spatial family, limits)
PERTURBATIONS = {
    "clean": None,
    "pgd_2": ("pgd", 2 / 255),
    "pgd_8": ("pgd", 8 / 255),
    "rotation": ("rotation", {"degrees": 30.0}),
    "translation": ("translation", {"pixels": 3.0}),
    "perspective": ("perspective", {"pixels": 3.0}),
    "noise_0.05": ("noise_fixed", 0.05),
    "noise_0.1": ("noise_fixed", 0.1),
    "blur": ("blur", {"length": 9.0}),
}
cli.dataset("cifar10", REGIMES, "dataset (its training regimes are experiments/regimes.py's)")
cli.names("models", None, sorted({n for r in REGIMES.values() for n in r}),
          "models (default: every regime whose checkpoint is available)")
cli.names("perturbations", None, PERTURBATIONS, "perturbations (default: all)")
cli.count("num_examples", 2000, "N test images (the first N of the test split)")
cli.count("num_val", 2000, "validation images for the temperature fit")
cli.count("num_bins", 15, "ECE bins", lower=2)
cli.conv_impl()
cli.batch_size(500)
cli.seed()
cli.data_dir()
cli.out_dir("calibration")
cli.validate(["dataset", "models"], lambda v: _regimes_problem(v["dataset"], v["models"]))
FLAGS = flags.FLAGS


def is_attack(name: str) -> bool:
    """Whether perturbation `name` differentiates the model (PGD; the others are random draws)."""
    spec = PERTURBATIONS[name]
    return spec is not None and spec[0] == "pgd"


def stale(rows: dict, name: str, conv_impl: str) -> bool:
    """Whether perturbation `name` must be (re)computed: no cached row, or a PGD row computed with attack kernels
    other than `conv_impl` (``cli.attack_kernels_of``: rows without a record were computed with ``custom_vjp``)."""
    return name not in rows or (is_attack(name) and cli.attack_kernels_of(rows[name]) != conv_impl)


def perturb(ma, name: str, x, y, key, batch_size: int):
    """The perturbed inputs for one model: PGD differentiates `ma` (the checkpoint with the attack kernels); the
    other perturbations do not look at the model."""
    import functools

    import jax
    import numpy as np

    from robust_jax import attacks, runner, transforms
    from robust_jax.attacks import spatial

    spec = PERTURBATIONS[name]
    if spec is None:
        return x
    kind, arg = spec
    if kind == "pgd":
        steps = 10
        return runner.run_attack(lambda v, a, b, k: attacks.pgd(functools.partial(ma.apply, v), a, b, key=k, eps=arg,
                                                                step_size=2.5 * arg / steps, steps=steps),
                                 ma.variables, x, y, key=key, batch_size=batch_size, desc=name)
    if kind == "noise_fixed":
        return np.asarray(transforms.gaussian_noise(jax.numpy.asarray(x), arg, key))
    fam = spatial.family(kind, **arg)
    params = fam.sample(key, len(x))
    return np.concatenate([np.asarray(fam.apply(jax.numpy.asarray(x[i:i + batch_size]), params[i:i + batch_size],
                                                None)) for i in range(0, len(x), batch_size)])


def calibrate(m, ma, x, y, xv, yv, cached: dict, perts, *, seed: int, num_bins: int, batch_size: int, save):
    """(temperature, {perturbation: calibration row}) of one model: the rows of `cached` (``{"temperature", "rows"}``
    of its cache file) reused unless :func:`stale`, the others computed, each followed by ``save({"temperature",
    "rows"})`` (resumable). Every logit is `m`'s (the f32 evaluation kernels: the temperature fit on (xv, yv), ECE and
    accuracy); PGD differentiates `ma` (the attack kernels), recorded in its row (``conv_impl``)."""
    import jax

    from robust_jax import metrics

    conv = ma.model.conv_impl
    temp = cached.get("temperature") or metrics.fit_temperature(m.predict(xv, batch_size), yv)
    rows = dict(cached.get("rows", {}))
    for p in perts:
        if stale(rows, p, conv):
            k = jax.random.fold_in(jax.random.PRNGKey(seed), list(PERTURBATIONS).index(p))
            logits = m.predict(perturb(ma, p, x, y, k, batch_size), batch_size)
            rows[p] = {**metrics.calibration_report(logits, y, temperature=temp, num_bins=num_bins),
                       **({"conv_impl": conv} if is_attack(p) else {})}
            save({"temperature": temp, "rows": rows})
    return temp, rows


def verdicts(results: dict, perturbations) -> list[str]:
    """The original study's claims, each checked per perturbation from the numbers (raw ECE and temperature-scaled)."""
    out = []
    pairs = [("pgd", "standard", "pixel-wise robustness (PGD training) gives better calibration than standard"),
             ("pgd_rot", "standard", "combining both (PGD + rotations) still gives better calibration than standard"),
             ("pgd_rot", "rot", "adding PGD training to rotation training improves calibration"),
             ("rot", "standard", "rotation training gives better calibration than standard"),
             # the eps series against its own recipe without the adversary (standard differs in label smoothing and
             # epochs): is it pixel robustness as such, and does its strength matter?
             ("fgsm_eps2", "eps0", "adversarial training at eps 2/255 gives better calibration than the same recipe "
                                   "without it"),
             ("fgsm_eps4", "eps0", "... at eps 4/255"),
             ("pgd", "eps0", "... at eps 8/255")]
    for a, b, claim in pairs:
        if a not in results or b not in results:
            continue
        for metric in ("ece", "ece_temperature_scaled"):
            better = [p for p in perturbations if results[a][p][metric] < results[b][p][metric]]
            out.append(f"- {claim} — {metric}: {a} < {b} on {len(better)}/{len(perturbations)} perturbations "
                       f"({', '.join(better) or 'none'})")
    return out


def _regimes_problem(ds, names):
    from experiments.regimes import problem

    return problem(ds, names)


def label(p: str) -> str:
    """A perturbation as the figures name it (``PGD-10 8/255``, ``noise σ=0.1``)."""
    from robust_jax.plotting import eps_label

    spec = PERTURBATIONS[p]
    if spec and spec[0] == "pgd":
        return f"PGD-10 {eps_label(spec[1])}"
    return f"noise σ={spec[1]:g}" if spec and spec[0] == "noise_fixed" else p


def main(argv):
    del argv
    import jax

    from experiments.regimes import load_models, series
    from robust_jax import data

    started = time.time()
    ds, perts = FLAGS.dataset, FLAGS.perturbations or list(PERTURBATIONS)
    models = load_models(ds, FLAGS.models)  # f32 evaluation kernels: every logit
    sp = data.splits(ds)
    x, y = data.load(ds, f"{sp['test']}[:{FLAGS.num_examples}]", data_dir=FLAGS.data_dir)
    xv, yv = data.load(ds, data.head(ds, sp["val"], FLAGS.num_val), data_dir=FLAGS.data_dir)  # first num_val of val
    x, xv = data.to_float(x), data.to_float(xv)
    cli.say(f"calibration: {ds}, models {list(models)}, perturbations {perts}, N={len(x)}, val N={len(xv)}, "
            f"{FLAGS.num_bins} bins, seed={FLAGS.seed}, devices={jax.device_count()}")
    out = cli.output_folder(FLAGS.out_dir, f"results/calibration/{ds}")
    (out / "evals").mkdir(exist_ok=True)
    # per-model cache (resumable): valid for these settings; a perturbation's key depends only on its name, and a PGD
    # row is valid for the attack kernels it records (stale)
    record = {"num_examples": len(x), "num_val": len(xv), "num_bins": FLAGS.num_bins, "seed": FLAGS.seed}
    results, temps, conv = {}, {}, {}
    for name, m in models.items():
        ma = m.for_use("attack", FLAGS.conv_impl)  # the kernels PGD differentiates
        conv = cli.kernels(m, ma)
        path = out / "evals" / f"{name}.json"
        cached = json.loads(path.read_text()) if path.is_file() else {}
        cached = cached if cached.get("settings") == record else {}
        save = lambda c, path=path: path.write_text(json.dumps({"settings": record, **c}))  # noqa: E731
        temps[name], rows = calibrate(m, ma, x, y, xv, yv, cached, perts, seed=FLAGS.seed, num_bins=FLAGS.num_bins,
                                      batch_size=FLAGS.batch_size, save=save)
        results[name] = {p: rows[p] for p in perts}
        cli.say(f"{name} (T={temps[name]:.2f}): " + ", ".join(f"{p} ECE {100 * r['ece']:.1f}%"
                                                             for p, r in results[name].items()))
    curves = series(ds, results)
    figures = make_figures(ds, results, curves, perts, len(x), out)
    (out / "results.md").write_text(markdown(ds, results, temps, curves, perts, len(x), conv))
    cards = {n: {k: m.card.get(k) for k in ("name", "test_accuracy", "val_accuracy")} for n, m in models.items()}
    (out / "results.json").write_text(json.dumps(
        {"dataset": ds, "conv_impl": conv, "num_examples": len(x), "num_val": len(xv), "num_bins": FLAGS.num_bins,
         "seed": FLAGS.seed,
         "perturbations": {p: PERTURBATIONS[p] for p in perts}, "models": cards, "temperatures": temps,
         "series": {k: {"strength": st, "models": nm} for k, (st, nm) in curves.items()},
         "results": results, "seconds": time.time() - started}, indent=1))
    cli.finish(out, [f"{n} (T={temps[n]:.2f}): ECE " + ", ".join(f"{p} {100 * r[p]['ece']:.1f}%" for p in perts)
                     for n, r in results.items()], started=started,
               files=["results.md", "results.json", "evals/", *figures])


def make_figures(ds, results, curves, perts, n, out) -> list[str]:
    """Reliability diagrams (rows: models, columns: perturbations) and ECE along each training knob."""
    from robust_jax import plotting

    files = [plotting.reliability_grid(
        {m: {label(p): {**v["reliability"], "ece": v["ece"]} for p, v in r.items()} for m, r in results.items()},
        out / "reliability.png", title=f"{ds}, N={n} test images per panel: reliability ({FLAGS.num_bins} equal-width "
        "bins), rows = models")]
    if curves:
        files.append(plotting.panels(
            [(strengths, {label(p): [results[m][p]["ece"] for m in names] for p in perts}, knob, names)
             for knob, (strengths, names) in curves.items()], out / "ece_vs_strength.png",
            ylabel=f"ECE ({FLAGS.num_bins} bins)", title=f"{ds}, N={n}: calibration along each training knob"))
    return [f.name for f in files]


def markdown(ds, results, temps, curves, perts, n, conv=None) -> str:
    lines = [f"# Calibration under perturbations ({ds}, N={n}, {FLAGS.num_bins}-bin top-label ECE, %)", "",
             "Each cell: ECE / ECE after temperature scaling (T fitted per model on clean validation data) / "
             "accuracy." + (cli.conv_note(conv) if conv else ""), "", "| model | T | " + " | ".join(perts) + " |",
             "|---" * (len(perts) + 2) + "|"]
    for m, r in results.items():
        cells = [f"{100 * r[p]['ece']:.1f} / {100 * r[p]['ece_temperature_scaled']:.1f} / {100 * r[p]['accuracy']:.0f}"
                 for p in perts]
        lines.append(f"| {m} | {temps[m]:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "The original study's claims, checked:", "", *verdicts(results, perts)]
    for knob, (strengths, names) in curves.items():
        lines += ["", f"ECE (%, raw / temperature-scaled) along {knob} "
                  f"({', '.join(f'{m} {st:g}' for m, st in zip(names, strengths))}):"]
        lines += [f"- {p}: " + " → ".join(f"{100 * results[m][p]['ece']:.1f}" for m in names) + " / "
                  + " → ".join(f"{100 * results[m][p]['ece_temperature_scaled']:.1f}" for m in names) for p in perts]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    cli.run(main)
