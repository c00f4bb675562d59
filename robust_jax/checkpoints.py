"""Pretrained classifiers: ``checkpoints.load(name)`` and ``checkpoints.available()``.

Each checkpoint is a folder ``checkpoints/<name>/`` (top level of the repository, or ``$ROBUST_JAX_CHECKPOINTS``)
holding the model variables as an orbax checkpoint (``variables/``) and ``card.json``: architecture config,
dataset, hyper-parameters, seed, epochs, test accuracy, training time and the command that reproduces it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from robust_jax import data as data_lib
from robust_jax import models


def root() -> Path:
    env = os.environ.get("ROBUST_JAX_CHECKPOINTS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "checkpoints"


def available() -> list[str]:
    r = root()
    return sorted(p.name for p in r.iterdir() if (p / "card.json").is_file()) if r.is_dir() else []


@dataclasses.dataclass
class Classifier:
    """A pretrained model: ``m(x)`` gives eval-mode logits; ``m.apply(m.variables, x, **kw)`` is pure."""

    model: Any
    variables: Any
    card: dict

    def __post_init__(self):
        self._predict = jax.jit(lambda v, x: models.logits_of(self.model.apply(v, x)))

    @property
    def apply(self):
        return self.model.apply

    def __call__(self, x):
        return self._predict(self.variables, jnp.asarray(x, jnp.float32))

    def logits_fn(self, **apply_kwargs):
        """``x -> logits`` with these variables (a closure; pass variables explicitly under jit to avoid
        recompiling when weights change: ``functools.partial(m.apply, m.variables)``)."""
        return lambda x: models.logits_of(self.model.apply(self.variables, x, **apply_kwargs))


def _abstract_variables(model, image_shape):
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
                                               jnp.zeros((1, *image_shape), jnp.float32)))
    return shapes


def load(name: str, *, conv_impl: str | None = None) -> Classifier:
    """Load checkpoint `name`. The model uses the default ``conv_impl`` (or `conv_impl` if given), whatever kernels
    it was trained with (``hyperparameters.conv_impl`` in the card), so loading never needs e.g. oneDNN."""
    import orbax.checkpoint as ocp

    path = root() / name
    if not (path / "card.json").is_file():
        raise FileNotFoundError(f"no checkpoint {name!r} in {root()}; available: {available()}")
    card = json.loads((path / "card.json").read_text())
    arch = {k: v for k, v in card["architecture"].items() if k != "conv_impl"}
    model = models.create({**arch, "conv_impl": conv_impl} if conv_impl is not None else arch)
    abstract = _abstract_variables(model, data_lib.info(card["dataset"]).image_shape)
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore((path / "variables").absolute(), abstract)
    return Classifier(model, variables, card)


def test_accuracy(architecture: dict, variables, dataset: str, *, data_dir=None, split: str | None = None) -> float:
    from robust_jax import training

    x, y = data_lib.load(dataset, split or data_lib.splits(dataset)["test"], data_dir=data_dir)
    predict = training.make_predict(models.create(architecture))
    return training.evaluate(predict, variables, x, y)["accuracy"]


SLICE = "test[:2000]"


def card_accuracies(architecture: dict, variables, dataset: str, *, data_dir=None) -> dict:
    """The accuracies a card records: the full test split and its first 2000 examples (for fast checks)."""
    test = data_lib.splits(dataset)["test"]
    return {
        "test_accuracy": test_accuracy(architecture, variables, dataset, data_dir=data_dir),
        "test_accuracy_first_2000": test_accuracy(architecture, variables, dataset, data_dir=data_dir,
                                                  split=SLICE.replace("test", test)),
    }


def update_card(name: str, *, data_dir=None) -> dict:
    """Re-evaluate checkpoint `name` and rewrite the accuracies in its card."""
    m = load(name)
    card = {**m.card, **card_accuracies(m.card["architecture"], m.variables, m.card["dataset"], data_dir=data_dir)}
    (root() / name / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def export(name: str, variables, config, *, train_seconds: float, command: str,
           val_accuracy: float | None = None, extra: dict | None = None) -> Path:
    """Write ``checkpoints/<name>/`` (variables + card.json) from a finished training run."""
    import orbax.checkpoint as ocp

    path = root() / name
    path.mkdir(parents=True, exist_ok=True)
    target = (path / "variables").absolute()
    variables = jax.tree.map(np.asarray, jax.device_get(variables))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, variables, force=True)
    cfg = config.to_json()
    n_params = int(sum(np.size(p) for p in jax.tree.leaves(variables["params"])))
    card = {
        "name": name,
        "architecture": cfg["architecture"],
        "dataset": cfg["dataset"],
        "num_params": n_params,
        "hyperparameters": {k: v for k, v in cfg.items() if k not in ("architecture", "dataset", "seed", "epochs")},
        "seed": cfg["seed"],
        "epochs": cfg["epochs"],
        "test_split": data_lib.splits(cfg["dataset"])["test"],
        **card_accuracies(cfg["architecture"], variables, cfg["dataset"]),
        "val_accuracy": val_accuracy,
        "train_seconds": round(train_seconds, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
                   f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        "command": command,
        **(extra or {}),
    }
    (path / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return path
