"""The studies' command lines (experiments/cli.py): help exits 0, user errors are one line with exit status 2 and no
traceback, every flag is validated before data is loaded or a folder created, output goes around progress bars and
every run ends by saying where its results are. Subprocess tests on the fail-fast paths: no data is loaded."""

import subprocess
import sys
import textwrap

import pytest

from experiments import cli

STUDIES = ["experiments.energy_detection", "experiments.robustness", "experiments.uncertainty_robustness",
           "experiments.tradeoff", "experiments.calibration"]


def _run(module, *args, cwd=None):
    cmd = [sys.executable, "-m", module] if module.startswith("experiments.") else [sys.executable, module]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def _usage_error(proc, *must_contain):
    """Exit status 2, exactly one line on stderr (no traceback, no help dump) containing every string given."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for s in must_contain:
        assert s in lines[0], (s, lines[0])
    return lines[0]


@pytest.mark.parametrize("module", STUDIES)
def test_help_exits_zero_and_lists_the_flags(module):
    proc = _run(module, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--dataset=<" in proc.stdout and "--seed=<int >= 0>" in proc.stdout and "--out_dir" in proc.stdout


def test_short_help_flag_works():
    proc = _run("experiments.energy_detection", "-h")
    assert proc.returncode == 0 and "Unknown command line flag" not in proc.stderr
    assert "--dataset=<cifar10|mnist>  (default: cifar10)" in proc.stdout
    assert "--eps=<budget in [0, 1] such as 8/255 or 0.3>" in proc.stdout


def test_robustness_help_is_accurate():
    out = _run("experiments.robustness", "--help").stdout
    assert "--blackbox_holdout" not in out  # documented before, never defined
    # the valid attack names, listed from the tuple the flag validates against
    from robust_jax.evaluate import ATTACKS

    assert f"--attacks=<{'|'.join(ATTACKS)}, comma-separated>" in out


def test_negative_eps_fails_at_once(tmp_path):
    line = _usage_error(_run("experiments.energy_detection", "--eps=-0.1", f"--out_dir={tmp_path}/out"), "--eps=-0.1")
    assert "[0, 1]" in line
    assert not (tmp_path / "out").exists()


def test_wrong_checkpoint_fails_before_the_output_folder_exists(tmp_path):
    from robust_jax import checkpoints

    if "cifar10_resnet10" not in checkpoints.available():
        pytest.skip("checkpoint cifar10_resnet10 not present")
    _usage_error(_run("experiments.energy_detection", "--dataset=mnist", "--checkpoint=cifar10_resnet10",
                      f"--out_dir={tmp_path}/o"), "--checkpoint=cifar10_resnet10", "--dataset=mnist")
    assert not (tmp_path / "o").exists()


# One subprocess per study parses many command lines with the parser cli.run uses (absl's flags are process-global,
# and the studies define flags of the same names) and reports each one's exit status and stderr.
_DRIVER = r"""
import contextlib, importlib, io, json, sys
from absl import flags
from experiments import cli

module = sys.argv[1]
importlib.import_module(module)
sys.argv[0] = module  # the study's flags are registered under its module name when it is imported
out = []
for argv in json.loads(sys.argv[2]):
    flags.FLAGS.unparse_flags()
    err, status = io.StringIO(), 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli._parse_flags([module, *argv])
        except SystemExit as e:
            status = e.code
    out.append({"argv": argv, "status": status, "stderr": err.getvalue()})
