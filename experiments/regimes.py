"""The CIFAR-10 training regimes compared by experiments.tradeoff and experiments.calibration (configs as code).

``REGIMES``: pretrained checkpoints (standard, PGD-trained, rotation-trained, both). ``SWEEP``: further trade-off
points (other adversarial eps / rotation strengths) trained on demand with the standard checkpoint's recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

REGIMES = {"cifar10": {"standard": "cifar10_resnet10", "pgd": "cifar10_resnet10_pgd", "rot": "cifar10_resnet10_rot",
                       "pgd_rot": "cifar10_resnet10_pgd_rot"}}
BASE_RECIPE = {"cifar10": "cifar10_resnet10"}  # sweep points reuse this checkpoint's hyper-parameters
SWEEP = {  # name -> TrainConfig overrides
    "fgsm_eps2": {"adversary": "fgsm_rs", "adv_eps": 2 / 255, "label_smoothing": 0.0},
    "fgsm_eps4": {"adversary": "fgsm_rs", "adv_eps": 4 / 255, "label_smoothing": 0.0},
    "rot10": {"augment": "flip_crop+rotate", "rotation_degrees": 10.0},
    "rot20": {"augment": "flip_crop+rotate", "rotation_degrees": 20.0},
}

def load_models(dataset: str, names=None, *, data_dir=None, train_sweep=(), sweep_epochs=15, workdir="runs/tradeoff"):
    """{name: Classifier}: the available REGIMES checkpoints and the sweep points trained in `workdir`."""
    import dataclasses

    from robust_jax import checkpoints, training

    out = {}
    for name, ckpt in REGIMES[dataset].items():
        if ckpt in checkpoints.available():
            out[name] = checkpoints.load(ckpt)
    base = checkpoints.load(BASE_RECIPE[dataset]).card
    for name, overrides in SWEEP.items():
        wd = Path(workdir) / name
        if name not in train_sweep and not (wd / "final.json").is_file():
            continue
        hp = {**base["hyperparameters"], **overrides}
        config = training.TrainConfig(dataset=dataset, architecture=base["architecture"], epochs=sweep_epochs,
                                      seed=base["seed"], **hp)
        if (wd / "config.json").is_file():  # a resumed / finished point keeps its own epochs
            config = dataclasses.replace(config, epochs=json.loads((wd / "config.json").read_text())["epochs"])
        result = training.train(config, wd, data_dir=data_dir)
        (wd / "final.json").write_text(json.dumps({"val": result["val"], "step": result["step"]}))
        from robust_jax import models

        card = {"name": name, "architecture": config.architecture, "dataset": dataset, "epochs": config.epochs,
                "hyperparameters": dataclasses.asdict(config), "val_accuracy": result["val"]["accuracy"]}
        out[name] = checkpoints.Classifier(models.create(config.architecture), result["state"].variables, card)
    if names:
        missing = sorted(set(names) - set(out))
        if missing:
            raise ValueError(f"models {missing} not available; available: {sorted(out)} "
                             f"(sweep points: train with --train_sweep, names {sorted(SWEEP)})")
        out = {n: out[n] for n in names}
    return out
