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
Each (model, perturbation) is cached in --out_dir/evals/<model>.json: a rerun only computes what is missing.
Writes results.json, results.md, reliability.png (rows: models, columns: perturbations) and
ece_vs_strength.png (ECE along each training knob of ``SERIES``) to --out_dir.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags, logging

flags.DEFINE_string("dataset", "cifar10", "cifar10")
flags.DEFINE_list("models", None, "models (default: every available regime in experiments/regimes.py)")
flags.DEFINE_list("perturbations", None, "perturbations (default: all of PERTURBATIONS)")
flags.DEFINE_integer("num_examples", 2000, "N test images (the first N of the test split)")
flags.DEFINE_integer("num_val", 2000, "validation images for the temperature fit")
flags.DEFINE_integer("num_bins", 15, "ECE bins")
flags.DEFINE_integer("batch_size", 500, "batch size")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR)")
flags.DEFINE_string("out_dir", None, "output dir (default results/calibration/<dataset>)")
FLAGS = flags.FLAGS

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
TEMPERATURES = [0.5 + 0.05 * i for i in range(51)]  # grid for the temperature fit (0.5 .. 3.0)


def perturb(m, name: str, x, y, key, batch_size: int):
    """The perturbed inputs for one model."""
    import functools

    import jax
    import numpy as np

    from robust_jax import attacks, transforms
    from robust_jax.attacks import spatial

    spec = PERTURBATIONS[name]
    if spec is None:
        return x
    kind, arg = spec
    if kind == "pgd":
        steps = 10
        return attacks.run_attack(lambda v, a, b, k: attacks.pgd(functools.partial(m.apply, v), a, b, key=k, eps=arg,
                                                                 step_size=2.5 * arg / steps, steps=steps),
                                  m.variables, x, y, key=key, batch_size=batch_size, desc=name)
    if kind == "noise_fixed":
        return np.asarray(transforms.gaussian_noise(jax.numpy.asarray(x), arg, key))
    fam = spatial.family(kind, **arg)
    params = fam.sample(key, len(x))
    return np.concatenate([np.asarray(fam.apply(jax.numpy.asarray(x[i:i + batch_size]), params[i:i + batch_size],
                                                None)) for i in range(0, len(x), batch_size)])


