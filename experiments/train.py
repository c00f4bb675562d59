"""Train a classifier, resumable; optionally export it as a pretrained checkpoint with a card.

    python -m experiments.train --dataset=mnist --model=basic_cnn --epochs=4 --workdir=runs/mnist
    python -m experiments.train --dataset=cifar10 --model=resnet10 --width=16 --epochs=30 --optimizer=sgd \
        --lr=0.2 --weight_decay=5e-4 --augment=flip_crop --label_smoothing=0.1 --workdir=runs/c10 \
        --export=cifar10_resnet10

Re-running the same command with the same --workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import shlex
import sys

from absl import app, flags, logging

flags.DEFINE_string("dataset", "mnist", "mnist | cifar10 | fashion_mnist | imagenette")
flags.DEFINE_string("model", "basic_cnn", "basic_cnn | allconv | resnet10")
flags.DEFINE_integer("width", None, "channel width (allconv, resnet10)")
flags.DEFINE_float("dropout_rate", None, "dropout rate (model default if unset)")
flags.DEFINE_bool("hetero", False, "heteroscedastic (aleatoric) head, trained with the sampled-softmax loss")
flags.DEFINE_integer("hetero_samples", 16, "noise samples per example in the heteroscedastic loss")
flags.DEFINE_string("stem", None, "resnet10 stem: cifar | imagenet")
flags.DEFINE_integer("epochs", 3, "epochs")
flags.DEFINE_integer("batch_size", 128, "batch size")
flags.DEFINE_string("optimizer", "adam", "sgd | adam")
flags.DEFINE_float("lr", 1e-3, "peak learning rate")
flags.DEFINE_string("schedule", "onecycle", "onecycle | cosine | constant")
flags.DEFINE_float("weight_decay", 0.0, "weight decay (kernels only)")
flags.DEFINE_float("label_smoothing", 0.0, "label smoothing")
flags.DEFINE_string("augment", "none", "'+'-separated: none | flip_crop | rotate (e.g. flip_crop+rotate)")
flags.DEFINE_float("rotation_degrees", 30.0, "rotate augmentation: angles uniform in +-this")
flags.DEFINE_string("adversary", "none", "adversarial training: none | pgd | fgsm_rs (Linf)")
flags.DEFINE_float("adv_eps", 8 / 255, "adversarial training eps (pixels in [0, 1])")
flags.DEFINE_integer("adv_steps", 7, "PGD steps for --adversary=pgd")
flags.DEFINE_float("adv_step_size", None, "step size (default 2.5*eps/steps for pgd, 1.25*eps for fgsm_rs)")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_integer("checkpoint_every_steps", 500, "checkpoint period in steps (also at every epoch end)")
flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics); resumes if it has a checkpoint")
flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR, then TFDS default)")
flags.DEFINE_string("export", None, "after training, export the model to checkpoints/<NAME> with a card")
flags.DEFINE_string("conv_impl", "custom_vjp", "convolution kernels for training: custom_vjp | xla | onednn | "
                    "onednn_bf16 (opt-in oneDNN on CPU, robust_jax.onednn); recorded in the card's hyperparameters, "
                    "evaluation uses the default")
flags.DEFINE_integer("max_train_examples", None, "use only the first N training examples (quick runs)")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def architecture_from_flags() -> dict:
    from robust_jax.models import ALIASES

    arch = {"name": ALIASES.get(FLAGS.model, FLAGS.model)}
    for key in ("width", "dropout_rate", "stem"):
        if getattr(FLAGS, key) is not None:
            arch[key] = getattr(FLAGS, key)
    if FLAGS.hetero:
        arch["hetero"] = True
    if FLAGS.dataset in ("mnist", "fashion_mnist", "imagenette"):
        from robust_jax.data import info

        i = info(FLAGS.dataset)
        arch["mean"], arch["std"] = list(i.mean), list(i.std)
    return arch


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from robust_jax import checkpoints, training

    config = training.TrainConfig(
        dataset=FLAGS.dataset, architecture=architecture_from_flags(), epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size, optimizer=FLAGS.optimizer, lr=FLAGS.lr, schedule=FLAGS.schedule,
        weight_decay=FLAGS.weight_decay, label_smoothing=FLAGS.label_smoothing, augment=FLAGS.augment,
        rotation_degrees=FLAGS.rotation_degrees, adversary=FLAGS.adversary, adv_eps=FLAGS.adv_eps,
        adv_steps=FLAGS.adv_steps, adv_step_size=FLAGS.adv_step_size,
        loss="hetero" if FLAGS.hetero else "ce", hetero_samples=FLAGS.hetero_samples,
        seed=FLAGS.seed, checkpoint_every_steps=FLAGS.checkpoint_every_steps,
        max_train_examples=FLAGS.max_train_examples, conv_impl=FLAGS.conv_impl,
    )
    result = training.train(config, FLAGS.workdir, data_dir=FLAGS.data_dir)
    state = result["state"]
    test = checkpoints.test_accuracy(config.architecture, state.variables, config.dataset, data_dir=FLAGS.data_dir)
    summary = {"val": result["val"], "test_accuracy": test, "steps": result["step"],
               "train_seconds": training.train_seconds(FLAGS.workdir)}
    print(json.dumps(summary))
    with open(f"{FLAGS.workdir}/final.json", "w") as f:
        json.dump(summary, f, indent=2)
    if FLAGS.export:
        command = "python -m experiments.train " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        path = checkpoints.export(FLAGS.export, state.variables, config, train_seconds=summary["train_seconds"],
                                  command=command, val_accuracy=result["val"]["accuracy"])
        print(f"exported {FLAGS.export} to {path}")


if __name__ == "__main__":
    app.run(main)
