"""Train a classifier, resumable and preemption-safe; optionally export it as a pretrained checkpoint with a card.

usage: python -m experiments.train --workdir=DIR [flags]

    python -m experiments.train --dataset=mnist --model=basic_cnn --epochs=4 --workdir=runs/mnist
    python -m experiments.train --dataset=cifar10 --model=resnet10 --width=16 --epochs=30 --optimizer=sgd \\
        --lr=0.2 --weight_decay=5e-4 --augment=flip_crop --label_smoothing=0.1 --workdir=runs/c10 \\
        --export=cifar10_resnet10

Re-running the same command with the same --workdir resumes from the latest checkpoint; a command with other
training flags is refused (listing the differing fields), as the workdir's config.json records the run. Ctrl-C
(SIGINT) or SIGTERM saves a checkpoint at the current step and exits (status 130 / 143) with the command to resume.
Writes to --workdir: config.json, metrics.jsonl (a JSON line per epoch), checkpoints/, final.json (the summary).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import sys
import typing

from absl import app, flags, logging

from robust_jax import checkpoints, training, xla_defaults
from robust_jax import data as data_lib
from robust_jax import models as models_lib

STEMS = ("cifar", "imagenet")  # robust_jax.models.ResNet10

flags.DEFINE_string("workdir", None, "(required) run directory: config, checkpoints, metrics; rerunning with the "
                    "same --workdir resumes the run")
flags.DEFINE_string("model", "basic_cnn", "architecture: " + " | ".join([*models_lib.ALIASES, *models_lib.MODELS]))
flags.DEFINE_integer("width", None, "channel width (allconv, resnet10)")
flags.DEFINE_float("dropout_rate", None, "dropout rate (model default if unset)")
flags.DEFINE_string("stem", None, "resnet10 stem: " + " | ".join(STEMS))
flags.DEFINE_bool("hetero", False, "heteroscedastic (aleatoric) head, trained with the sampled-softmax loss")
flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR, then TFDS default)")
flags.DEFINE_string("export", None, "after training, export the model to checkpoints/<NAME> with a card")
flags.DEFINE_integer("max_test_examples", None, "report the test accuracy on the first N test examples only "
                     "(quick runs; default: the whole test split)")

# Every TrainConfig field the command line sets directly is a flag of the same name, type, default and help (the
# field's metadata): adding a field to TrainConfig adds its flag. architecture and loss come from the flags above.
_HINTS = typing.get_type_hints(training.TrainConfig)
CONFIG_FIELDS = [f for f in dataclasses.fields(training.TrainConfig) if f.metadata.get("cli", True)]
_DEFINE = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string, bool: flags.DEFINE_bool}


def _flag_type(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


for _f in CONFIG_FIELDS:
    _help = _f.metadata["help"]
    if _f.metadata.get("choices"):
        _help += ": " + " | ".join(_f.metadata["choices"])
    _DEFINE[_flag_type(_HINTS[_f.name])](_f.name, _f.default, _help)
FLAGS = flags.FLAGS
_FIELD_FLAGS = {"architecture": "--model/--width/--dropout_rate/--stem", "loss": "--hetero"}


class UsageError(Exception):
    """A flag value rejected before anything is created or loaded."""


def architecture_from_flags() -> dict:
    arch = {"name": models_lib.ALIASES.get(FLAGS.model, FLAGS.model)}
    for key in ("width", "dropout_rate", "stem"):
        if getattr(FLAGS, key) is not None:
            arch[key] = getattr(FLAGS, key)
    if FLAGS.hetero:
        arch["hetero"] = True
    if FLAGS.dataset in ("mnist", "fashion_mnist", "imagenette"):
        i = data_lib.info(FLAGS.dataset)
        arch["mean"], arch["std"] = list(i.mean), list(i.std)
    return arch


def config_from_flags() -> training.TrainConfig:
    """The TrainConfig of the flags; UsageError naming the flag and its valid values for any invalid one."""
    if FLAGS.workdir is None:
        raise UsageError("--workdir is required: the run directory (rerunning with the same one resumes)")
    if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
        raise UsageError(f"--workdir: {FLAGS.workdir} exists and is not a directory")
    if FLAGS.model not in (*models_lib.ALIASES, *models_lib.MODELS):
        raise UsageError(f"--model: unknown model {FLAGS.model!r}; choose from "
                         f"{', '.join([*models_lib.ALIASES, *models_lib.MODELS])}")
    if FLAGS.stem is not None and FLAGS.stem not in STEMS:
        raise UsageError(f"--stem: unknown stem {FLAGS.stem!r}; choose from {', '.join(STEMS)}")
    for name in ("width", "max_test_examples"):
        if getattr(FLAGS, name) is not None and getattr(FLAGS, name) < 1:
            raise UsageError(f"--{name}: must be at least 1, got {getattr(FLAGS, name)}")
    if FLAGS.dropout_rate is not None and not 0 <= FLAGS.dropout_rate < 1:
        raise UsageError(f"--dropout_rate: must be in [0, 1), got {FLAGS.dropout_rate}")
    if FLAGS.export is not None and not checkpoints._NAME.fullmatch(FLAGS.export):
        raise UsageError(f"--export: {FLAGS.export!r} is not a plain folder name (letters, digits, '_', '-', '.')")
    if FLAGS.data_dir is not None and not os.path.isdir(os.path.expanduser(FLAGS.data_dir)):
        raise UsageError(f"--data_dir: no directory {FLAGS.data_dir}")
    kwargs = {f.name: getattr(FLAGS, f.name) for f in CONFIG_FIELDS}
    try:
        training.TrainConfig(**kwargs)  # the generated flags first: the architecture depends on --dataset
        return training.TrainConfig(**kwargs, architecture=architecture_from_flags(),
                                    loss="hetero" if FLAGS.hetero else "ce")
    except training.ConfigError as e:
        raise UsageError(f"{_FIELD_FLAGS.get(e.field, '--' + e.field)}: {e.detail}") from None


def _fail(message: str, status: int = 2):
    sys.stderr.write(f"experiments.train: error: {message}\n")
    sys.exit(status)


def usage() -> str:
    """This docstring and this module's flags (absl's --help exits 1 and has no -h)."""
    module = next(m for m, fl in FLAGS.flags_by_module_dict().items() if any(f.name == "workdir" for f in fl))
    return f"{__doc__}\nflags:\n{FLAGS.module_help(module)}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, but: -h / --help print the usage and exit 0; every error (unknown flag, bad value,
    unknown choice, missing --workdir) is one line on stderr and exit 2, before any folder is created or data loads."""
    args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if any(a in ("-h", "-help", "--help", "--helpshort", "-?") for a in args):
        try:
            sys.stdout.write(usage() + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # `--help | head`: the reader left; keep Python from reporting it at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    if "--helpfull" in args:
        app.usage(shorthelp=False, writeto_stdout=True, exitcode=0)
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        _fail(str(e))
    if len(rest) > 1:
        _fail(f"unexpected arguments {rest[1:]} (flags are --name=value)")
    try:
        config_from_flags()
    except UsageError as e:
        _fail(str(e))
    return rest


class _Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise _Interrupted(signum)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = config_from_flags()
    workdir = FLAGS.workdir
    command = "python -m experiments.train " + shlex.join(sys.argv[1:])
    # SIGTERM outside the training loop (data loading, test evaluation, export) stops like Ctrl-C does there;
    # inside the loop training.train checkpoints the current step first
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        result = training.train(config, workdir, data_dir=FLAGS.data_dir, resume_hint=f"to resume, rerun: {command}")
        if result["interrupted"]:  # train() printed where the checkpoint is and how to resume
            sys.exit(128 + signal.Signals[result["interrupted"]].value)
        test_split = data_lib.splits(config.dataset)["test"]
        if FLAGS.max_test_examples:
            test_split = data_lib.head(config.dataset, test_split, FLAGS.max_test_examples)
        state = result["state"]
        test = checkpoints.test_accuracy(config.architecture, state.variables, config.dataset,
                                         data_dir=FLAGS.data_dir, split=test_split)
        summary = {"val": result["val"], "test_accuracy": test, "test_split": test_split, "steps": result["step"],
                   "train_seconds": training.train_seconds(workdir)}
        tmp = os.path.join(workdir, f".final.json.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(tmp, os.path.join(workdir, "final.json"))
        print(f"done: {result['step']} steps, {config.epochs} epochs, {summary['train_seconds']:.1f} s of training "
              f"(over all runs of this workdir)\n"
              f"val accuracy {result['val']['accuracy']:.4f} (loss {result['val']['loss']:.4f}), "
              f"test accuracy {test:.4f} ({config.dataset} {test_split})\n"
              f"results in {workdir}: final.json (this summary), metrics.jsonl (per epoch), config.json, "
              f"checkpoints/")
        if FLAGS.export:
            path = checkpoints.export(FLAGS.export, state.variables, config, train_seconds=summary["train_seconds"],
                                      command=command, val_accuracy=result["val"]["accuracy"])
            print(f"exported {FLAGS.export} to {path}")
    except training.ConfigMismatchError as e:
        _fail(str(e))
    except (data_lib.DatasetNotFoundError, data_lib.SampleCorruptedError) as e:
        _fail(str(e), status=1)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        when = "a second signal, while stopping" if "second signal" in str(e) else "outside the training steps"
        sys.stderr.write(f"\ninterrupted by {signal.Signals(signum).name} ({when}); every checkpoint in {workdir} is "
                         f"complete (a save cut short is discarded); to resume, rerun: {command}\n")
        sys.exit(128 + signum)


if __name__ == "__main__":
    xla_defaults()  # before JAX initialises its backend
    app.run(main, flags_parser=parse_flags)
