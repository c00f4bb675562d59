"""experiments.train's command line: flags generated from TrainConfig, every flag checked before anything runs.

One subprocess (absl's flags are process-global and other experiment modules define flags of the same names) parses
many command lines with the script's own parser and reports exit status, stdout and stderr of each.
"""

import dataclasses
import json
import subprocess
import sys

_DRIVER = r"""
import contextlib, io, json, os, sys
import experiments.train as t
from absl import flags

out = []
for argv in json.loads(sys.argv[1]):
    flags.FLAGS.unparse_flags()
    so, se, status, config = io.StringIO(), io.StringIO(), 0, None
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        try:
            t.parse_flags(["train", *argv])
            config = t.config_from_flags().to_json()
        except SystemExit as e:
            status = e.code
    out.append({"argv": argv, "status": status, "stdout": so.getvalue(), "stderr": se.getvalue(), "config": config})
out.append({"cli_fields": [f.name for f in t.CONFIG_FIELDS],
            "defaults": {f.name: flags.FLAGS[f.name].default for f in t.CONFIG_FIELDS}})
print(json.dumps(out))
"""


def _parse_all(cases):
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(cases)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *results, fields = json.loads(proc.stdout.splitlines()[-1])
    return {" ".join(r["argv"]): r for r in results}, fields


def test_flags_come_from_trainconfig_and_every_error_is_one_line_exit_2(tmp_path):
    from robust_jax import training

    w = f"--workdir={tmp_path / 'run'}"
    cases = {
        "-h": (0, None), "--help": (0, None),
        f"{w} --dataset=svhn": (2, "--dataset: unknown dataset 'svhn'; choose from mnist, fashion_mnist, cifar10, "
                                   "imagenette"),
        f"{w} --optimizer=lamb": (2, "--optimizer: unknown optimizer 'lamb'; choose from adam, sgd"),
        f"{w} --schedule=step": (2, "--schedule: unknown schedule 'step'; choose from onecycle, cosine, constant"),
        f"{w} --adversary=cw": (2, "--adversary: unknown adversary 'cw'; choose from none, pgd, fgsm_rs"),
        f"{w} --augment=flip_crop+blur": (2, "--augment: unknown augment 'blur'; choose from none, flip_crop, rotate"),
        f"{w} --conv_impl=cudnn": (2, "--conv_impl: unknown conv_impl 'cudnn'"),
        f"{w} --model=vgg": (2, "--model: unknown model 'vgg'; choose from basic_cnn, allconv, resnet10"),
        f"{w} --model=resnet10 --stem=tiny": (2, "--stem: unknown stem 'tiny'; choose from cifar, imagenet"),
        f"{w} --epochs=0": (2, "--epochs: must be at least 1, got 0"),
        f"{w} --epochs=two": (2, "flag --epochs=two: invalid literal for int()"),
        f"{w} --lr=0": (2, "--lr: must be above 0"),
        f"{w} --nonsense=1": (2, "Unknown command line flag 'nonsense'"),
        f"{w} --export=../x": (2, "--export: '../x' is not a plain folder name"),
        "--dataset=mnist": (2, "--workdir is required"),
        f"{w} --lr=0.01 --augment=flip_crop+rotate --checkpoint_every_steps=7 --hetero": (0, None),
    }
    results, fields = _parse_all([c.split() for c in cases])
    for case, (status, message) in cases.items():
        r = results[case]
        assert r["status"] == status, (case, r)
        if message is not None:
            assert r["stdout"] == "" and r["stderr"].count("\n") == 1, (case, r)  # one line, no traceback
            assert r["stderr"].startswith(f"experiments.train: error: {message}"), (case, r["stderr"])
    for case in ("-h", "--help"):
        assert "usage: python -m experiments.train --workdir=DIR [flags]" in results[case]["stdout"]
        assert "--workdir: (required)" in results[case]["stdout"]
        assert "--optimizer: optimizer: adam | sgd" in results[case]["stdout"]
    assert not (tmp_path / "run").exists()  # nothing created by any of them

    # one flag per TrainConfig field the command line sets directly, with the field's default
    expected = [f.name for f in dataclasses.fields(training.TrainConfig) if f.metadata["cli"]]
    assert fields["cli_fields"] == expected and "architecture" not in expected and "loss" not in expected
    defaults = training.TrainConfig()
    assert fields["defaults"] == {k: getattr(defaults, k) for k in expected}
    config = results[f"{w} --lr=0.01 --augment=flip_crop+rotate --checkpoint_every_steps=7 --hetero"]["config"]
    assert config["lr"] == 0.01 and config["augment"] == "flip_crop+rotate" and config["checkpoint_every_steps"] == 7
    assert config["loss"] == "hetero" and config["architecture"]["hetero"] is True