print(json.dumps(out))
"""

BAD = {  # module -> [(argv, strings the one-line error must contain)]
    "experiments.robustness": [
        (["--dataset=svhn"], ["--dataset=svhn", "cifar10", "mnist"]),
        (["--attacks=fgsm,foo"], ["'foo'", "fgsm|pgd|cw_l2|jsma|blackbox"]),
        (["--dataset=mnist", "--checkpoint=cifar10_resnet10"], ["--checkpoint=cifar10_resnet10", "cifar10 model",
                                                                 "--dataset=mnist", "mnist_basic_cnn"]),
        (["--eps=abc"], ["--eps=abc", "8/255"]),
        (["--data_dir=/no/such/dir"], ["--data_dir"]),
    ],
    "experiments.energy_detection": [
        (["--dataset=svhn"], ["--dataset=svhn", "cifar10|mnist"]),
        (["--checkpoint=no_such_model"], ["--checkpoint=no_such_model", "cifar10 checkpoints:", "cifar10_resnet10"]),
        (["--epss=0.1"], ["--epss", "did you mean --eps"]),
        (["--num_examples=0"], ["--num_examples=0"]),
        (["--lams=1,-3"], ["--lams", "-3"]),
        (["--threshold=best"], ["--threshold=best", "youden|fpr"]),
        (["stray"], ["unexpected arguments"]),
    ],
    "experiments.tradeoff": [
        (["--curve_eps=2"], ["--curve_eps=2", "8/255"]),  # budgets are fractions of [0, 1]
        (["--models=standard,nope"], ["'nope'", "standard"]),
        (["--transform=zoom"], ["'zoom'", "rotation"]),
    ],
    "experiments.calibration": [(["--perturbations=fog"], ["'fog'", "noise_0.1"])],
    "experiments.uncertainty_robustness": [
        (["--defences=bayes"], ["'bayes'", "none|epistemic|aleatoric"]),
        (["--eps_sweep=0,2/255,0.5,2"], ["--eps_sweep", "'2'"]),
    ],
}


@pytest.mark.parametrize("module", list(BAD))
def test_bad_values_are_one_line_errors_before_anything_runs(module):
    import json

    from robust_jax import checkpoints

    cases = [(a, e) for a, e in BAD[module] if "cifar10_resnet10" not in " ".join(a) or "cifar10_resnet10" in
             checkpoints.available()]
    proc = subprocess.run([sys.executable, "-c", _DRIVER, module, json.dumps([a for a, _ in cases])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (argv, expected), got in zip(cases, json.loads(proc.stdout)):
        assert got["status"] == 2, (argv, got)
        lines = got["stderr"].strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in got["stderr"], (argv, got["stderr"])
        for s in expected:
            assert s in lines[0], (argv, s, lines[0])


SCRIPT = '''
"""A toy study."""
from absl import flags
from experiments import cli

cli.eps("eps", 8 / 255, "budget")
flags.DEFINE_string("workdir", None, "where")
flags.mark_flag_as_required("workdir")


def main(argv):
    cli.require(flags.FLAGS.eps > 0, "--eps must be > 0 here")
    cli.say(f"eps={{flags.FLAGS.eps:.6f}}")
    cli.finish("{out}", ["all fine"], started=0.0)


if __name__ == "__main__":
    cli.run(main)
'''


def test_runner_required_flags_fractions_and_summary(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.md").write_text("x")
    script = tmp_path / "toy.py"
    script.write_text(textwrap.dedent(SCRIPT.format(out=out)))
    root = str(__import__("pathlib").Path(cli.__file__).parents[1])
    help_ = _run(str(script), "--help", cwd=root)
    assert help_.returncode == 0 and "--workdir=<text>  (required)" in help_.stdout and "A toy study." in help_.stdout
    _usage_error(_run(str(script), cwd=root), "--workdir")
    _usage_error(_run(str(script), "--workdir=w", "--eps=0", cwd=root), "--eps must be > 0 here")
    ok = _run(str(script), "--workdir=w", "--eps=4/255", cwd=root)
    assert ok.returncode == 0, ok.stderr
    assert f"eps={4 / 255:.6f}" in ok.stdout
    # the run ends with its summary and the folder of its results
    assert "all fine" in ok.stdout and f"results in {out.resolve()}/: results.md" in ok.stdout


def test_fractions_and_labels():
    assert cli.parse_fraction("8/255") == pytest.approx(8 / 255) and cli.parse_fraction(" 0.3 ") == 0.3
    with pytest.raises(ValueError, match="fraction"):
        cli.parse_fraction("8/0")
    from robust_jax.plotting import eps_label

    assert [eps_label(v) for v in (8 / 255, 2 / 255, 16 / 255, 0.3, 0.2, 0.0)] == [
        "8/255", "2/255", "16/255", "0.3", "0.2", "0"]


def test_say_prints_around_a_progress_bar(capsys):
    from tqdm.auto import tqdm

    with tqdm(total=2, file=sys.stderr, disable=False) as bar:
        bar.update(1)
        cli.say("epoch 1: loss 0.5")
        bar.update(1)
    captured = capsys.readouterr()
    assert captured.out == "epoch 1: loss 0.5\n"  # a line of its own, not appended to the bar