def logits_of(m, x, batch_size: int):
    import numpy as np

    return np.concatenate([np.asarray(m(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


def fit_temperature(logits, labels) -> float:
    """The grid temperature minimising the NLL of softmax(logits / T)."""
    import numpy as np

    from robust_jax.metrics import nll

    return float(TEMPERATURES[int(np.argmin([nll(logits / t, labels) for t in TEMPERATURES]))])


def calibration_row(logits, labels, temperature: float, num_bins: int) -> dict:
    import numpy as np
    from scipy.special import softmax

    from robust_jax import metrics

    p, pt = softmax(logits, -1), softmax(logits / temperature, -1)
    rel = metrics.reliability(p, labels, num_bins)
    return {"accuracy": float(np.mean(p.argmax(-1) == labels)), "confidence": float(p.max(-1).mean()),
            "ece": metrics.ece(p, labels, num_bins), "ece_adaptive": metrics.ece(p, labels, num_bins, adaptive=True),
            "nll": metrics.nll(logits, labels), "ece_temperature_scaled": metrics.ece(pt, labels, num_bins),
            "reliability": {k: v.tolist() for k, v in rel.items()}}


def verdicts(results: dict, perturbations) -> list[str]:
    """The deck's claims, each checked per perturbation from the numbers (raw ECE and temperature-scaled)."""
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


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax

    from experiments.regimes import REGIMES, load_models, series
    from robust_jax import data, plotting

    ds = FLAGS.dataset
    perts = FLAGS.perturbations or list(PERTURBATIONS)
    unknown = sorted(set(perts) - set(PERTURBATIONS))
    if unknown:
        raise app.UsageError(f"unknown perturbations {unknown}; choose from {list(PERTURBATIONS)}")
    if ds not in REGIMES or set(FLAGS.models or ()) - set(REGIMES[ds]):
        raise app.UsageError(f"--dataset / --models: regimes are {REGIMES} (got {ds!r}, {FLAGS.models})")
    t0 = time.time()
    models = load_models(ds, FLAGS.models)
    sp = data.splits(ds)
    x, y = data.load(ds, f"{sp['test']}[:{FLAGS.num_examples}]", data_dir=FLAGS.data_dir)
    xv, yv = data.load(ds, sp["val"], data_dir=FLAGS.data_dir)
    xv, yv = xv[:FLAGS.num_val], yv[:FLAGS.num_val]
    x, xv = data.to_float(x), data.to_float(xv)
    print(f"calibration: {ds}, models {list(models)}, perturbations {perts}, N={len(x)}, val N={len(xv)}, "
          f"{FLAGS.num_bins} bins, seed={FLAGS.seed}, devices={jax.device_count()}")
    out = Path(FLAGS.out_dir or f"results/calibration/{ds}")
    (out / "evals").mkdir(parents=True, exist_ok=True)
    # per-model cache (resumable): valid for these settings; a perturbation's key depends only on its name
    settings = {"num_examples": len(x), "num_val": len(xv), "num_bins": FLAGS.num_bins, "seed": FLAGS.seed}
    results, temps = {}, {}
    for name, m in models.items():
        path = out / "evals" / f"{name}.json"
        cached = json.loads(path.read_text()) if path.is_file() else {}
        if cached.get("settings") != settings:
            cached = {}
        temps[name] = cached.get("temperature") or fit_temperature(logits_of(m, xv, FLAGS.batch_size), yv)
        rows = cached.get("rows", {})
        for p in perts:
            if p not in rows:
                k = jax.random.fold_in(jax.random.PRNGKey(FLAGS.seed), list(PERTURBATIONS).index(p))
                xp = perturb(m, p, x, y, k, FLAGS.batch_size)
                rows[p] = calibration_row(logits_of(m, xp, FLAGS.batch_size), y, temps[name], FLAGS.num_bins)
                path.write_text(json.dumps({"settings": settings, "temperature": temps[name], "rows": rows}))
        results[name] = {p: rows[p] for p in perts}
        print(f"{name} (T={temps[name]:.2f}): " + ", ".join(f"{p} ECE {100 * r['ece']:.1f}%"
                                                           for p, r in results[name].items()))
    plotting.reliability_grid({n: {p: {**v["reliability"], "ece": v["ece"]} for p, v in r.items()}
                               for n, r in results.items()}, out / "reliability.png",
                              title=f"{ds}: reliability (15 equal-width bins), rows = models")
    lines = [f"# Calibration under perturbations ({ds}, N={len(x)}, {FLAGS.num_bins}-bin top-label ECE, %)", "",
             "Each cell: ECE / ECE after temperature scaling (T fitted per model on clean validation data) / "
             "accuracy.", "", "| model | T | " + " | ".join(perts) + " |", "|---" * (len(perts) + 2) + "|"]
    for n, r in results.items():
        cells = [f"{100 * r[p]['ece']:.1f} / {100 * r[p]['ece_temperature_scaled']:.1f} / {100 * r[p]['accuracy']:.0f}"
                 for p in perts]
        lines.append(f"| {n} | {temps[n]:.2f} | " + " | ".join(cells) + " |")
    curves = series(ds, results)
    if curves:
        plotting.panels([(strengths, {p: [results[n][p]["ece"] for n in names] for p in perts}, label, names)
                         for label, (strengths, names) in curves.items()], out / "ece_vs_strength.png",
                        ylabel=f"ECE ({FLAGS.num_bins} bins)", title=f"{ds}: calibration along each training knob")
    lines += ["", "The deck's claims, checked:", "", *verdicts(results, perts)]
    for label, (strengths, names) in curves.items():
        lines += ["", f"ECE (%, raw / temperature-scaled) along {label} "
                  f"({', '.join(f'{n} {s:g}' for n, s in zip(names, strengths))}):"]
        lines += [f"- {p}: " + " → ".join(f"{100 * results[n][p]['ece']:.1f}" for n in names) + " / "
                  + " → ".join(f"{100 * results[n][p]['ece_temperature_scaled']:.1f}" for n in names) for p in perts]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    cards = {n: {k: m.card.get(k) for k in ("name", "test_accuracy", "val_accuracy")} for n, m in models.items()}
    (out / "results.json").write_text(json.dumps(
        {"dataset": ds, "num_examples": len(x), "num_val": len(xv), "num_bins": FLAGS.num_bins, "seed": FLAGS.seed,
         "perturbations": {p: PERTURBATIONS[p] for p in perts}, "models": cards, "temperatures": temps,
         "series": {k: {"strength": st, "models": nm} for k, (st, nm) in curves.items()},
         "results": results, "seconds": time.time() - t0}, indent=1))
    print("\n".join(lines))
    print(f"wrote {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    app.run(main)
