"""Which robustness makes a CNN better calibrated? ECE and reliability diagrams per model and perturbation.

    python -m experiments.calibration --dataset=cifar10

Models: the trade-off study's (``experiments.tradeoff.REGIMES``: standard, PGD-trained, rotation-trained, both;
plus trained sweep points). Perturbations (``PERTURBATIONS``): clean; PGD-10 crafted against each model at eps
2/255 and 8/255; one random draw per image of rotation (±30°), translation (±3 px), perspective (corners ±3 px),
Gaussian noise (σ 0.05 and 0.1) and motion blur (length ≤ 9 px, any angle).

Metrics (``robust_jax.metrics``): top-label ECE with 15 equal-width bins, adaptive (equal-mass) ECE, accuracy, mean
confidence, NLL; and the same ECE after temperature scaling, with one temperature per model fitted on clean
validation data (``train[45000:]``) by NLL — so a model is not "better calibrated" merely because it was trained with
label smoothing (the standard and rotation checkpoints were, the PGD-trained ones were not).
Writes results.json, results.md and reliability.png (rows: models, columns: perturbations) to --out_dir.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags, logging

flags.DEFINE_string("dataset", "cifar10", "cifar10")
flags.DEFINE_list("models", None, "models (default: every available regime of experiments.tradeoff)")
flags.DEFINE_list("perturbations", None, "perturbations (default: all of PERTURBATIONS)")
flags.DEFINE_integer("num_examples", 2000, "N test images (the first N of the test split)")
flags.DEFINE_integer("num_val", 2000, "validation images for the temperature fit")
flags.DEFINE_integer("num_bins", 15, "ECE bins")
flags.DEFINE_integer("batch_size", 500, "batch size")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_string("workdir", "runs/tradeoff", "sweep points' run directory (as in experiments.tradeoff)")
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
             ("rot", "standard", "rotation training gives better calibration than standard")]
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

    from experiments.regimes import load_models
    from robust_jax import data, plotting

    ds = FLAGS.dataset
    perts = FLAGS.perturbations or list(PERTURBATIONS)
    unknown = sorted(set(perts) - set(PERTURBATIONS))
    if unknown:
        raise app.UsageError(f"unknown perturbations {unknown}; choose from {list(PERTURBATIONS)}")
    t0 = time.time()
    models = load_models(ds, FLAGS.models, data_dir=FLAGS.data_dir, workdir=FLAGS.workdir)
    sp = data.splits(ds)
    x, y = data.load(ds, f"{sp['test']}[:{FLAGS.num_examples}]", data_dir=FLAGS.data_dir)
    xv, yv = data.load(ds, sp["val"], data_dir=FLAGS.data_dir)
    xv, yv = xv[:FLAGS.num_val], yv[:FLAGS.num_val]
    x, xv = data.to_float(x), data.to_float(xv)
    print(f"calibration: {ds}, models {list(models)}, perturbations {perts}, N={len(x)}, val N={len(xv)}, "
          f"{FLAGS.num_bins} bins, seed={FLAGS.seed}, devices={jax.device_count()}")
    results, temps = {}, {}
    for name, m in models.items():
        temps[name] = fit_temperature(logits_of(m, xv, FLAGS.batch_size), yv)
        results[name] = {}
        for i, p in enumerate(perts):
            xp = perturb(m, p, x, y, jax.random.fold_in(jax.random.PRNGKey(FLAGS.seed), i), FLAGS.batch_size)
            results[name][p] = calibration_row(logits_of(m, xp, FLAGS.batch_size), y, temps[name], FLAGS.num_bins)
        print(f"{name} (T={temps[name]:.2f}): " + ", ".join(f"{p} ECE {100 * r['ece']:.1f}%"
                                                           for p, r in results[name].items()))
    out = Path(FLAGS.out_dir or f"results/calibration/{ds}")
    out.mkdir(parents=True, exist_ok=True)
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
    lines += ["", "The deck's claims, checked:", "", *verdicts(results, perts)]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    cards = {n: {k: m.card.get(k) for k in ("name", "test_accuracy", "val_accuracy")} for n, m in models.items()}
    (out / "results.json").write_text(json.dumps(
        {"dataset": ds, "num_examples": len(x), "num_val": len(xv), "num_bins": FLAGS.num_bins, "seed": FLAGS.seed,
         "perturbations": {p: PERTURBATIONS[p] for p in perts}, "models": cards, "temperatures": temps,
         "results": results, "seconds": time.time() - t0}, indent=1))
    print("\n".join(lines))
    print(f"wrote {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    app.run(main)
