"""Pixel-wise vs transformation robustness: can one CIFAR-10 model have both? (Kamath et al. 2021, the second deck)

    python -m experiments.tradeoff --dataset=cifar10 --transform=rotation
    python -m experiments.tradeoff --dataset=cifar10                         # every family
    python -m experiments.tradeoff --dataset=cifar10 --train_sweep=fgsm_eps2,rot10 --sweep_epochs=15

Models (configs as code, ``experiments/regimes.py``): the pretrained ResNet-10 checkpoints ``standard``,
``pgd`` (FGSM-RS adversarial training, eps 8/255), ``rot`` (±30° rotations) and ``pgd_rot`` (both) where present,
plus sweep points (``SWEEP``: other eps / rotation strengths, the standard checkpoint's recipe with
``--sweep_epochs``) trained on demand with ``--train_sweep`` into ``--workdir`` (resumable) and picked up by later
runs.

Every model is evaluated on the same N test images: clean accuracy, PGD-k accuracy (eps, 2.5·eps/k step) and, per
transformation family (``robust_jax.attacks.spatial``), worst-of-k accuracy (Engstrom et al. 2019), the mean
accuracy over the k random draws, and accuracy at fixed severities (the accuracy-vs-severity figure). ``--grid``
adds Engstrom's exhaustive 31×5×5 rotation-translation grid. Each (model, evaluation) is cached in
``--out_dir/evals/<model>.json``: a rerun resumes and only computes what is missing.
Writes results.json, results.md, tradeoff_<family>.png and accuracy_vs_<family>.png to --out_dir.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags, logging

ALL_FAMILIES = ["rotation", "translation", "rotation_translation", "perspective", "noise", "blur"]
flags.DEFINE_string("dataset", "cifar10", "cifar10")
flags.DEFINE_list("transform", ALL_FAMILIES, f"transformation families ({', '.join(ALL_FAMILIES)})")
flags.DEFINE_list("models", None, "models to evaluate (default: every available regime and trained sweep point)")
flags.DEFINE_integer("num_examples", 1000, "N test images (the first N of the test split)")
flags.DEFINE_float("eps", 8 / 255, "PGD Linf budget")
flags.DEFINE_integer("pgd_steps", 10, "PGD steps")
flags.DEFINE_integer("k", 10, "worst-of-k: random transformations per image")
flags.DEFINE_bool("grid", False, "also run the exhaustive 31x5x5 rotation-translation grid (775 forward passes/image)")
flags.DEFINE_list("train_sweep", [], "sweep points to train first (names in SWEEP; resumable)")
flags.DEFINE_integer("sweep_epochs", 15, "epochs for sweep points")
flags.DEFINE_string("workdir", "runs/tradeoff", "where sweep points train (resumable)")
flags.DEFINE_integer("batch_size", 500, "evaluation batch size")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR)")
flags.DEFINE_string("out_dir", None, "output dir (default results/tradeoff/<dataset>)")
FLAGS = flags.FLAGS

LIMITS = {"degrees": 30.0, "pixels": 3.0, "sigma": 0.1, "length": 9.0}  # family limits (robust_jax.attacks.spatial)


def severities(name: str):
    """(x values, label, candidate params (L, P)) for the accuracy-vs-severity figure of one family."""
    import numpy as np

    if name == "rotation":
        v = np.linspace(-30, 30, 13)
        return v, "rotation (degrees)", v[:, None]
    if name == "translation":
        v = np.linspace(-3, 3, 7)
        return v, "translation dx = dy (pixels)", np.stack([v, v], 1)
    if name == "rotation_translation":
        v = np.linspace(-30, 30, 7)
        return v, "rotation (degrees) with a (3, 3) px shift", np.stack([v, 3 + 0 * v, 3 + 0 * v], 1)
    if name == "perspective":
        v = np.linspace(0, 3, 7)  # keystone: the top corners move inwards by v pixels
        z = 0 * v
        return v, "keystone (top corners inwards, pixels)", np.stack([v, z, -v, z, z, z, z, z], 1)
    if name == "noise":
        v = np.linspace(0, 0.1, 6)
        return v, "Gaussian noise σ", v[:, None]
    if name == "blur":
        v = np.array([1.0, 3.0, 5.0, 7.0, 9.0])
        return v, "motion blur length (pixels, 45°)", np.stack([v, 45 + 0 * v], 1)
    raise ValueError(name)


def evaluate_model(m, x, y, evals: dict, *, families, eps, pgd_steps, k, grid, seed, batch_size) -> dict:
    """Fill the missing entries of `evals` (a cache dict) for one model; returns it."""
    import functools

    import jax
    import numpy as np

    from robust_jax import attacks
    from robust_jax.attacks import spatial

    logits = lambda v: functools.partial(m.apply, v)  # noqa: E731
    run = functools.partial(attacks.run_attack, batch_size=batch_size, key=jax.random.PRNGKey(seed))
    pred = lambda z: np.concatenate([np.asarray(m(z[i:i + batch_size])).argmax(-1)  # noqa: E731
                                     for i in range(0, len(z), batch_size)])
    if "clean" not in evals:
        evals["clean"] = float(np.mean(pred(x) == y))
    key = f"pgd{pgd_steps}_eps{eps:.5f}"
    if key not in evals:
        t0 = time.time()
        adv = run(lambda v, a, b, kk: attacks.pgd(logits(v), a, b, key=kk, eps=eps, step_size=2.5 * eps / pgd_steps,
                                                   steps=pgd_steps), m.variables, x, y, desc="pgd")
        evals[key] = {"accuracy": float(np.mean(pred(adv) == y)), "eps": eps, "steps": pgd_steps,
                      "seconds": time.time() - t0}
    for name in families:
        fam = spatial.family(name, **LIMITS)
        ek = f"{name}_worst_of_{k}"
        if ek not in evals:
            out = run(lambda v, a, b, kk, fam=fam: spatial.worst_of_k(logits(v), a, b, key=kk, family=fam, k=k),
                      m.variables, x, y, desc=f"{name} worst-of-{k}")
            evals[ek] = {"accuracy": float(np.mean(out["robust"])),
                         "mean_accuracy": float(np.mean(out["mean_correct"])),
                         "k": k, "limits": LIMITS}
        sk = f"{name}_severities"
        if sk not in evals:
            values, label, params = severities(name)
            # one compilation per family: the severity's parameters are a traced argument
            at_severity = lambda vp, a, b, kk, fam=fam: spatial.worst_of(logits(vp[0]), a, b, vp[1][None], fam,  # noqa: E731
                                                                         key=kk)
            accs = []
            for p in params:
                out = run(at_severity, (m.variables, np.asarray(p, np.float32)), x, y, progress=False)
                accs.append(float(np.mean(out["robust"])))
            evals[sk] = {"values": [float(v) for v in values], "label": label, "accuracy": accs}
    if grid and "rotation_translation_grid" not in evals:
        fam = spatial.family("rotation_translation", **LIMITS)
        out = run(lambda v, a, b, kk: spatial.grid(logits(v), a, b, family=fam, shape=(31, 5, 5), key=kk),
                  m.variables, x, y, desc="grid 31x5x5")
        evals["rotation_translation_grid"] = {"accuracy": float(np.mean(out["robust"])),
                                              "mean_accuracy": float(np.mean(out["mean_correct"])),
                                              "shape": [31, 5, 5]}
    return evals


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax

    from experiments.regimes import REGIMES, SWEEP, load_models
    from robust_jax import data, plotting

    ds = FLAGS.dataset
    if ds not in REGIMES:
        raise app.UsageError(f"--dataset: only {sorted(REGIMES)} (got {ds!r})")
    unknown = sorted(set(FLAGS.transform) - set(ALL_FAMILIES)) + sorted(set(FLAGS.train_sweep) - set(SWEEP))
    if unknown:
        raise app.UsageError(f"unknown transform / sweep names {unknown}; transforms {ALL_FAMILIES}, "
                             f"sweep {sorted(SWEEP)}")
    out = Path(FLAGS.out_dir or f"results/tradeoff/{ds}")
    (out / "evals").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    models = load_models(ds, FLAGS.models, data_dir=FLAGS.data_dir, train_sweep=FLAGS.train_sweep,
                         sweep_epochs=FLAGS.sweep_epochs, workdir=FLAGS.workdir)
    x, y = data.load(ds, f"{data.splits(ds)['test']}[:{FLAGS.num_examples}]", data_dir=FLAGS.data_dir)
    x = data.to_float(x)
    print(f"tradeoff: {ds}, models {list(models)}, transforms {FLAGS.transform}, N={len(x)}, "
          f"PGD-{FLAGS.pgd_steps} eps={FLAGS.eps:.4f}, worst-of-{FLAGS.k}, seed={FLAGS.seed}, "
          f"devices={jax.device_count()}")
    settings = {"num_examples": len(x), "eps": FLAGS.eps, "pgd_steps": FLAGS.pgd_steps, "k": FLAGS.k,
                "seed": FLAGS.seed, "limits": LIMITS}
    results = {}
    pgd_key = f"pgd{FLAGS.pgd_steps}_eps{FLAGS.eps:.5f}"
    worst = lambda e, f: e[f"{f}_worst_of_{FLAGS.k}"]  # noqa: E731
    for name, m in models.items():
        path = out / "evals" / f"{name}.json"
        cached = json.loads(path.read_text()) if path.is_file() else {}
        evals = cached.get("evals", {}) if cached.get("settings") == settings else {}
        evals = evaluate_model(m, x, y, evals, families=FLAGS.transform, eps=FLAGS.eps, pgd_steps=FLAGS.pgd_steps,
                               k=FLAGS.k, grid=FLAGS.grid, seed=FLAGS.seed, batch_size=FLAGS.batch_size)
        card = {k: m.card.get(k) for k in ("name", "epochs", "test_accuracy", "val_accuracy")}
        card["regime"] = {k: m.card["hyperparameters"].get(k) for k in ("augment", "rotation_degrees", "adversary",
                                                                        "adv_eps")}
        results[name] = {"card": card, "evals": evals}
        path.write_text(json.dumps({"settings": settings, **results[name]}, indent=2))
        print(f"{name}: clean {evals['clean']:.3f}, PGD {evals[pgd_key]['accuracy']:.3f}, "
              + ", ".join(f"{f} {worst(evals, f)['accuracy']:.3f}" for f in FLAGS.transform))
    for f in FLAGS.transform:
        plotting.scatter({n: (r["evals"][pgd_key]["accuracy"], worst(r["evals"], f)["accuracy"])
                          for n, r in results.items()}, out / f"tradeoff_{f}.png",
                         xlabel=f"PGD-{FLAGS.pgd_steps} accuracy (eps {FLAGS.eps * 255:.0f}/255)",
                         ylabel=f"{f} worst-of-{FLAGS.k} accuracy", title=f"{ds}: pixel vs {f} robustness")
        sev = {n: r["evals"][f"{f}_severities"] for n, r in results.items()}
        first = next(iter(sev.values()))
        plotting.lines(first["values"], {n: s["accuracy"] for n, s in sev.items()}, out / f"accuracy_vs_{f}.png",
                       xlabel=first["label"], ylabel="accuracy", title=f"{ds}: accuracy under {f}")
    lines = [f"# Pixel-wise vs transformation robustness ({ds}, N={len(x)})", "",
             f"PGD-{FLAGS.pgd_steps} at eps {FLAGS.eps * 255:.0f}/255; worst-of-{FLAGS.k} random transformations per "
             f"image within {LIMITS} (accuracy = correct under all k; in brackets: mean accuracy over the k draws).",
             "", "| model | clean | PGD | " + " | ".join(FLAGS.transform)
             + (" | rot+trans grid |" if FLAGS.grid else " |"),
             "|---" * (3 + len(FLAGS.transform) + bool(FLAGS.grid)) + "|"]
    for n, r in results.items():
        e = r["evals"]
        cells = [f"{100 * worst(e, f)['accuracy']:.1f} ({100 * worst(e, f)['mean_accuracy']:.1f})"
                 for f in FLAGS.transform]
        if FLAGS.grid:
            cells.append(f"{100 * e['rotation_translation_grid']['accuracy']:.1f}")
        lines.append(f"| {n} | {100 * e['clean']:.1f} | {100 * e[pgd_key]['accuracy']:.1f} | "
                     + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"dataset": ds, "settings": settings, "models": results,
                                                  "seconds": time.time() - t0}, indent=2))
    print("\n".join(lines))
    print(f"wrote {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    app.run(main)
