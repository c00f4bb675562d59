"""Pixel-wise vs transformation robustness: can one CIFAR-10 model have both? (Kamath et al. 2021, the second deck)

    python -m experiments.tradeoff --dataset=cifar10 --transform=rotation
    python -m experiments.tradeoff --dataset=cifar10                         # every family
    python -m experiments.tradeoff --dataset=cifar10 --models=standard,pgd,rot,pgd_rot

Models (configs as code, ``experiments/regimes.py``): the pretrained ResNet-10 checkpoints ``standard``,
``pgd`` (FGSM-RS adversarial training, eps 8/255), ``rot`` (±30° rotations), ``pgd_rot`` (both) and the points of
the trade-off curves (``SERIES``): adversarial training at eps 2/255 and 4/255 (``fgsm_eps2``, ``fgsm_eps4``) and
rotation training at ±10° and ±20° (``rot10``, ``rot20``).

Every model is evaluated on the same N test images: clean accuracy, PGD-k accuracy (eps, 2.5·eps/k step; also at
the smaller ``--curve_eps`` budgets, where models that are not adversarially trained still have some accuracy) and,
per transformation family (``robust_jax.attacks.spatial``), worst-of-k accuracy (Engstrom et al. 2019), the mean
accuracy over the k random draws, and accuracy at fixed severities (the accuracy-vs-severity figure). ``--grid``
adds Engstrom's exhaustive 31×5×5 rotation-translation grid. Each (model, evaluation) is cached in
``--out_dir/evals/<model>.json``: a rerun resumes and only computes what is missing.
Writes results.json, results.md, tradeoff_<family>.png (the trade-off plane, series joined as curves),
strength_<family>.png (accuracies along each series) and accuracy_vs_<family>.png to --out_dir.
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
flags.DEFINE_list("curve_eps", ["1", "2"], "further PGD budgets, in 1/255 (same steps)")
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


def pgd_key(steps: int, eps: float) -> str:
    return f"pgd{steps}_eps{eps:.5f}"


def evaluate_model(m, x, y, evals: dict, *, families, budgets, pgd_steps, k, grid, seed, batch_size) -> dict:
    """Fill the missing entries of `evals` (a cache dict) for one model (PGD at each eps in `budgets`); returns it."""
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
    for e in budgets:
        key = pgd_key(pgd_steps, e)
        if key in evals:
            continue
        t0 = time.time()
        attack = lambda v, a, b, kk, e=e: attacks.pgd(logits(v), a, b, key=kk, eps=e,  # noqa: E731
                                                      step_size=2.5 * e / pgd_steps, steps=pgd_steps)
        adv = run(attack, m.variables, x, y, desc=f"pgd {e * 255:g}/255")
        evals[key] = {"accuracy": float(np.mean(pred(adv) == y)), "eps": e, "steps": pgd_steps,
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

    from experiments.regimes import REGIMES, load_models, series
    from robust_jax import data, plotting

    ds = FLAGS.dataset
    if ds not in REGIMES:
        raise app.UsageError(f"--dataset: only {sorted(REGIMES)} (got {ds!r})")
    unknown = sorted(set(FLAGS.transform) - set(ALL_FAMILIES)) + sorted(set(FLAGS.models or ()) - set(REGIMES[ds]))
    if unknown:
        raise app.UsageError(f"unknown transform / model names {unknown}; transforms {ALL_FAMILIES}, "
                             f"models {sorted(REGIMES[ds])}")
    try:
        curve = sorted({float(e) / 255 for e in FLAGS.curve_eps} - {FLAGS.eps})
    except ValueError as err:
        raise app.UsageError(f"--curve_eps: numbers in 1/255 ({err})") from err
    if FLAGS.eps < 0 or any(e < 0 for e in curve):
        raise app.UsageError("PGD budgets must be >= 0")
    budgets = [FLAGS.eps, *curve]
    out = Path(FLAGS.out_dir or f"results/tradeoff/{ds}")
    (out / "evals").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    models = load_models(ds, FLAGS.models)
    x, y = data.load(ds, f"{data.splits(ds)['test']}[:{FLAGS.num_examples}]", data_dir=FLAGS.data_dir)
    x = data.to_float(x)
    print(f"tradeoff: {ds}, models {list(models)}, transforms {FLAGS.transform}, N={len(x)}, "
          f"PGD-{FLAGS.pgd_steps} eps={[round(e * 255, 2) for e in budgets]}/255, worst-of-{FLAGS.k}, "
          f"seed={FLAGS.seed}, devices={jax.device_count()}")
    # the cache is valid for these settings; further PGD budgets are separate entries (eps in their key)
    settings = {"num_examples": len(x), "eps": FLAGS.eps, "pgd_steps": FLAGS.pgd_steps, "k": FLAGS.k,
                "seed": FLAGS.seed, "limits": LIMITS}
    results = {}
    main_key = pgd_key(FLAGS.pgd_steps, FLAGS.eps)
    worst = lambda e, f: e[f"{f}_worst_of_{FLAGS.k}"]  # noqa: E731
    for name, m in models.items():
        path = out / "evals" / f"{name}.json"
        cached = json.loads(path.read_text()) if path.is_file() else {}
        evals = cached.get("evals", {}) if cached.get("settings") == settings else {}
        evals = evaluate_model(m, x, y, evals, families=FLAGS.transform, budgets=budgets, pgd_steps=FLAGS.pgd_steps,
                               k=FLAGS.k, grid=FLAGS.grid, seed=FLAGS.seed, batch_size=FLAGS.batch_size)
        card = {k: m.card.get(k) for k in ("name", "epochs", "test_accuracy", "val_accuracy")}
        card["regime"] = {k: m.card["hyperparameters"].get(k) for k in ("augment", "rotation_degrees", "adversary",
                                                                        "adv_eps")}
        results[name] = {"card": card, "evals": evals}
        path.write_text(json.dumps({"settings": settings, **results[name]}, indent=2))
        print(f"{name}: clean {evals['clean']:.3f}, "
              + ", ".join(f"PGD {e * 255:g}/255 {evals[pgd_key(FLAGS.pgd_steps, e)]['accuracy']:.3f}" for e in budgets)
              + ", " + ", ".join(f"{f} {worst(evals, f)['accuracy']:.3f}" for f in FLAGS.transform))
    curves = series(ds, results)
    pgd_label = lambda e: f"PGD-{FLAGS.pgd_steps} {e * 255:g}/255"  # noqa: E731
    for f in FLAGS.transform:
        plotting.scatter({n: (r["evals"][main_key]["accuracy"], worst(r["evals"], f)["accuracy"])
                          for n, r in results.items()}, out / f"tradeoff_{f}.png",
                         xlabel=f"{pgd_label(FLAGS.eps)} accuracy", ylabel=f"{f} worst-of-{FLAGS.k} accuracy",
                         title=f"{ds}: pixel vs {f} robustness",
                         paths={lab: names for lab, (_, names) in curves.items()})
        sev = {n: r["evals"][f"{f}_severities"] for n, r in results.items()}
        first = next(iter(sev.values()))
        plotting.lines(first["values"], {n: s["accuracy"] for n, s in sev.items()}, out / f"accuracy_vs_{f}.png",
                       xlabel=first["label"], ylabel="accuracy", title=f"{ds}: accuracy under {f}")
        if curves:
            panels = []
            for label, (strengths, names) in curves.items():
                ys = {"clean": [results[n]["evals"]["clean"] for n in names]}
                for e in sorted(budgets):
                    ys[pgd_label(e)] = [results[n]["evals"][pgd_key(FLAGS.pgd_steps, e)]["accuracy"] for n in names]
                ys[f"{f} worst-of-{FLAGS.k}"] = [worst(results[n]["evals"], f)["accuracy"] for n in names]
                panels.append((strengths, ys, label, names))
            plotting.panels(panels, out / f"strength_{f}.png", ylabel="accuracy",
                            title=f"{ds}: robustness along each training knob ({f})")
    budget_cols = sorted(budgets)
    # the grid column appears once any model has a cached grid result (e.g. a --grid run on a subset of models)
    show_grid = any("rotation_translation_grid" in r["evals"] for r in results.values())
    lines = [f"# Pixel-wise vs transformation robustness ({ds}, N={len(x)})", "",
             f"PGD-{FLAGS.pgd_steps} at eps " + ", ".join(f"{e * 255:g}/255" for e in budget_cols)
             + f" (step 2.5·eps/{FLAGS.pgd_steps}); worst-of-{FLAGS.k} random transformations per "
             f"image within {LIMITS} (accuracy = correct under all k; in brackets: mean accuracy over the k draws).",
             "", "| model | clean | " + " | ".join(f"PGD {e * 255:g}" for e in budget_cols) + " | "
             + " | ".join(FLAGS.transform) + (" | rot+trans grid |" if show_grid else " |"),
             "|---" * (2 + len(budget_cols) + len(FLAGS.transform) + show_grid) + "|"]
    for n, r in results.items():
        e = r["evals"]
        cells = [f"{100 * e[pgd_key(FLAGS.pgd_steps, b)]['accuracy']:.1f}" for b in budget_cols]
        cells += [f"{100 * worst(e, f)['accuracy']:.1f} ({100 * worst(e, f)['mean_accuracy']:.1f})"
                  for f in FLAGS.transform]
        if show_grid:
            g = e.get("rotation_translation_grid")
            cells.append(f"{100 * g['accuracy']:.1f}" if g else "–")
        lines.append(f"| {n} | {100 * e['clean']:.1f} | " + " | ".join(cells) + " |")
    for label, (strengths, names) in curves.items():
        lines += ["", f"Along {label} ({', '.join(f'{n} {s:g}' for n, s in zip(names, strengths))}):"]
        for col, get in [("clean", lambda e: e["clean"])] + [
                (pgd_label(b), lambda e, b=b: e[pgd_key(FLAGS.pgd_steps, b)]["accuracy"]) for b in budget_cols] + [
                (f"{f} worst-of-{FLAGS.k}", lambda e, f=f: worst(e, f)["accuracy"]) for f in FLAGS.transform]:
            lines.append(f"- {col}: " + " → ".join(f"{100 * get(results[n]['evals']):.1f}" for n in names))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"dataset": ds, "settings": {**settings, "curve_eps": curve},
                                                  "series": {k: {"strength": s, "models": n}
                                                             for k, (s, n) in curves.items()},
                                                  "models": results, "seconds": time.time() - t0}, indent=2))
    print("\n".join(lines))
    print(f"wrote {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    app.run(main)
