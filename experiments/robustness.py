"""Evaluate attacks against a pretrained classifier.

    python -m experiments.robustness --dataset=mnist --checkpoint=mnist_basic_cnn \
        --attacks=fgsm,pgd,cw_l2,jsma,blackbox --eps=0.3 --num_examples=1000 --out_dir=results/robustness/mnist

The first `--blackbox_holdout` (150) test images are the black-box attacker's holdout; every attack is evaluated
on the next N test images. Writes results.json and results.md to --out_dir.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

from absl import app, flags, logging

flags.DEFINE_string("dataset", "mnist", "mnist | cifar10")
flags.DEFINE_string("checkpoint", None, "checkpoint name (default: mnist_basic_cnn / cifar10_resnet10)")
flags.DEFINE_list("attacks", ["fgsm", "pgd", "cw_l2", "jsma", "blackbox"], "attacks to run")
flags.DEFINE_float("eps", None, "Linf budget for fgsm / pgd / blackbox (default 0.3 mnist, 8/255 cifar10)")
flags.DEFINE_integer("num_examples", 1000, "N test examples evaluated")
flags.DEFINE_integer("pgd_steps", 40, "PGD steps")
flags.DEFINE_integer("cw_steps", 100, "CW-L2 optimiser steps per binary-search step")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_integer("batch_size", 250, "attack batch size")
flags.DEFINE_string("data_dir", None, "TFDS data dir")
flags.DEFINE_string("out_dir", None, "output dir (default results/robustness/<checkpoint>)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax

    from robust_jax import checkpoints, data, evaluate, training

    ds = FLAGS.dataset
    name = FLAGS.checkpoint or {"mnist": "mnist_basic_cnn", "cifar10": "cifar10_resnet10"}[ds]
    eps = FLAGS.eps if FLAGS.eps is not None else {"mnist": 0.3, "cifar10": 8 / 255}[ds]
    cfg = evaluate.AttackConfig(eps=eps, pgd_steps=FLAGS.pgd_steps, cw_steps=FLAGS.cw_steps,
                                batch_size=FLAGS.batch_size)
    m = checkpoints.load(name)
    test = data.splits(ds)["test"]
    h = cfg.blackbox_holdout
    x_hold, _ = data.load(ds, f"{test}[:{h}]", data_dir=FLAGS.data_dir)
    x, y = data.load(ds, f"{test}[{h}:{h + FLAGS.num_examples}]", data_dir=FLAGS.data_dir)
    print(f"robustness: {name} on {ds} test[{h}:{h + len(x)}], attacks {FLAGS.attacks}, eps={eps:.4f}, "
          f"seed={FLAGS.seed}, devices={jax.device_count()}")
    predict = lambda z: training.predict_logits(m._predict, m.variables, z)
    t0 = time.time()
    rows = evaluate.evaluate_attacks(FLAGS.attacks, predict, m.variables, data.to_float(x), y,
                                     key=jax.random.PRNGKey(FLAGS.seed), cfg=cfg,
                                     logits_builder=lambda v: functools.partial(m.apply, v),
                                     x_holdout=data.to_float(x_hold))
    out = Path(FLAGS.out_dir or f"results/robustness/{name}")
    out.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": name, "dataset": ds, "seed": FLAGS.seed, "config": dataclasses.asdict(cfg),
              "rows": rows, "seconds": time.time() - t0}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float))
    table = evaluate.markdown_table(rows)
    warnings = sorted({w for r in rows for w in r["warnings"]})
    md = f"# Robustness of `{name}` ({ds})\n\n{table}\n\nWarnings: {warnings or 'none'}\n"
    (out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    app.run(main)
