"""Pixel-wise vs transformation robustness: can one CIFAR-10 model have both? (Kamath et al. 2021)

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
adds Engstrom's exhaustive 31×5×5 rotation-translation grid. PGD differentiates each checkpoint with the attack
kernels of --conv_impl; the transformation searches (forward passes only) and every accuracy use the f32 evaluation
kernels. Each (model, evaluation) is cached in ``--out_dir/evals/<model>.json``: a rerun resumes and only computes
what is missing; a PGD entry records its attack kernels (``conv_impl``; entries without it were computed with
``custom_vjp``) and is recomputed when they differ from this run's.
Writes results.json, results.md, tradeoff_<family>.png (the trade-off plane, series joined as curves),
strength_<family>.png (accuracies along each series) and accuracy_vs_<family>.png to --out_dir.
"""

from __future__ import annotations

import json
import time
import types

from absl import flags

from experiments import cli
from experiments.regimes import REGIMES

ALL_FAMILIES = ["rotation", "translation", "rotation_translation", "perspective", "noise", "blur"]
cli.dataset("cifar10", REGIMES, "dataset (its training regimes are experiments/regimes.py's)")
cli.names("transform", ALL_FAMILIES, ALL_FAMILIES, "transformation families")
cli.names("models", None, sorted({n for r in REGIMES.values() for n in r}),
          "models to evaluate (default: every regime whose checkpoint is available)")
cli.count("num_examples", 1000, "N test images (the first N of the test split)")
cli.eps("eps", 8 / 255, "PGD Linf budget")
cli.count("pgd_steps", 10, "PGD steps")
cli.count("k", 10, "worst-of-k: random transformations per image")
flags.DEFINE_bool("grid", False, "also run the exhaustive 31x5x5 rotation-translation grid (775 forward passes/image)")
cli.eps_list("curve_eps", [1 / 255, 2 / 255], "further PGD budgets (same steps)")
cli.conv_impl()
cli.batch_size(500, "evaluation batch size")
cli.seed()
cli.data_dir()
cli.out_dir("tradeoff")
cli.validate(["dataset", "models"], lambda v: _regimes_problem(v["dataset"], v["models"]))
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


def missing_pgd(evals: dict, budgets, pgd_steps: int, conv_impl: str) -> list:
    """The budgets whose PGD entry `evals` lacks, or holds computed with attack kernels other than `conv_impl`
    (``cli.attack_kernels_of``: entries without a record were computed with ``custom_vjp``)."""
    return [e for e in budgets if pgd_key(pgd_steps, e) not in evals
            or cli.attack_kernels_of(evals[pgd_key(pgd_steps, e)]) != conv_impl]


