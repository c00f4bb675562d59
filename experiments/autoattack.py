"""AutoAttack (Croce & Hein, ICML 2020) on a pretrained checkpoint, data-parallel and resumable.

    python -m experiments.autoattack --checkpoint=cifar10_resnet10_pgd --norm=linf --eps=8/255 \
        --num_examples=1000 --version=standard

Evaluates the first --num_examples test images with the protocol of ``robust_jax.attacks.autoattack`` (``standard``:
APGD-CE, APGD-T, FAB-T, Square with the reference's parameters; ``plus``; ``rand``: APGD-CE / APGD-DLR with EOT over
--eot_samples (20) samples of a randomised defence; ``custom`` with --attacks). --defence picks the defended model
(``robust_jax.evaluate.Defence``): ``none`` (the network itself; default except for ``rand``), ``epistemic``
(MC-dropout, the default for ``rand``) or ``aleatoric`` (a heteroscedastic checkpoint's logit draws μ + σ·ε); a
randomised defence is attacked through EOT over --eot_samples samples per gradient step (the ``adaptive`` protocol)
and predicts with the mean softmax over as many samples at a fixed key, which is also how success is judged.

    python -m experiments.autoattack --checkpoint=mnist_basic_cnn --eps=0.3 --version=rand --defence=epistemic

Each attack runs only on the points still robust: the fooled ones are dropped between attacks (and the remaining
ones attacked in chunks of at most --batch_size, split over all devices; ``robust_jax.autoattack_eval.evaluate``).
Example i draws its randomness from ``fold_in(fold_in(key, attack), i)`` (i = its position in the test split), so
results do not depend on the chunking, on --batch_size or on resuming.

After every chunk the state (per-attack robust masks, the adversarial examples found so far, timings) is written
atomically to --out_dir/state.npz: a killed run started again with the same flags continues where it stopped
(``--fresh`` discards the state). Writes results.json and results.md to --out_dir (default
results/autoattack/<checkpoint>_<norm>_<eps>, then _<version> unless standard and _<defence> unless none): the
defence and its EOT samples, clean accuracy, robust accuracy after each attack and final, seconds
per attack, forward/backward passes (per attacked image, counted from the attacks' iterations: upper bounds, since a
point keeps being computed after it is fooled inside a chunk; ``images_computed`` includes chunk padding) and the
reference's warning flags. --options (JSON, e.g. '{"square": {"n_queries": 1000}}') overrides attack parameters:
the results are then not AutoAttack's, and say so.
"""

from __future__ import annotations

import json
import math
import os
import sys
from fractions import Fraction
from pathlib import Path

from absl import app, flags, logging

from robust_jax import xla_defaults

# allow_override: tests import several experiment modules into one process; absl's flags are global.
flags.DEFINE_string("checkpoint", None, "checkpoint name (robust_jax.checkpoints.available())", allow_override=True)
flags.DEFINE_string("norm", "linf", "linf | l2", allow_override=True)
flags.DEFINE_string("eps", None, "budget: a number or a fraction such as 8/255 (default 8/255 linf, 0.5 l2)",
                    allow_override=True)
flags.DEFINE_integer("num_examples", 1000, "the first N test images", allow_override=True)
flags.DEFINE_string("version", "standard", "standard | plus | rand | custom", allow_override=True)
flags.DEFINE_list("attacks", None, "with --version=custom: attacks to run, from apgd-ce, apgd-t, fab-t, square, "
                  "apgd-dlr, fab", allow_override=True)
flags.DEFINE_string("options", None, "JSON {attack: {param: value}} overriding the protocol's parameters",
                    allow_override=True)
flags.DEFINE_integer("batch_size", 250, "chunk size (examples attacked at once, over all devices)", allow_override=True)
flags.DEFINE_integer("seed", 0, "seed", allow_override=True)
flags.DEFINE_integer("eot_samples", 20, "EOT samples per attack step (and per prediction) of a randomised defence",
                     allow_override=True)
flags.DEFINE_string("defence", None, "none | epistemic (MC-dropout) | aleatoric (heteroscedastic checkpoint); default "
                    "epistemic for --version=rand, else none", allow_override=True)
flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR)", allow_override=True)
flags.DEFINE_string("out_dir", None, "output dir (default results/autoattack/<checkpoint>_<norm>_<eps>)",
                    allow_override=True)
