"""Pretrained classifiers: ``checkpoints.load(name)`` and ``checkpoints.available()``.

Each checkpoint is a folder ``checkpoints/<name>/`` (top level of the repository, or ``$ROBUST_JAX_CHECKPOINTS``)
holding the model variables as an orbax checkpoint (``variables/``) and ``card.json``: architecture config,
dataset, hyper-parameters, seed, epochs, test accuracy, training time and the command that reproduces it, and
``variables.sha256`` (``sha256sum`` format) listing every file under ``variables/``. ``load`` accepts plain folder
names only, reads the card as validated JSON data and checks the files against ``variables.sha256`` before orbax reads
them: damage is reported as :class:`CorruptCheckpointError` naming the file and the checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from robust_jax import data as data_lib
from robust_jax import models, sharding, training


class CorruptCheckpointError(ValueError):
    """A checkpoint folder is incomplete or damaged (bad card.json, missing, truncated or altered variable files)."""


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a plain folder name: no separators, no "..", not absolute
CHECKSUMS = "variables.sha256"  # sha256sum-format list of the files under variables/, checked on load


def root() -> Path:
    env = os.environ.get("ROBUST_JAX_CHECKPOINTS")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[1] / "checkpoints"


def available() -> list[str]:
    r = root()
    if not r.is_dir():
        return []
    return sorted(p.name for p in r.iterdir() if _NAME.fullmatch(p.name) and (p / "card.json").is_file())


def _checkpoint_dir(name) -> Path:
    """``root() / name`` for a plain checkpoint name; ValueError for anything that could leave the root."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"invalid checkpoint name {name!r}: a name is a folder of {root()} (letters, digits, '_', "
                         f"'-', '.'; no path separators, no '..', not a path); available: {available()}")
    path = root() / name
    if not (path / "card.json").is_file():
        why = f"{path} has no card.json" if path.is_dir() else f"no folder {path}"
        raise FileNotFoundError(f"no checkpoint {name!r} in {root()} ({why}); available: {available()}")
    return path


# card.json keys: required ones, and the JSON types every known key must have (unknown keys pass: export's `extra`)
_CARD_REQUIRED = ("architecture", "dataset")
_CARD_TYPES = {"name": str, "architecture": dict, "dataset": str, "num_params": int, "hyperparameters": dict,
               "seed": int, "epochs": int, "test_split": str, "test_accuracy": (int, float),
               "test_accuracy_first_2000": (int, float), "val_accuracy": (int, float, type(None)),
               "train_seconds": (int, float), "machine": str, "command": str}


def read_card(name: str) -> dict:
    """The parsed, validated ``card.json`` of checkpoint `name` (JSON data only; CorruptCheckpointError if bad)."""
    f = _checkpoint_dir(name) / "card.json"
    bad = functools.partial(_corrupt, name, f)
    try:
        card = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"not valid JSON ({e})") from e
    if not isinstance(card, dict):
        raise bad(f"the top level is a {type(card).__name__}, not an object")
    missing = [k for k in _CARD_REQUIRED if k not in card]
    if missing:
        raise bad(f"missing keys {missing}")
    for k, t in _CARD_TYPES.items():
        if k in card and (not isinstance(card[k], t) or isinstance(card[k], bool)):
            expected = t.__name__ if isinstance(t, type) else " or ".join(x.__name__ for x in t)
            raise bad(f"{k!r} is {card[k]!r}, expected {expected}")
    if not isinstance(card["architecture"].get("name"), str):
        raise bad("'architecture' has no model 'name'")
    if card["dataset"] not in data_lib.DATASETS:
        raise bad(f"unknown dataset {card['dataset']!r}; known: {sorted(data_lib.DATASETS)}")
    return card


def _corrupt(name: str, file: Path, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"checkpoint {name!r}: {file}: {what}. The checkpoint is incomplete or damaged: "
                                  f"restore {root() / name} (e.g. from git) or re-export it.")


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(path: Path) -> Path:
    """Write ``<path>/variables.sha256`` (``sha256sum`` format) for every file under ``<path>/variables``."""
    files = sorted(f for f in (path / "variables").rglob("*") if f.is_file())
    out = path / CHECKSUMS
    out.write_text("".join(f"{_sha256(f)}  {f.relative_to(path).as_posix()}\n" for f in files))
    return out


def verify_files(name: str) -> None:
    """Check checkpoint `name`'s variable files: the folder exists and, if it has ``variables.sha256``, every listed
    file is present with that SHA-256 (CorruptCheckpointError naming the file otherwise)."""
    path = _checkpoint_dir(name)
    if not (path / "variables").is_dir():
        raise _corrupt(name, path / "variables", "folder missing")
    sums = path / CHECKSUMS
    if not sums.is_file():
        return
    for n, line in enumerate(sums.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](variables/[^\\]+)", line)
        rel = m and Path(m.group(2))
        if not m or rel.is_absolute() or ".." in rel.parts:
            raise _corrupt(name, sums, f"line {n} is not '<sha256>  variables/<file>': {line[:100]!r}")
        f = path / rel
        if not f.is_file():
            raise _corrupt(name, f, "file missing")
        if _sha256(f) != m.group(1):
            raise _corrupt(name, f, f"content differs from {CHECKSUMS} (truncated or altered; now "
                                    f"{f.stat().st_size} bytes)")


