"""The training regimes (configs as code) of the trade-off and calibration studies."""

import pytest

from experiments import regimes


def test_series_are_ordered_knobs_from_the_standard_model():
    for label, points in regimes.SERIES["cifar10"].items():
        names, strengths = [n for n, _ in points], [s for _, s in points]
        assert names[0] == "standard" and strengths[0] == 0, label
        assert strengths == sorted(strengths) and len(set(strengths)) == len(strengths), label
        assert set(names) <= set(regimes.REGIMES["cifar10"]), label
    assert set(regimes.MAIN) <= set(regimes.REGIMES["cifar10"])


def test_series_keeps_only_available_points_and_drops_single_points():
    got = regimes.series("cifar10", ["standard", "pgd", "rot10"])
    assert got["training eps (/255)"] == ([0.0, 8.0], ["standard", "pgd"])
    assert got["training rotation (±degrees)"] == ([0.0, 10.0], ["standard", "rot10"])
    assert regimes.series("cifar10", ["standard"]) == {}
    assert regimes.series("mnist", ["standard"]) == {}


def test_load_models_rejects_unknown_names_and_datasets():
    with pytest.raises(ValueError, match="unknown models"):
        regimes.load_models("cifar10", ["standard", "nope"])
    with pytest.raises(ValueError, match="no training regimes"):
        regimes.load_models("mnist")