flags.DEFINE_bool("fresh", False, "ignore a saved state in --out_dir and start over", allow_override=True)
flags.DEFINE_bool("progress", True, "tqdm progress bars", allow_override=True)
FLAGS = flags.FLAGS

NORMS = ("linf", "l2")
STATE = "state.npz"


# ----------------------------------------------------------------------------------------------- flags
def parse_eps(text: str) -> float:
    """``"8/255"`` or ``"0.03"`` -> float; ValueError unless finite and > 0."""
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError) as e:
        raise ValueError(f"--eps={text!r} is not a number or a fraction such as 8/255") from e
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--eps must be > 0, got {text!r}")
    return value


def eps_label(text: str) -> str:
    return text.strip().replace("/", "_")


def default_out_dir(checkpoint: str, norm: str, eps_arg: str, version: str, defence: str) -> str:
    """``results/autoattack/<checkpoint>_<norm>_<eps>``, then ``_<version>`` unless standard and ``_<defence>``
    unless none."""
    name = f"{checkpoint}_{norm}_{eps_label(eps_arg)}"
    name += "" if version == "standard" else f"_{version}"
    name += "" if defence == "none" else f"_{defence}"
    return f"results/autoattack/{name}"


def defence_of(f) -> str:
    """The --defence to use: as given, else ``epistemic`` for --version=rand and ``none`` otherwise."""
    d = getattr(f, "defence", None)
    return d if d else ("epistemic" if f.version == "rand" else "none")


def check_flags(f) -> tuple[float, dict | None]:
    """Validate the command line before anything is loaded: (eps, options) or ValueError with a one-line reason."""
    from robust_jax import checkpoints
    from robust_jax.attacks.autoattack import ATTACKS, VERSIONS, protocol
    from robust_jax.evaluate import DEFENCES

    if not f.checkpoint:
        raise ValueError(f"--checkpoint is required (available: {', '.join(checkpoints.available())})")
    if f.checkpoint not in checkpoints.available():
        raise ValueError(f"no checkpoint {f.checkpoint!r} (available: {', '.join(checkpoints.available())})")
    if f.norm not in NORMS:
        raise ValueError(f"--norm must be one of {NORMS}, got {f.norm!r}")
    eps = parse_eps(f.eps if f.eps is not None else ("8/255" if f.norm == "linf" else "0.5"))
    if f.norm == "linf" and eps > 1:
        raise ValueError(f"--eps={eps:g} exceeds the [0, 1] pixel range (use e.g. 8/255)")
    if f.version not in VERSIONS:
        raise ValueError(f"--version must be one of {VERSIONS}, got {f.version!r}")
    if f.attacks and f.version != "custom":
        raise ValueError("--attacks is only used with --version=custom")
    if f.version == "custom" and not f.attacks:
        raise ValueError(f"--version=custom needs --attacks (from {', '.join(ATTACKS)})")
    if f.num_examples < 1 or f.batch_size < 1 or f.eot_samples < 1:
        raise ValueError("--num_examples, --batch_size and --eot_samples must be >= 1")
    defence = defence_of(f)
    if defence not in DEFENCES:
        raise ValueError(f"--defence must be one of {DEFENCES}, got {defence!r}")
    if f.version == "rand" and defence == "none":
        raise ValueError("--version=rand attacks a randomised defence through EOT: use --defence=epistemic or "
                         "aleatoric (a deterministic network: --version=standard)")
    if defence != "none" and f.version in ("standard", "plus"):
        raise ValueError(f"--defence={defence} is randomised: evaluate it with --version=rand (or custom), not "
                         f"{f.version}")
    if defence == "aleatoric" and not checkpoints.read_card(f.checkpoint)["architecture"].get("hetero"):
        raise ValueError(f"--defence=aleatoric needs a heteroscedastic checkpoint (e.g. *_hetero); "
                         f"{f.checkpoint} is not one")
    options = None
    if f.options:
        try:
            options = json.loads(f.options)
        except json.JSONDecodeError as e:
            raise ValueError(f"--options is not valid JSON ({e})") from e
        if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
            raise ValueError("--options must be a JSON object {attack: {param: value}}")
    protocol(f.version, f.attacks, options)  # unknown attack names / options raise ValueError here
    return eps, options


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _defence_text(res: dict) -> str:
    d, s = res.get("defence", "none"), res.get("eot_samples")
    what = {"none": "none (the network's own logits)", "epistemic": "MC-dropout (epistemic)",
            "aleatoric": "heteroscedastic logit draws (aleatoric)"}.get(d, d)
    if not s:
        return what
    return (f"{what}; attacked through EOT over {s} samples per gradient step, predicting with the mean softmax "
            f"over {s} samples at a fixed key")


