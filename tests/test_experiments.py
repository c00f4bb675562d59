"""End-to-end runs of the experiment scripts on tiny slices of the real data."""

import json
import subprocess
import sys

import pytest


def _run(module, *args, timeout=900):
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_energy_detection_end_to_end(tmp_path, need_checkpoint, real_data):
    need_checkpoint("mnist_basic_cnn")
    real_data("mnist")
    _run("experiments.energy_detection", "--dataset=mnist", "--num_examples=24", "--steps=0,1,2",
         "--detector_steps=1,2", "--fixed_steps=2", "--lams=1", "--le_steps=2", "--batch_size=24",
         f"--out_dir={tmp_path}")
    r = json.loads((tmp_path / "results.json").read_text())
    assert [row["steps"] for row in r["energy_vs_steps"]] == [0, 1, 2]
    assert [row["attack"] for row in r["detector_table"]] == ["pgd1", "pgd2", "pgd2_big"]
    for row in r["detector_table"]:
        assert {"tpr", "fpr", "fnr", "auroc", "aupr", "adversarial_accuracy", "temperature"} <= set(row)
    assert set(r["confusion_pgd"]) >= {"TN", "FP", "FN", "TP"}
    assert r["le_pgd"][0]["lam"] == 1.0
    for name in ("results.md", "energy_hist_pgd.png", "energy_vs_steps.png", "energy_hist_le_pgd.png",
                 "roc_pgd_vs_le_pgd.png", "auroc_vs_lambda.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow
def test_robustness_cli_end_to_end(tmp_path, need_checkpoint, real_data):
    need_checkpoint("mnist_basic_cnn")
    real_data("mnist")
    _run("experiments.robustness", "--attacks=fgsm,pgd", "--num_examples=16", "--pgd_steps=3", "--batch_size=16",
         f"--out_dir={tmp_path}")
    r = json.loads((tmp_path / "results.json").read_text())
    assert [row["attack"] for row in r["rows"]] == ["fgsm", "pgd"]
    for row in r["rows"]:
        assert 0 <= row["adversarial_accuracy"] <= row["accuracy"] <= 1
        assert row["mean_linf"] <= 0.3 + 1e-6
    assert "| fgsm |" in (tmp_path / "results.md").read_text()
