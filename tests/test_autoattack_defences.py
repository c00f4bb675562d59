"""experiments.autoattack against the uncertainty study's randomised defences (--defence, version rand)."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from robust_jax import attacks, autoattack_eval, data, uncertainty

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"apgd-ce": {"steps": 3, "loop": "fori"}, "apgd-dlr": {"steps": 3, "loop": "fori"}}


def _cli():
    sys.path.insert(0, str(ROOT))
    return importlib.import_module("experiments.autoattack")


def _flags(**kw):
    good = dict(checkpoint="mnist_basic_cnn", norm="linf", eps="0.3", version="rand", attacks=None, num_examples=10,
                batch_size=10, eot_samples=20, options=None, defence=None)
    return type("F", (), {**good, **kw})


def _mnist(need_checkpoint, real_data, name, n):
    m = need_checkpoint(name)
    real_data("mnist")
    x, y = data.load("mnist", data.head("mnist", data.splits("mnist")["test"], n))
    return m, data.to_float(x), y


def test_defence_flags_are_checked_before_loading(need_checkpoint):
    need_checkpoint("mnist_basic_cnn")
    cli = _cli()
    assert cli.defence_of(_flags()) == "epistemic" and cli.defence_of(_flags(version="standard")) == "none"
    assert cli.check_flags(_flags(defence="epistemic")) == (pytest.approx(0.3), None)
    for bad, message in (({"defence": "none"}, "randomised defence"), ({"defence": "bayes"}, "--defence"),
                         ({"defence": "epistemic", "version": "standard"}, "--version=rand"),
                         ({"defence": "aleatoric"}, "heteroscedastic")):
        with pytest.raises(ValueError, match=message):
            cli.check_flags(_flags(**bad))
    assert cli.default_out_dir("m", "linf", "8/255", "standard", "none") == "results/autoattack/m_linf_8_255"
    assert cli.default_out_dir("m", "linf", "0.3", "rand", "aleatoric") == \
        "results/autoattack/m_linf_0.3_rand_aleatoric"


def test_epistemic_builder_is_the_mc_dropout_eot(need_checkpoint, real_data):
    m, x, _ = _mnist(need_checkpoint, real_data, "mnist_basic_cnn", 4)
    f = autoattack_eval.defence_builder("epistemic", m, 5)(m.variables)
    old = attacks.eot(uncertainty.mc_dropout_logits_fn(m.apply, m.variables), 5)
    assert isinstance(f, attacks.EOT) and f.num_samples == 5
    np.testing.assert_allclose(f(x), old(x), atol=1e-6)
    k = jax.random.PRNGKey(3)
    np.testing.assert_allclose(f.sample_logits(k, x), old.sample_logits(k, x), atol=1e-6)


@pytest.mark.slow
def test_rand_against_mc_dropout_records_defence_and_eot(need_checkpoint, real_data):
    m, x, y = _mnist(need_checkpoint, real_data, "mnist_basic_cnn", 8)
    res = autoattack_eval.evaluate(autoattack_eval.defence_builder("epistemic", m, 2), m.variables, x, y,
                                   key=jax.random.PRNGKey(0), norm="linf", eps=0.3, version="rand", options=QUICK,
                                   batch_size=8, progress=False, config={"defence": "epistemic"})
    assert res["defence"] == "epistemic" and res["eot_samples"] == 2
    assert res["passes"]["apgd-ce"]["per_image"] == {"forward": 3 * 2 + 1, "backward": 3 * 2}
    acc = res["robust_accuracy"]
    assert acc["clean"] >= acc["apgd-ce"] >= acc["apgd-dlr"] == res["final_robust_accuracy"]
    assert acc["apgd-dlr"] < acc["clean"]  # eps 0.3 breaks MC-dropout on MNIST even with 3 steps
    assert res["max_perturbation"] <= 0.3 + 1e-6
    assert not any("do not differ" in f for f in res["flags"])
    # the network without dropout samples is flagged: EOT would average identical passes
    det = autoattack_eval.evaluate(lambda v: attacks.eot(lambda k, z: m.apply(v, z), 2), m.variables, x, y,
                                   key=jax.random.PRNGKey(0), norm="linf", eps=0.3, version="rand", options=QUICK,
                                   batch_size=8, progress=False)
    assert any("do not differ" in f for f in det["flags"])


@pytest.mark.slow
def test_rand_cli_against_the_heteroscedastic_defence(tmp_path, need_checkpoint, real_data):
    _mnist(need_checkpoint, real_data, "mnist_basic_cnn_hetero", 1)
    proc = subprocess.run([sys.executable, "-m", "experiments.autoattack", "--checkpoint=mnist_basic_cnn_hetero",
                           "--eps=0.3", "--version=rand", "--defence=aleatoric", "--num_examples=8",
                           "--batch_size=8", "--eot_samples=2", f"--options={json.dumps(QUICK)}", "--noprogress",
                           f"--out_dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["defence"] == "aleatoric" and res["eot_samples"] == 2 and res["version"] == "rand"
    assert res["attacks"] == ["apgd-ce", "apgd-dlr"] and res["num_examples"] == 8
    assert res["final_robust_accuracy"] <= res["clean_accuracy"]
    md = (tmp_path / "results.md").read_text()
    assert "heteroscedastic logit draws (aleatoric); attacked through EOT over 2 samples" in md