def evaluate_model(m, ma, x, y, evals: dict, *, families, budgets, pgd_steps, k, grid, seed, batch_size) -> dict:
    """Fill the missing entries of `evals` (a cache dict) for one model (PGD at each eps in `budgets`); returns it.
    `m` is the checkpoint with the f32 evaluation kernels: every accuracy and the transformation searches (forward
    passes only); `ma` the same weights with the attack kernels, which PGD differentiates. A PGD entry records
    `ma`'s kernels (``conv_impl``) and is recomputed when they differ (:func:`missing_pgd`)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from robust_jax import attacks, runner
    from robust_jax.attacks import spatial
    from robust_jax.plotting import eps_label

    logits = lambda v: functools.partial(m.apply, v)  # noqa: E731
    attack_logits = lambda v: functools.partial(ma.apply, v)  # noqa: E731
    run = functools.partial(runner.run_attack, batch_size=batch_size, key=jax.random.PRNGKey(seed))
    pred = lambda z: m.predict(z, batch_size).argmax(-1)  # noqa: E731
    if "clean" not in evals:
        evals["clean"] = float(np.mean(pred(x) == y))
    conv = ma.model.conv_impl
    missing = missing_pgd(evals, budgets, pgd_steps, conv)
    if missing:  # every missing budget in one compiled call: an eps array (leading axis moved behind the batch)
        t0 = time.time()
        eps, step = (jnp.asarray(v, jnp.float32) for v in (missing, [2.5 * e / pgd_steps for e in missing]))
        attack = lambda v, a, b, kk: jnp.moveaxis(attacks.pgd(attack_logits(v), a, b, key=kk,  # noqa: E731
                                                              eps=eps, step_size=step, steps=pgd_steps), 0, 1)
        adv = run(attack, m.variables, x, y, desc=f"pgd {', '.join(eps_label(e) for e in missing)}")
        for i, e in enumerate(missing):
            evals[pgd_key(pgd_steps, e)] = {"accuracy": float(np.mean(pred(adv[:, i]) == y)), "eps": e,
                                            "steps": pgd_steps, "conv_impl": conv,
                                            "seconds": (time.time() - t0) / len(missing)}
    for name in families:
        fam = spatial.family(name, **LIMITS)
        ek = f"{name}_worst_of_{k}"
        if ek not in evals:
            out = run(lambda v, a, b, kk, fam=fam: spatial.worst_of_k_report(logits(v), a, b, key=kk, family=fam, k=k),
                      m.variables, x, y, desc=f"{name} worst-of-{k}")
            evals[ek] = {"accuracy": float(np.mean(out["robust"])),
                         "mean_accuracy": float(np.mean(out["mean_correct"])),
                         "k": k, "limits": LIMITS}
        sk = f"{name}_severities"
        if sk not in evals:
            values, label, params = severities(name)
            # one compilation per family: the severity's parameters are a traced argument
            at_severity = lambda vp, a, b, kk, fam=fam: spatial.search(  # noqa: E731
                logits(vp[0]), a, b, key=kk, family=fam, candidates=vp[1][None])
            accs = []
            for p in params:
                out = run(at_severity, (m.variables, np.asarray(p, np.float32)), x, y, progress=False)
                accs.append(float(np.mean(out["robust"])))
            evals[sk] = {"values": [float(v) for v in values], "label": label, "accuracy": accs}
    if grid and "rotation_translation_grid" not in evals:
        fam = spatial.family("rotation_translation", **LIMITS)
        out = run(lambda v, a, b, kk: spatial.grid_report(logits(v), a, b, key=kk, family=fam, shape=(31, 5, 5)),
                  m.variables, x, y, desc="grid 31x5x5")
        evals["rotation_translation_grid"] = {"accuracy": float(np.mean(out["robust"])),
                                              "mean_accuracy": float(np.mean(out["mean_correct"])),
                                              "shape": [31, 5, 5]}
    return evals


def _regimes_problem(ds, names):
    from experiments.regimes import problem

    return problem(ds, names)


def settings() -> types.SimpleNamespace:
    budgets = [FLAGS.eps, *sorted(set(FLAGS.curve_eps) - {FLAGS.eps})]
    return types.SimpleNamespace(dataset=FLAGS.dataset, budgets=budgets, curve=budgets[1:], families=FLAGS.transform,
                                 main_key=pgd_key(FLAGS.pgd_steps, FLAGS.eps))


def main(argv):
    del argv
    import jax

    from experiments.regimes import load_models, series
    from robust_jax import data

    started = time.time()
    s = settings()
    models = load_models(s.dataset, FLAGS.models)  # f32 evaluation kernels: every accuracy, the spatial searches
    x, y = data.load(s.dataset, f"{data.splits(s.dataset)['test']}[:{FLAGS.num_examples}]", data_dir=FLAGS.data_dir)
    x = data.to_float(x)
    cli.say(f"tradeoff: {s.dataset}, models {list(models)}, transforms {s.families}, N={len(x)}, "
            f"PGD-{FLAGS.pgd_steps} eps {', '.join(_eps(e) for e in s.budgets)}, worst-of-{FLAGS.k}, "
            f"seed={FLAGS.seed}, devices={jax.device_count()}")
    # the cache is valid for these settings; further PGD budgets are separate entries (eps in their key), and a PGD
    # entry is valid for the attack kernels it records (missing_pgd)
    s.record = {"num_examples": len(x), "eps": FLAGS.eps, "pgd_steps": FLAGS.pgd_steps, "k": FLAGS.k,
                "seed": FLAGS.seed, "limits": LIMITS}
    out = cli.output_folder(FLAGS.out_dir, f"results/tradeoff/{s.dataset}")
    results, conv = {}, {}
    for name, m in models.items():
        ma = m.for_use("attack", FLAGS.conv_impl)  # the kernels PGD differentiates
        conv = cli.kernels(m, ma)
        path = out / "evals" / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        cached = json.loads(path.read_text()) if path.is_file() else {}
        evals = evaluate_model(m, ma, x, y, cached.get("evals", {}) if cached.get("settings") == s.record else {},
                               families=s.families, budgets=s.budgets, pgd_steps=FLAGS.pgd_steps, k=FLAGS.k,
                               grid=FLAGS.grid, seed=FLAGS.seed, batch_size=FLAGS.batch_size)
        card = {k: m.card.get(k) for k in ("name", "epochs", "test_accuracy", "val_accuracy")}
        card["regime"] = {k: m.card["hyperparameters"].get(k) for k in ("augment", "rotation_degrees", "adversary",
                                                                        "adv_eps")}
        results[name] = {"card": card, "evals": evals}
        path.write_text(json.dumps({"settings": s.record, **results[name]}, indent=2))
        cli.say(f"{name}: " + ", ".join(f"{col} {get(evals):.3f}" for col, get in columns(s)))
    curves = series(s.dataset, results)
    figures = make_figures(s, results, curves, len(x), out)
    (out / "results.md").write_text(markdown(s, results, curves, len(x), conv))
    (out / "results.json").write_text(json.dumps({"dataset": s.dataset, "conv_impl": conv,
                                                  "settings": {**s.record, "curve_eps": s.curve},
                                                  "series": {k: {"strength": st, "models": n}
                                                             for k, (st, n) in curves.items()},
                                                  "models": results, "seconds": time.time() - started}, indent=2))
    cli.finish(out, [f"{n}: " + ", ".join(f"{col} {100 * get(r['evals']):.1f}%" for col, get in columns(s))
                     for n, r in results.items()], started=started,
               files=["results.md", "results.json", "evals/", *figures])


def _eps(v) -> str:
    from robust_jax.plotting import eps_label

    return eps_label(v)


def _pgd_label(e) -> str:
    return f"PGD-{FLAGS.pgd_steps} {_eps(e)}"


def _worst(evals, family):
    return evals[f"{family}_worst_of_{FLAGS.k}"]


def columns(s) -> list:
    """(label, evals -> accuracy) of the headline columns: clean, PGD at each budget, worst-of-k per family."""
    return ([("clean", lambda e: e["clean"])]
            + [(_pgd_label(b), lambda e, b=b: e[pgd_key(FLAGS.pgd_steps, b)]["accuracy"]) for b in sorted(s.budgets)]
            + [(f"{f} worst-of-{FLAGS.k}", lambda e, f=f: _worst(e, f)["accuracy"]) for f in s.families])


def make_figures(s, results, curves, n, out) -> list[str]:
    """Per family: the trade-off plane, accuracy vs severity, and accuracy along each training knob."""
    from robust_jax import plotting

    ds, files = s.dataset, []
    for f in s.families:
        files.append(plotting.scatter(
            {m: (r["evals"][s.main_key]["accuracy"], _worst(r["evals"], f)["accuracy"]) for m, r in results.items()},
            out / f"tradeoff_{f}.png", xlabel=f"{_pgd_label(FLAGS.eps)} accuracy",
            ylabel=f"{f} worst-of-{FLAGS.k} accuracy", title=f"{ds}, N={n}: pixel vs {f} robustness",
            paths={label: names for label, (_, names) in curves.items()}))
        sev = {m: r["evals"][f"{f}_severities"] for m, r in results.items()}
        first = next(iter(sev.values()))
        files.append(plotting.lines(first["values"], {m: v["accuracy"] for m, v in sev.items()},
                                    out / f"accuracy_vs_{f}.png", xlabel=first["label"], ylabel="accuracy",
                                    title=f"{ds}, N={n}: accuracy under {f}"))
        if curves:
            cols = [c for c in columns(s) if "worst-of" not in c[0] or c[0].startswith(f"{f} ")]
            panels = [(strengths, {col: [get(results[m]["evals"]) for m in names] for col, get in cols}, label, names)
                      for label, (strengths, names) in curves.items()]
            files.append(plotting.panels(panels, out / f"strength_{f}.png", ylabel="accuracy",
                                         title=f"{ds}, N={n}: robustness along each training knob ({f})"))
    return [f.name for f in files]


def markdown(s, results, curves, n, conv=None) -> str:
    budget_cols = sorted(s.budgets)
    # the grid column appears once any model has a cached grid result (e.g. a --grid run on a subset of models)
    show_grid = any("rotation_translation_grid" in r["evals"] for r in results.values())
    lines = [f"# Pixel-wise vs transformation robustness ({s.dataset}, N={n})", "",
             f"PGD-{FLAGS.pgd_steps} at eps " + ", ".join(_eps(e) for e in budget_cols)
             + f" (step 2.5·eps/{FLAGS.pgd_steps}); worst-of-{FLAGS.k} random transformations per "
             f"image within {LIMITS} (accuracy = correct under all k; in brackets: mean accuracy over the k draws)."
             + (cli.conv_note(conv) if conv else ""),
             "", "| model | clean | " + " | ".join(f"PGD {_eps(e)}" for e in budget_cols) + " | "
             + " | ".join(s.families) + (" | rot+trans grid |" if show_grid else " |"),
             "|---" * (2 + len(budget_cols) + len(s.families) + show_grid) + "|"]
    for name, r in results.items():
        e = r["evals"]
        cells = [f"{100 * e[pgd_key(FLAGS.pgd_steps, b)]['accuracy']:.1f}" for b in budget_cols]
        cells += [f"{100 * _worst(e, f)['accuracy']:.1f} ({100 * _worst(e, f)['mean_accuracy']:.1f})"
                  for f in s.families]
        if show_grid:
            g = e.get("rotation_translation_grid")
            cells.append(f"{100 * g['accuracy']:.1f}" if g else "–")
        lines.append(f"| {name} | {100 * e['clean']:.1f} | " + " | ".join(cells) + " |")
    for label, (strengths, names) in curves.items():
        lines += ["", f"Along {label} ({', '.join(f'{m} {st:g}' for m, st in zip(names, strengths))}):"]
        lines += [f"- {col}: " + " → ".join(f"{100 * get(results[m]['evals']):.1f}" for m in names)
                  for col, get in columns(s)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    cli.run(main)
