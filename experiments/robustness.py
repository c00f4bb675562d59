r"""Evaluate attacks against a pretrained classifier.

    python -m experiments.robustness --dataset=mnist --checkpoint=mnist_basic_cnn \
        --attacks=fgsm,pgd,cw_l2,jsma,blackbox --eps=0.3 --num_examples=1000 --out_dir=results/robustness/mnist

The first 150 test images (``robust_jax.evaluate.AttackConfig.blackbox_holdout``) are the black-box attacker's
holdout; every attack is evaluated on the next N test images. FGSM and PGD differentiate the checkpoint with the
attack kernels of --conv_impl; CW-L2 and JSMA, which stop at the decision boundary, and every reported prediction
(clean and adversarial accuracy, the black-box oracle) use the f32 evaluation kernels. Writes results.json and
results.md to --out_dir.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

from absl import flags

from experiments import cli
from robust_jax.evaluate import ATTACKS

DEFAULTS = {"mnist": ("mnist_basic_cnn", 0.3), "cifar10": ("cifar10_resnet10", 8 / 255)}
cli.dataset("mnist", DEFAULTS, "dataset; sets the default checkpoint and eps (mnist: mnist_basic_cnn, 0.3; "
            "cifar10: cifar10_resnet10, 8/255)")
cli.checkpoint({d: v[0] for d, v in DEFAULTS.items()})
cli.names("attacks", list(ATTACKS), ATTACKS, "attacks to run")
cli.eps("eps", None, "Linf budget for fgsm / pgd / blackbox (default per --dataset: 0.3 mnist, 8/255 cifar10)")
cli.count("num_examples", 1000, "N test examples evaluated")
cli.count("pgd_steps", 40, "PGD steps")
cli.count("cw_steps", 100, "CW-L2 optimiser steps per binary-search step")
cli.conv_impl()
cli.seed()
cli.batch_size(250, "attack batch size")
cli.data_dir()
cli.out_dir("robustness")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax

    from robust_jax import checkpoints, data, evaluate

    started = time.time()
    ds = FLAGS.dataset
    name, eps = FLAGS.checkpoint or DEFAULTS[ds][0], FLAGS.eps if FLAGS.eps is not None else DEFAULTS[ds][1]
    cfg = evaluate.AttackConfig(eps=eps, pgd_steps=FLAGS.pgd_steps, cw_steps=FLAGS.cw_steps,
                                batch_size=FLAGS.batch_size)
    m = checkpoints.load(name)  # f32 evaluation kernels: every reported number
    ma = m.for_use("attack", FLAGS.conv_impl)  # the kernels the gradient attacks differentiate
    test, h = data.splits(ds)["test"], cfg.blackbox_holdout
    x_hold, _ = data.load(ds, f"{test}[:{h}]", data_dir=FLAGS.data_dir)
    x, y = data.load(ds, f"{test}[{h}:{h + FLAGS.num_examples}]", data_dir=FLAGS.data_dir)
    cli.say(f"robustness: {name} on {ds} test[{h}:{h + len(x)}], attacks {FLAGS.attacks}, eps={eps:.4g}, "
            f"seed={FLAGS.seed}, devices={jax.device_count()}, attack gradients: {ma.model.conv_impl}")
    rows = attack_rows(m, ma, FLAGS.attacks, data.to_float(x), y, key=jax.random.PRNGKey(FLAGS.seed), cfg=cfg,
                       x_holdout=data.to_float(x_hold))
    out = cli.output_folder(FLAGS.out_dir, f"results/robustness/{name}")
    conv = cli.kernels(m, ma)
    result = {"checkpoint": name, "dataset": ds, "seed": FLAGS.seed, "conv_impl": conv,
              "config": dataclasses.asdict(cfg), "rows": rows, "seconds": time.time() - started}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float))
    warnings = sorted({w for r in rows for w in r["warnings"]})
    (out / "results.md").write_text(f"# Robustness of `{name}` ({ds})\n\n{evaluate.markdown_table(rows)}\n\n"
                                    f"Warnings: {warnings or 'none'}.{cli.conv_note(conv, FLAGS.attacks)}\n")
    cli.finish(out, [f"{r['attack']:8s}: clean {100 * r['accuracy']:.1f}%, adversarial "
                     f"{100 * r['adversarial_accuracy']:.1f}%, fooling {100 * r['fooling_rate']:.1f}% (N={r['n']})"
                     for r in rows]
               + [f"warning: {w}" for w in warnings], started=started, files=["results.md", "results.json"])


def attack_rows(m, ma, names, x, y, *, key, cfg, x_holdout) -> list[dict]:
    """``evaluate.evaluate_attacks`` rows of the attacks `names` on (x, y): FGSM and PGD differentiate `ma` (the
    checkpoint with the attack kernels), the boundary attacks (``evaluate.BOUNDARY_ATTACKS``: CW-L2, JSMA) `m`;
    every prediction (clean, adversarial, the black-box oracle) is ``m.predict`` (the f32 evaluation kernels). Each
    row records the kernels its attack differentiated (``conv_impl``; None for the black-box attack, which only
    queries labels)."""
    from robust_jax import evaluate

    rows = evaluate.evaluate_attacks(names, m.predict, m.variables, x, y, key=key, cfg=cfg,
                                     logits_builder=lambda v: functools.partial(ma.apply, v),
                                     boundary_logits_builder=lambda v: functools.partial(m.apply, v),
                                     x_holdout=x_holdout)
    return [{**r, "conv_impl": cli.attacked_kernels(r["attack"], m, ma)} for r in rows]


if __name__ == "__main__":
    cli.run(main)