@dataclasses.dataclass
class Classifier:
    """A pretrained model: ``m(x)`` gives eval-mode logits of one batch, ``m.predict(x)`` those of a whole dataset;
    ``m.apply(m.variables, x, **kw)`` is pure. Images are float pixels in [0, 1] or uint8 (scaled by 1/255)."""

    model: Any
    variables: Any
    card: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self._logits = training.make_predict(self.model)  # variables traced: compiled once per shape, any weights

    @property
    def apply(self):
        return self.model.apply

    def __call__(self, x):
        return self._logits(self.variables, jnp.asarray(x))

    def predict(self, x, batch_size: int = 500, *, mesh=None) -> np.ndarray:
        """Logits (numpy) for all of `x`, in fixed-size padded chunks of `batch_size` split over all devices of
        `mesh` (default: all), compiled once (:func:`robust_jax.sharding.run_sharded`)."""
        variables = sharding.replicate(self.variables, mesh)
        return sharding.run_sharded(functools.partial(self._logits, variables), np.asarray(x), batch_size=batch_size,
                                    m=mesh)

    def for_use(self, use: str, conv_impl: str = "auto") -> Classifier:
        """The same weights and card with the convolution kernels `conv_impl` resolved for `use` (one of
        ``models.CONV_USES``; see ``models.choose_conv_impl``). E.g. ``m.for_use("attack")`` computes attack gradients
        with bf16 oneDNN kernels on a CPU with fast bf16 units, while ``m`` (f32) keeps measuring clean accuracy."""
        return Classifier(self.model.clone(conv_impl=models.resolve_conv_impl(conv_impl, use)), self.variables,
                          self.card)

    def logits_fn(self, **apply_kwargs):
        """``x -> logits`` with these variables (a closure; pass variables explicitly under jit to avoid
        recompiling when weights change: ``functools.partial(m.apply, m.variables)``)."""
        return lambda x: models.logits_of(self.model.apply(self.variables, x, **apply_kwargs))


def _abstract_variables(model, image_shape):
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
                                               jnp.zeros((1, *image_shape), jnp.float32)))
    return shapes


def load(name: str, *, conv_impl: str | None = None, use: str = "eval") -> Classifier:
    """Load checkpoint `name` for `use` (one of ``models.CONV_USES``). The model uses `conv_impl` if given
    (``"auto"`` resolved for `use`, see ``models.choose_conv_impl``); otherwise the default ``conv_impl`` (f32
    ``"custom_vjp"``) for ``use="eval"`` and ``"auto"`` for any other declared use; whatever kernels it was trained
    with (``hyperparameters.conv_impl`` in the card), so loading for evaluation never needs e.g. oneDNN.

    Names are plain folder names of :func:`root` (ValueError otherwise); ``card.json`` is read as JSON data and
    validated; the variable files are checked against ``variables.sha256`` when the checkpoint has one. Problems
    raise FileNotFoundError (no such checkpoint) or CorruptCheckpointError naming the file, never an orbax traceback.
    """
    if conv_impl is None and use != "eval":
        conv_impl = "auto"
    if conv_impl is not None:  # an unknown name or use is the caller's error, not a corrupt card
        conv_impl = models.resolve_conv_impl(conv_impl, use)
    elif use not in models.CONV_USES:
        raise ValueError(f"unknown use {use!r}; use one of {models.CONV_USES}")
    card = read_card(name)
    path = _checkpoint_dir(name)
    arch = {k: v for k, v in card["architecture"].items() if k != "conv_impl"}
    try:
        model = models.create({**arch, "conv_impl": conv_impl} if conv_impl is not None else arch, use=use)
    except (TypeError, ValueError, KeyError) as e:
        raise _corrupt(name, path / "card.json", f"'architecture' {arch} is not a valid model config ({e})") from e
    abstract = _abstract_variables(model, data_lib.info(card["dataset"]).image_shape)
    verify_files(name)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            variables = ckptr.restore((path / "variables").absolute(), abstract)
    except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many types; all mean "unreadable"
        cause = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise _corrupt(name, path / "variables", f"orbax cannot restore the variables of the card's "
                       f"{arch['name']} ({type(e).__name__}: {cause})") from e
    return Classifier(model, variables, card)


def test_accuracy(architecture: dict, variables, dataset: str, *, data_dir=None, split: str | None = None) -> float:
    x, y = data_lib.load(dataset, split or data_lib.splits(dataset)["test"], data_dir=data_dir)
    logits = Classifier(models.create(architecture), variables).predict(x)
    return float(np.mean(logits.argmax(-1) == y))


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
    path = root() / name
    path.mkdir(parents=True, exist_ok=True)
    target = (path / "variables").absolute()
    variables = jax.tree.map(np.asarray, jax.device_get(variables))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, variables, force=True)
    write_checksums(path)
    cfg = config.to_json()
    hyper = {k: v for k, v in cfg.items() if k not in ("architecture", "dataset", "seed", "epochs")}
    if hyper.get("conv_impl") == "auto":  # what it chose here, for training (the export runs on the training host)
        hyper["conv_impl_resolved"] = models.resolve_conv_impl("auto", "train")
    n_params = int(sum(np.size(p) for p in jax.tree.leaves(variables["params"])))
    card = {
        "name": name,
        "architecture": cfg["architecture"],
        "dataset": cfg["dataset"],
        "num_params": n_params,
        "hyperparameters": hyper,
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
