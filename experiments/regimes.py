"""The CIFAR-10 training regimes compared by experiments.tradeoff and experiments.calibration (configs as code).

``REGIMES``: name -> pretrained checkpoint. ``MAIN``: the four regimes of the original study (standard, PGD-trained,
rotation-trained, both). ``SERIES``: the trade-off curves, each one training knob turned up from strength 0 with
everything else in the recipe fixed (``KNOBS``: the hyper-parameters allowed to change along a series; tested against
the checkpoints' cards). The adversarial-training eps series uses the ``pgd`` checkpoint's recipe (FGSM with random
start, 24 epochs, no label smoothing), so its zero point is ``eps0`` (that recipe without the adversary), not
``standard`` (30 epochs, label smoothing 0.1). The rotation series uses the ``rot`` recipe, which is the standard
recipe plus rotations, so it starts at ``standard``. Every checkpoint's card holds the command that trains it.
"""

from __future__ import annotations

REGIMES = {"cifar10": {
    "standard": "cifar10_resnet10",
    "pgd": "cifar10_resnet10_pgd",
    "rot": "cifar10_resnet10_rot",
    "pgd_rot": "cifar10_resnet10_pgd_rot",
    "fgsm_eps2": "cifar10_resnet10_fgsm_eps2",
    "fgsm_eps4": "cifar10_resnet10_fgsm_eps4",
    "rot10": "cifar10_resnet10_rot10",
    "rot20": "cifar10_resnet10_rot20",
    "eps0": "cifar10_resnet10_eps0",
}}
MAIN = ("standard", "pgd", "rot", "pgd_rot")
# series label -> [(regime, strength)], strength increasing from 0
SERIES = {"cifar10": {
    "training eps (/255)": [("eps0", 0.0), ("fgsm_eps2", 2.0), ("fgsm_eps4", 4.0), ("pgd", 8.0)],
    "training rotation (±degrees)": [("standard", 0.0), ("rot10", 10.0), ("rot20", 20.0), ("rot", 30.0)],
}}
# series label -> the card hyper-parameters that may differ along it (everything else must match)
KNOBS = {"training eps (/255)": ("adversary", "adv_eps"),
         "training rotation (±degrees)": ("augment", "rotation_degrees")}


def problem(dataset: str, names=None) -> str | None:
    """Why the regimes `names` (None: every regime) of `dataset` cannot be evaluated, as one line naming the flags and
    the valid choices; None if they can. Checks the names and that their checkpoints are available."""
    from robust_jax import checkpoints

    if dataset not in REGIMES:
        return f"no training regimes for --dataset={dataset}; datasets with regimes: {', '.join(sorted(REGIMES))}"
    regimes = REGIMES[dataset]
    unknown = sorted(set(names or ()) - set(regimes))
    if unknown:
        return f"unknown models {', '.join(unknown)} for --dataset={dataset}; regimes: {', '.join(regimes)}"
    have = set(checkpoints.available())
    missing = [n for n in (names or ()) if regimes[n] not in have]
    if missing:
        return (f"--models: the checkpoints of {', '.join(f'{n} ({regimes[n]})' for n in missing)} are not in "
                f"{checkpoints.root()}; train them with the command in the card of a sibling checkpoint "
                f"(checkpoints/*/card.json)")
    if not any(c in have for c in regimes.values()):
        return f"none of the {dataset} regimes' checkpoints is in {checkpoints.root()}: {', '.join(regimes.values())}"
    return None


def load_models(dataset: str, names=None) -> dict:
    """{name: Classifier} for the regimes whose checkpoints are available (all of them, or `names`); ValueError
    (the message of :func:`problem`) if a name is unknown or its checkpoint missing."""
    from robust_jax import checkpoints

    why = problem(dataset, names)
    if why:
        raise ValueError(why)
    regimes, have = REGIMES[dataset], set(checkpoints.available())
    return {n: checkpoints.load(regimes[n]) for n in (names or regimes) if regimes[n] in have}


def series(dataset: str, available) -> dict:
    """SERIES restricted to the available regimes: {label: ([strengths], [names])}; series with < 2 points dropped."""
    out = {}
    for label, points in SERIES.get(dataset, {}).items():
        pts = [(s, n) for n, s in points if n in available]
        if len(pts) >= 2:
            out[label] = ([s for s, _ in pts], [n for _, n in pts])
    return out
