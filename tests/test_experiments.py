"""End-to-end runs of the experiment scripts on tiny slices of the real data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _run(module, *args, timeout=900):
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out_dir = next(a.split("=", 1)[1] for a in args if a.startswith("--out_dir="))
    # every run ends with a short summary and the folder its results are in
    assert "finished in" in proc.stdout and f"results in {Path(out_dir).resolve()}/: results.md" in proc.stdout
    return proc.stdout


@pytest.mark.slow
def test_energy_detection_end_to_end(tmp_path, need_checkpoint, real_data):
    need_checkpoint("mnist_basic_cnn")
    real_data("mnist")
    _run("experiments.energy_detection", "--dataset=mnist", "--num_examples=24", "--steps=0,1,2",
         "--detector_steps=1,2", "--fixed_steps=2", "--lams=1", "--le_steps=2", "--batch_size=24",
         "--num_val=24", "--mc_num_examples=8", "--mc_samples=2", "--conv_impl=xla", "--apgd_lams=3",
         "--apgd_steps=3", f"--out_dir={tmp_path}")
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["config"]["conv_impl"] == {"eval": "custom_vjp", "attack": "xla"}
    assert [row["steps"] for row in r["energy_vs_steps"]] == [0, 1, 2]
    assert [row["attack"] for row in r["detector_table"]] == ["pgd1", "pgd2", "pgd2_big"]
    for row in r["detector_table"]:
        assert {"tpr", "fpr", "fnr", "auroc", "aupr", "adversarial_accuracy", "temperature"} <= set(row)
    assert set(r["confusion_pgd"]) >= {"TN", "FP", "FN", "TP"}
    assert r["le_pgd"][0]["lam"] == 1.0
    # the LE-PGD histogram is drawn at the headline lambda (the only one here) with the deployed threshold
    assert r["le_pgd_headline"]["lam"] == 1.0 and "threshold" in r["detector"]
    mc = r["mc_dropout"]
    assert set(mc["rows"]) == {"deterministic", "mc_dropout"} and mc["eot_samples"] == 2
    for row in mc["rows"].values():
        assert {"tpr", "fpr", "auroc", "adversarial_accuracy"} <= set(row["pgd"]) and "le_pgd" in row
    ap = r["apgd"]
    assert ap["steps"] == 3 and [(x["attack"], x["lam"]) for x in ap["rows"]] == [("le_apgd", 3.0),
                                                                               ("detector_apgd", None)]
    for row in ap["rows"]:
        assert {"tpr", "fpr", "auroc", "adversarial_accuracy", "mean_energy"} <= set(row)
        assert 0 <= row["fooled_undetected"] <= 1 - row["adversarial_accuracy"] + 1e-9
    assert "detector-aware APGD" in (tmp_path / "results.md").read_text()
    for name in ("results.md", "energy_hist_pgd.png", "energy_vs_steps.png", "energy_hist_le_pgd.png",
                 "roc_pgd_vs_le_pgd.png", "auroc_vs_lambda.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow
def test_robustness_cli_end_to_end(tmp_path, need_checkpoint, real_data):
    need_checkpoint("mnist_basic_cnn")
    real_data("mnist")
    _run("experiments.robustness", "--attacks=fgsm,pgd,jsma", "--num_examples=16", "--pgd_steps=3",
         "--batch_size=16", "--conv_impl=xla", f"--out_dir={tmp_path}")
    r = json.loads((tmp_path / "results.json").read_text())
    assert [row["attack"] for row in r["rows"]] == ["fgsm", "pgd", "jsma"]
    for row in r["rows"][:2]:
        assert 0 <= row["adversarial_accuracy"] <= row["accuracy"] <= 1
        assert row["mean_linf"] <= 0.3 + 1e-6
    # the attack kernels differentiated by FGSM / PGD; JSMA stops at the decision boundary: the evaluation kernels
    assert r["conv_impl"] == {"eval": "custom_vjp", "attack": "xla"}
    assert [row["conv_impl"] for row in r["rows"]] == ["xla", "xla", "custom_vjp"]
    md = (tmp_path / "results.md").read_text()
    assert "| fgsm |" in md and "attack gradients `xla`" in md


@pytest.mark.slow
def test_uncertainty_robustness_end_to_end(tmp_path, need_checkpoint, real_data):
    need_checkpoint("mnist_basic_cnn")
    need_checkpoint("mnist_basic_cnn_hetero")
    real_data("mnist")
    _run("experiments.uncertainty_robustness", "--dataset=mnist", "--attacks=fgsm,cw_l2,jsma,blackbox",
         "--num_examples=16", "--num_examples_slow=8", "--mc_samples=4", "--eot_samples=2", "--cw_steps=5",
         "--cw_binary_search_steps=1", "--blackbox_rounds=1", "--eps_sweep=0,0.3", "--batch_size=16",
         "--conv_impl=xla", f"--out_dir={tmp_path}")
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["conv_impl"] == {"eval": "custom_vjp", "attack": "xla"}
    kernels = {"fgsm": "xla", "cw_l2": "custom_vjp", "jsma": "custom_vjp", "blackbox": None}
    assert all(row["conv_impl"] == kernels[row["attack"]] for row in r["rows"])
    keys = {"dataset", "defence", "attack", "protocol", "accuracy", "adversarial_accuracy", "fooling_rate", "eps", "n",
            "seed"}
    combos = set()
    for row in r["rows"]:
        assert keys <= set(row)
        assert row["defence"] in ("none", "epistemic", "aleatoric") and row["protocol"] in ("single_pass", "adaptive")
        assert 0 <= row["adversarial_accuracy"] <= 1 and 0 <= row["fooling_rate"] <= 1
        combos.add((row["defence"], row["attack"], row["protocol"]))
    assert len(combos) == len(r["rows"]) == 3 * 4 * 2
    adv = {(row["defence"], row["attack"], row["protocol"]): row["adversarial_accuracy"] for row in r["rows"]}
    assert len(r["worst_case"]) == 3 * 4
    for w in r["worst_case"]:  # robust under both protocols: at most the smaller of the two accuracies
        both = [adv[w["defence"], w["attack"], p] for p in ("single_pass", "adaptive")]
        assert w["adversarial_accuracy"] <= min(both) + 1e-9
    assert {x["score"] for x in r["detection"]} >= {"predictive_entropy", "mutual_information", "aleatoric_variance"}
    for name in ("results.md", "fgsm_accuracy_vs_eps.png", "uncertainty_hist_epistemic.png",
                 "uncertainty_roc_aleatoric.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow
def test_tradeoff_end_to_end_and_resume(tmp_path, need_checkpoint, real_data):
    need_checkpoint("cifar10_resnet10_eps0")
    need_checkpoint("cifar10_resnet10_pgd")
    real_data("cifar10")
    args = ["--models=eps0,pgd", "--transform=rotation,noise", "--num_examples=12", "--k=2", "--pgd_steps=2",
            "--curve_eps=2/255", "--batch_size=12", f"--out_dir={tmp_path}"]
    _run("experiments.tradeoff", *args, "--conv_impl=xla")
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["conv_impl"] == {"eval": "custom_vjp", "attack": "xla"}
    e = r["models"]["eps0"]["evals"]
    assert e["pgd2_eps0.03137"]["conv_impl"] == e["pgd2_eps0.00784"]["conv_impl"] == "xla"
    assert {"clean", "rotation_worst_of_2", "rotation_severities", "noise_worst_of_2", "noise_severities"} <= set(e)
    assert e["rotation_worst_of_2"]["accuracy"] <= e["rotation_worst_of_2"]["mean_accuracy"]
    # PGD at the main budget (8/255) and at the curve budget (2/255): the larger ball is at least as strong
    pgd8, pgd2 = e["pgd2_eps0.03137"], e["pgd2_eps0.00784"]
    assert pgd8["eps"] == pytest.approx(8 / 255) and pgd2["eps"] == pytest.approx(2 / 255)
    assert pgd8["accuracy"] <= pgd2["accuracy"] <= e["clean"]
    # the training-eps series (eps0 -> pgd) is drawn from the two available points
    assert r["series"]["training eps (/255)"] == {"strength": [0.0, 8.0], "models": ["eps0", "pgd"]}
    # at severity 0 (rotation by 0°) the accuracy is the clean accuracy
    sev = e["rotation_severities"]
    assert sev["accuracy"][sev["values"].index(0.0)] == pytest.approx(e["clean"])
    for name in ("results.md", "tradeoff_rotation.png", "accuracy_vs_noise.png", "strength_rotation.png"):
        assert (tmp_path / name).stat().st_size > 0
    # a rerun with one more family only computes that family (the cached entries are reused unchanged)
    cached = json.loads((tmp_path / "evals" / "eps0.json").read_text())["evals"]
    # (and --grid adds Engstrom's exhaustive grid, which contains the identity: never above clean accuracy)
    _run("experiments.tradeoff", "--grid", "--conv_impl=xla",
         *[a if not a.startswith("--transform") else "--transform=rotation,noise,blur" for a in args])
    again = json.loads((tmp_path / "evals" / "eps0.json").read_text())["evals"]
    assert again["rotation_worst_of_2"] == cached["rotation_worst_of_2"] and "blur_worst_of_2" in again
    assert again["pgd2_eps0.00784"] == cached["pgd2_eps0.00784"]
    assert again["rotation_translation_grid"]["shape"] == [31, 5, 5]
    assert again["rotation_translation_grid"]["accuracy"] <= again["clean"]
    # a later run without --grid keeps the cached grid column in the table; with other attack kernels it recomputes
    # the PGD entries only
    _run("experiments.tradeoff", *args, "--conv_impl=custom_vjp")
    assert "rot+trans grid" in (tmp_path / "results.md").read_text()
    last = json.loads((tmp_path / "evals" / "eps0.json").read_text())["evals"]
    assert last["pgd2_eps0.00784"]["conv_impl"] == "custom_vjp" and last["pgd2_eps0.00784"] != again["pgd2_eps0.00784"]
    assert {k: v for k, v in last.items() if not k.startswith("pgd")} == {k: v for k, v in again.items()
                                                                          if not k.startswith("pgd")}


@pytest.mark.slow
def test_calibration_end_to_end(tmp_path, need_checkpoint, real_data):
    need_checkpoint("cifar10_resnet10")
    real_data("cifar10")
    _run("experiments.calibration", "--models=standard", "--perturbations=clean,pgd_2,rotation,noise_0.1",
         "--num_examples=20", "--num_val=40", "--batch_size=20", "--conv_impl=xla", f"--out_dir={tmp_path}")
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["conv_impl"] == {"eval": "custom_vjp", "attack": "xla"}
    row = r["results"]["standard"]
    assert row["pgd_2"]["conv_impl"] == "xla" and "conv_impl" not in row["rotation"]
    assert list(row) == ["clean", "pgd_2", "rotation", "noise_0.1"]
    for v in row.values():
        assert 0 <= v["ece"] <= 1 and 0 <= v["ece_temperature_scaled"] <= 1
    assert row["pgd_2"]["accuracy"] <= row["clean"]["accuracy"]
    assert 0.5 <= r["temperatures"]["standard"] <= 3.0
    assert (tmp_path / "reliability.png").stat().st_size > 0
    # a rerun with one more perturbation reuses the cached rows (same key per perturbation name), but PGD only with
    # the attack kernels it was computed with
    _run("experiments.calibration", "--models=standard", "--perturbations=rotation,blur,pgd_2",
         "--num_examples=20", "--num_val=40", "--batch_size=20", "--conv_impl=custom_vjp", f"--out_dir={tmp_path}")
    again = json.loads((tmp_path / "results.json").read_text())["results"]["standard"]
    assert list(again) == ["rotation", "blur", "pgd_2"] and again["rotation"] == row["rotation"]
    assert again["pgd_2"]["conv_impl"] == "custom_vjp"


def test_calibration_verdicts_count_per_perturbation():
    from experiments.calibration import verdicts

    row = lambda clean, blur: {"clean": {"ece": clean, "ece_temperature_scaled": clean},  # noqa: E731
                               "blur": {"ece": blur, "ece_temperature_scaled": 2 * blur}}
    results = {"standard": row(0.08, 0.10), "eps0": row(0.05, 0.09), "fgsm_eps2": row(0.03, 0.06),
               "pgd": row(0.14, 0.04)}
    lines = verdicts(results, ["clean", "blur"])
    # pairs whose models are missing (pgd_rot, rot, fgsm_eps4) are skipped
    assert len(lines) == 6 and not any("pgd_rot" in x or "fgsm_eps4" in x for x in lines)
    assert lines[0].endswith("ece: pgd < standard on 1/2 perturbations (blur)")
    assert lines[2].endswith("ece: fgsm_eps2 < eps0 on 2/2 perturbations (clean, blur)")
    assert lines[5].endswith("ece_temperature_scaled: pgd < eps0 on 1/2 perturbations (blur)")