def markdown(res: dict) -> str:
    lines = [f"# AutoAttack ({res['version']}) on `{res['checkpoint']}`", "",
             f"{res['norm']} eps = {res['eps_arg']} ({res['eps']:.6g}), first {res['num_examples']} test images of "
             f"{res['dataset']}, seed {res['seed']}, {res['devices']} device(s), CPU: {res['cpu']}", "",
             f"Defence: {_defence_text(res)}", "",
             "| stage | robust accuracy | seconds | forward / backward passes per attacked image | images attacked |",
             "|---|---|---|---|---|",
             f"| clean | {100 * res['clean_accuracy']:.2f}% | {res['seconds']['clean_and_checks']:.1f} | | |"]
    for a in res["attacks"]:
        p = res["passes"][a]
        lines.append(f"| {a} | {100 * res['robust_accuracy'][a]:.2f}% | {res['seconds'][a]:.1f} | "
                     f"{p['per_image']['forward']} / {p['per_image']['backward']} | {p['images_attacked']} |")
    lines += ["", f"**Final robust accuracy: {100 * res['final_robust_accuracy']:.2f}%** "
                  f"(total {res['total_seconds']:.0f} s; max perturbation {res['max_perturbation']:.6g})", "",
              "Flags: " + ("; ".join(res["flags"]) if res["flags"] else "none"), ""]
    return "\n".join(lines)


def main(argv):
    del argv
    try:
        eps, options = check_flags(FLAGS)
    except ValueError as e:
        print(f"autoattack: error: {e}", file=sys.stderr)
        sys.exit(2)
    logging.set_verbosity(logging.WARNING)
    import jax

    from robust_jax import autoattack_eval, checkpoints, data

    eps_arg = FLAGS.eps if FLAGS.eps is not None else ("8/255" if FLAGS.norm == "linf" else "0.5")
    m = checkpoints.load(FLAGS.checkpoint)  # attacked in f32 too: FAB / success checks sit on the boundary
    ds = m.card["dataset"]
    split = data.head(ds, data.splits(ds)["test"], FLAGS.num_examples)
    x, y = data.load(ds, split, data_dir=FLAGS.data_dir)
    x = data.to_float(x)
    defence = defence_of(FLAGS)
    builder = autoattack_eval.defence_builder(defence, m, FLAGS.eot_samples)
    out = Path(FLAGS.out_dir or default_out_dir(FLAGS.checkpoint, FLAGS.norm, eps_arg, FLAGS.version, defence))
    if FLAGS.fresh and (out / STATE).is_file():
        (out / STATE).unlink()
    config = {"checkpoint": FLAGS.checkpoint, "dataset": ds, "split": split, "seed": FLAGS.seed, "eps_arg": eps_arg,
              "options": options, "defence": defence}
    print(f"autoattack: {FLAGS.checkpoint} on {ds} {split}, {FLAGS.norm} eps={eps_arg}, version={FLAGS.version}, "
          f"defence={defence}" + (f" (EOT over {FLAGS.eot_samples} samples)" if defence != "none" else "")
          + f", devices={jax.device_count()}, out_dir={out}")
    res = autoattack_eval.evaluate(builder, m.variables, x, y, key=jax.random.PRNGKey(FLAGS.seed), norm=FLAGS.norm,
                                   eps=eps, version=FLAGS.version, attacks_to_run=FLAGS.attacks, options=options,
                                   batch_size=FLAGS.batch_size, state=out / STATE, config=config,
                                   progress=FLAGS.progress)
    res.pop("x_adv")
    res.pop("robust")
    res["cpu"] = cpu_model()
    res["jax"] = jax.__version__
    res["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    (out / "results.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    xla_defaults()  # before JAX initialises its backend
    app.run(main)
