"""The studies' command line, in one place: shared flags declared once, validated before any work, one-line errors.

A study declares its flags with the helpers below (``cli.dataset(...)``, ``cli.eps(...)``, ...) next to its own
``flags.DEFINE_*`` calls and ends with ``cli.run(main)``. Then:

- every flag is parsed and validated (types, ranges, choices, the checkpoint against ``--dataset``, the regimes
  available) when the command line is read, before any data is loaded, anything compiled or a folder created;
- a user error is one line on stderr naming the flag and the valid choices, exit status 2, no traceback;
- ``-h`` / ``--help`` print the study's docstring and its flags (choices, defaults, required flags) and exit 0;
- :func:`say` prints through ``tqdm.write`` (never onto a progress bar) and :func:`finish` ends every run with a
  short summary and where the results are.

Budgets are pixel fractions in [0, 1] and may be written as fractions: ``--eps=8/255``.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from absl import app, flags, logging

from robust_jax import xla_defaults

FLAGS = flags.FLAGS
# Flags defined through the helpers below belong to the study that calls them (they are listed by its --help).
flags.disclaim_key_flags()

HELP_ARGS = ("-h", "-?", "-help", "--help", "--helpshort", "--helpfull")
EXIT_USAGE = 2


class UsageError(Exception):
    """A user error on the command line: reported as one line on stderr, exit status 2."""


# ------------------------------------------------------------------------------------------------- parsing values
def parse_fraction(text) -> float:
    """``"8/255"`` -> 8/255, ``"0.3"`` -> 0.3 (ValueError with the expected form otherwise)."""
    if isinstance(text, int | float):
        return float(text)
    s = str(text).strip()
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return float(num) / float(den)
        return float(s)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{text!r} is not a number or a fraction such as 8/255") from None


class _Budget(flags.ArgumentParser):
    """A perturbation budget: a number or fraction in [0, 1] (pixels are in [0, 1])."""

    def parse(self, argument):
        v = parse_fraction(argument)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{v:g} is outside [0, 1] (pixels are in [0, 1]; write e.g. 8/255 or 0.3)")
        return v

    def flag_type(self):
        return "budget"


class _List(flags.ArgumentParser):
    """A comma-separated list whose items are parsed (and validated) by `item`."""

    def __init__(self, item: flags.ArgumentParser, nonempty: bool = True):
        self.item, self.nonempty = item, nonempty

    def parse(self, argument):
        items = argument if isinstance(argument, list | tuple) else [s for s in str(argument).split(",") if s.strip()]
        if self.nonempty and not items:
            raise ValueError("needs at least one value")
        out = []
        for a in items:
            try:
                out.append(self.item.parse(a.strip() if isinstance(a, str) else a))
            except ValueError as e:
                raise ValueError(f"{a!r}: {e}") from None
        return out

    def flag_type(self):
        return "list"


def _csv(values) -> str:
    from robust_jax.plotting import eps_label

    return ",".join(eps_label(v) if isinstance(v, float) else str(v) for v in values)


class _CsvSerializer(flags.ArgumentSerializer):
    def serialize(self, value):
        return _csv(value)


# ------------------------------------------------------------------------------------------------ shared flags
def dataset(default: str, choices: Iterable[str], help: str = "dataset"):  # noqa: A002
    return flags.DEFINE_enum("dataset", default, list(choices), help)


def data_dir():
    holder = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR, then "
                                 "~/tensorflow_datasets, then the embedded sample)")
    flags.register_validator("data_dir", lambda d: d is None or Path(d).expanduser().is_dir(),
                             message="--data_dir is not a directory")
    return holder


def out_dir(experiment: str):
    return flags.DEFINE_string("out_dir", None, f"output folder (default: results/{experiment}/<dataset>)")


def seed():
    return flags.DEFINE_integer("seed", 0, "PRNG seed", lower_bound=0)


def batch_size(default: int, help: str = "batch size"):  # noqa: A002
    return flags.DEFINE_integer("batch_size", default, help, lower_bound=1)


def count(name: str, default: int, help: str, lower: int = 1):  # noqa: A002
    """An integer flag with a lower bound (numbers of examples, steps, samples)."""
    return flags.DEFINE_integer(name, default, help, lower_bound=lower)


def eps(name: str = "eps", default: float | None = None, help: str = "Linf budget"):  # noqa: A002
    """A budget in [0, 1]; fractions allowed (``--eps=8/255``)."""
    return flags.DEFINE(_Budget(), name, default, help)


def eps_list(name: str, default, help: str):  # noqa: A002
    """Comma-separated budgets in [0, 1]; fractions allowed (``--curve_eps=1/255,2/255``)."""
    return flags.DEFINE(_List(_Budget()), name, default, help, serializer=_CsvSerializer())


def int_list(name: str, default, help: str, lower: int = 0):  # noqa: A002
    return flags.DEFINE(_List(flags.IntegerParser(lower_bound=lower)), name, default, help,
                        serializer=_CsvSerializer())


def float_list(name: str, default, help: str, lower: float = 0.0):  # noqa: A002
    return flags.DEFINE(_List(flags.FloatParser(lower_bound=lower)), name, default, help,
                        serializer=_CsvSerializer())


def names(name: str, default, choices: Iterable[str], help: str):  # noqa: A002
    """Comma-separated names, each one of `choices` (listed by --help and in the error)."""
    return flags.DEFINE(_List(flags.EnumParser(list(choices))), name, default, help, serializer=_CsvSerializer())


def checkpoint(defaults: Mapping[str, str], help: str = "checkpoint name (a folder of checkpoints/)"):  # noqa: A002
    """``--checkpoint``, checked against ``--dataset`` when the flags are read: it must exist and be trained on that
    dataset. Default: ``defaults[dataset]``."""
    holder = flags.DEFINE_string("checkpoint", None, f"{help}; default per --dataset: "
                                 + ", ".join(f"{d}: {c}" for d, c in defaults.items()))
    validate(["dataset", "checkpoint"], lambda v: checkpoint_problem(
        v["dataset"], v["checkpoint"] or defaults[v["dataset"]],
        None if v["checkpoint"] else f"the default checkpoint {defaults[v['dataset']]} of --dataset={v['dataset']}"))
    return holder


def conv_impl():
    """``--conv_impl`` (default ``auto``): the convolution kernels the attacks differentiate. A study loads its
    checkpoint with the f32 evaluation kernels (``checkpoints.load``), which compute every reported number, and
    differentiates ``m.for_use("attack", FLAGS.conv_impl)`` (the same weights); see :func:`kernels`."""
    from robust_jax.models import CONV_IMPLS

    return flags.DEFINE_enum("conv_impl", "auto", list(CONV_IMPLS), "convolution kernels the attacks differentiate "
                             "(auto: models.choose_conv_impl for use='attack', e.g. onednn_bf16 on CPUs with fast "
                             "bf16 units); every reported logit, energy and accuracy is computed with the f32 "
                             "evaluation kernels (custom_vjp)")


def validate(flag_names: list[str], problem: Callable[[dict], str | None]) -> None:
    """A check across flags, run when the command line is read: ``problem({flag: value})`` returns None when the
    values are fine, else the one-line error (naming the flags and what would be valid)."""

    def check(values):
        message = problem(values)
        if message:
            raise flags.ValidationError(message)
        return True

    flags.register_multi_flags_validator(flag_names, check)


def checkpoint_problem(ds: str, name: str, what: str | None = None) -> str | None:
    """Why checkpoint `name` cannot be used with ``--dataset=ds`` (None if it can); `what` names it in the message
    (default ``--checkpoint=<name>``)."""
    from robust_jax import checkpoints

    avail = checkpoints.available()
    flag = what or f"--checkpoint={name}"
    same = lambda: ", ".join(c for c in avail if _card_dataset(c) == ds) or "none available"  # noqa: E731
    if name not in avail:
        return f"{flag}: no such checkpoint in {checkpoints.root()}; {ds} checkpoints: {same()}"
    try:
        trained_on = checkpoints.read_card(name)["dataset"]
    except (OSError, ValueError) as e:  # CorruptCheckpointError is a ValueError
        return f"{flag}: {e}"
    if trained_on != ds:
        return f"{flag} is a {trained_on} model but --dataset={ds}; pass --dataset={trained_on}, or a {ds} " \
               f"checkpoint: {same()}"
    return None


def _card_dataset(name: str):
    from robust_jax import checkpoints

    try:
        return checkpoints.read_card(name)["dataset"]
    except (OSError, ValueError):
        return None


def require(condition: bool, message: str) -> None:
    """Raise a :class:`UsageError` (one line, exit 2) unless `condition`: for cross-flag checks inside ``main``."""
    if not condition:
        raise UsageError(message)


# ---------------------------------------------------------------------------------------- convolution kernels


def kernels(m, ma) -> dict:
    """The kernels of a run: ``{"eval": ..., "attack": ...}`` of the evaluation model `m` (every reported number) and
    the attack model `ma` (the attacks' gradients), both :class:`robust_jax.checkpoints.Classifier`."""
    return {"eval": m.model.conv_impl, "attack": ma.model.conv_impl}


def conv_note(conv, attacks=()) -> str:
    """The results.md sentence (with a leading space) on the kernels of :func:`kernels`, naming those of `attacks`
    that differentiate the evaluation kernels (:func:`attacked_kernels`)."""
    from robust_jax.evaluate import BOUNDARY_ATTACKS

    boundary = [a for a in attacks if a in BOUNDARY_ATTACKS]
    return (f" Convolutions: attack gradients `{conv['attack']}`, every reported number `{conv['eval']}`"
            + (f"; {', '.join(boundary)} stop at the decision boundary and differentiate `{conv['eval']}`."
               if boundary else "."))


def attacked_kernels(attack: str, m, ma) -> str | None:
    """The kernels `attack` (a name of ``evaluate.ATTACKS``) differentiates: `ma`'s, except the boundary attacks
    (``evaluate.BOUNDARY_ATTACKS``: `m`'s) and the black-box attack (None: it only queries `m`'s labels)."""
    from robust_jax.evaluate import BOUNDARY_ATTACKS

    if attack == "blackbox":
        return None
    return (m if attack in BOUNDARY_ATTACKS else ma).model.conv_impl


def attack_kernels_of(entry: dict) -> str:
    """The attack kernels a cached result `entry` was computed with: its ``"conv_impl"``, or
    :data:`robust_jax.sweep.UNRECORDED_CONV_IMPL` (the only kernels then) for an entry written before they were
    recorded."""
    from robust_jax.sweep import UNRECORDED_CONV_IMPL

    return entry.get("conv_impl", UNRECORDED_CONV_IMPL)


# ----------------------------------------------------------------------------------------------------- output
def say(*lines: str) -> None:
    """Print lines without breaking a progress bar (``tqdm.write``: clears the bar, prints, redraws it)."""
    from tqdm.auto import tqdm

    for line in lines:
        tqdm.write(str(line), file=sys.stdout)
    sys.stdout.flush()


def output_folder(path, default: str) -> Path:
    """The output folder (created): `path` (``--out_dir``) or `default`."""
    out = Path(path or default)
    out.mkdir(parents=True, exist_ok=True)
    return out


def finish(out, summary: Iterable[str], *, started: float, files: Iterable[str] = ()) -> None:
    """The end of every run: a short human-readable summary, the run time and where the results are."""
    out = Path(out)
    written = sorted(f.name for f in out.iterdir() if f.is_file()) if out.is_dir() else []
    files = list(files) or written
    say("", *[f"  {s}" for s in summary],
        f"{_prog()} finished in {time.time() - started:.0f} s; results in {out.resolve()}/: " + ", ".join(files))


# --------------------------------------------------------------------------------------------------- the runner
def _prog() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None and spec.name else os.path.basename(sys.argv[0])


def _fail(message: str) -> None:
    line = " ".join(str(message).split())  # one line, whatever the message
    line = re.sub(r"^flags [^:]*: ", "", line)  # a cross-flag validator's message names its flags itself
    sys.stderr.write(f"{_prog()}: error: {line} (see --help)\n")
    sys.exit(EXIT_USAGE)


def _required(flag) -> bool:
    return any(getattr(v, "message", "").startswith(f"Flag --{flag.name} must have a value")
               for v in flag.validators)


def _bounds(p) -> str:
    lo, hi = getattr(p, "lower_bound", None), getattr(p, "upper_bound", None)
    if lo is not None and hi is not None:
        return f" in [{lo:g}, {hi:g}]"
    return f" >= {lo:g}" if lo is not None else (f" <= {hi:g}" if hi is not None else "")


def _kind(p) -> str:
    """What a flag takes, from its parser: the choices of an enum, the type and bounds of a number."""
    if isinstance(p, _List):
        return f"{_kind(p.item)}, comma-separated"
    if isinstance(p, flags.EnumParser):
        return "|".join(p.enum_values)
    if isinstance(p, _Budget):
        return "budget in [0, 1] such as 8/255 or 0.3"
    if isinstance(p, flags.BooleanParser):
        return "true|false"
    if isinstance(p, flags.IntegerParser):
        return "int" + _bounds(p)
    if isinstance(p, flags.FloatParser):
        return "number" + _bounds(p)
    return "text"


def help_text(full: bool = False) -> str:
    """The study's docstring and its flags (what each takes: choices, type and bounds; default; required), generated
    from the flag definitions themselves (the choices shown are the ones validated)."""
    doc = (sys.modules["__main__"].__doc__ or f"USAGE: python -m {_prog()} [flags]").strip("\n")
    fl = FLAGS.get_key_flags_for_module(sys.argv[0])
    if full:
        fl = [f for fs in FLAGS.flags_by_module_dict().values() for f in fs]
    lines = [doc, "", "flags (--name=value; -h/--help: this help; --helpfull: also the libraries' flags):"]
    for f in sorted({f.name: f for f in fl}.values(), key=lambda f: f.name):
        if _required(f):
            state = "  (required)"
        elif f.default is None:
            state = ""
        else:
            state = f"  (default: {f.default_as_str.strip(chr(39))})"
        lines.append(f"  --{f.name}=<{_kind(f.parser)}>{state}")
        text = re.sub(r"^<[^>]*>: ", "", f.help or "")  # absl prefixes an enum's help with its choices: shown above
        lines += textwrap.wrap(text, 110, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines) + "\n"


def _parse_flags(argv: list[str]) -> list[str]:
    args = argv[1: argv.index("--")] if "--" in argv else argv[1:]
    if any(a in HELP_ARGS for a in args):
        sys.stdout.write(help_text(full="--helpfull" in args))
        sys.exit(0)
    try:
        rest = FLAGS(argv)
    except flags.UnrecognizedFlagError as e:
        known = [f.name for f in FLAGS.get_key_flags_for_module(sys.argv[0])]
        close = difflib.get_close_matches(e.flagname, known, n=3)
        _fail(f"unknown flag --{e.flagname}; " + (f"did you mean {', '.join('--' + c for c in close)}?" if close
                                                  else f"this study's flags: {', '.join('--' + k for k in known)}"))
    except flags.Error as e:
        _fail(str(e))
    if len(rest) > 1:
        _fail(f"unexpected arguments {rest[1:]}; flags are written --name=value")
    return rest


def _call(main: Callable, argv):
    from robust_jax.data import DatasetNotFoundError

    logging.set_verbosity(logging.WARNING)
    try:
        return main(argv)
    except (UsageError, app.UsageError) as e:
        _fail(str(e))
    except DatasetNotFoundError as e:
        _fail(str(e))


def run(main: Callable) -> None:
    """The entry point of every study: XLA defaults, flags parsed and validated, `main` run; user errors are one
    line on stderr with exit status 2, help exits 0."""
    xla_defaults()  # before JAX initialises its backend
    app.run(functools.partial(_call, main), flags_parser=_parse_flags)
