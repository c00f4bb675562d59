"""The training regimes (configs as code) of the trade-off and calibration studies."""

import json

import pytest

from experiments import regimes
from robust_jax import checkpoints


def test_series_are_ordered_knobs_from_zero():
    for label, points in regimes.SERIES["cifar10"].items():
        names, strengths = [n for n, _ in points], [s for _, s in points]
        assert strengths[0] == 0, label
        assert strengths == sorted(strengths) and len(set(strengths)) == len(strengths), label
        assert set(names) <= set(regimes.REGIMES["cifar10"]), label
        assert label in regimes.KNOBS
    assert set(regimes.MAIN) <= set(regimes.REGIMES["cifar10"])


BOOKKEEPING = {"checkpoint_every_steps", "keep_checkpoints", "max_train_examples", "max_eval_examples", "conv_impl"}


@pytest.mark.parametrize("label", list(regimes.SERIES["cifar10"]))
def test_series_points_differ_only_in_their_knob(label):
    """Along a series only the knob changes: same architecture, epochs, seed and hyper-parameters (read off the
    checkpoints' cards; older cards lack some keys, so the keys both cards have are compared)."""
    cards = {}
    for name, _ in regimes.SERIES["cifar10"][label]:
        path = checkpoints.root() / regimes.REGIMES["cifar10"][name] / "card.json"
        if path.is_file():
            cards[name] = json.loads(path.read_text())
    if len(cards) < 2:
        pytest.skip("fewer than two checkpoints of this series are present")
    (first, a), *rest = cards.items()
    for name, b in rest:
        for key in ("architecture", "epochs", "seed", "dataset"):
            assert a[key] == b[key], (label, first, name, key)
        ha, hb = a["hyperparameters"], b["hyperparameters"]
        for key in (set(ha) & set(hb)) - BOOKKEEPING - set(regimes.KNOBS[label]):
            assert ha[key] == hb[key], (label, first, name, key)


def test_series_keeps_only_available_points_and_drops_single_points():
    got = regimes.series("cifar10", ["standard", "eps0", "pgd", "rot10"])
    assert got["training eps (/255)"] == ([0.0, 8.0], ["eps0", "pgd"])
    assert got["training rotation (±degrees)"] == ([0.0, 10.0], ["standard", "rot10"])
    assert regimes.series("cifar10", ["standard"]) == {}
    assert regimes.series("mnist", ["standard"]) == {}


def test_load_models_rejects_unknown_names_and_datasets():
    with pytest.raises(ValueError, match="unknown models"):
        regimes.load_models("cifar10", ["standard", "nope"])
    with pytest.raises(ValueError, match="no training regimes"):
        regimes.load_models("mnist")
