"""Training: a pure, jitted train step with a pluggable loss and input perturbation, and a resumable loop.

- :class:`TrainState` holds params, batch stats, optimizer state, step and the base PRNG key. Per-step randomness
  is ``fold_in(rng, step)``, and the data order of each epoch is a permutation fixed by ``(seed, epoch)``, so a run
  killed and resumed from a checkpoint yields bit-identical parameters to an uninterrupted one.
- ``loss_fn(outputs, labels, key) -> per-example loss`` plugs in cross-entropy, heteroscedastic or other losses.
- ``perturb_fn(logits_fn, x, y, key) -> x'`` plugs in adversarial training (PGD/FGSM) or transformation
  augmentation without copying the step. It sees the model in eval mode through ``logits_fn``.
- Deep ensembles train all members at once: the single-model step vmapped over members
  (:func:`make_ensemble_train_step`, :func:`create_ensemble_states`).

The loop (:func:`train`) is preemption-safe. A checkpoint holds the train state *and* the running totals of the
current epoch (loss and accuracy sums, batches, images, seconds), so a resumed run writes the same ``metrics.jsonl``
as an uninterrupted one (up to the timing fields) and its ``seconds`` include the time before the interruption.
Checkpoints are saved every :func:`checkpoint_interval` steps (by default a quarter epoch), at every epoch end and
when SIGINT or SIGTERM arrives (the run then saves at its current step and returns; a second signal aborts at
once). Saves are atomic (orbax writes a temporary folder and renames it); a save cut short by SIGKILL leaves the
previous checkpoint in place and is ignored, and removed, on resume. ``config.json`` is written once, for a fresh
workdir; resuming with a config differing in any field but :data:`RESUMABLE_CHANGES` is refused before anything
is loaded (:class:`ConfigMismatchError`, with the differing fields).

Augmentations (``flip_crop``, ``rotate``) live in :mod:`robust_jax.transforms`; batched prediction over a dataset
is :func:`robust_jax.sharding.run_sharded`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import threading
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from tqdm.auto import tqdm

from robust_jax import attacks, models, sharding, transforms, uncertainty
from robust_jax import data as data_lib
from robust_jax.models import logits_of

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant")
ADVERSARIES = ("none", "pgd", "fgsm_rs")
LOSSES = ("ce", "hetero")


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    @property
    def variables(self):
        v = {"params": self.params}
        if self.batch_stats:
            v["batch_stats"] = self.batch_stats
        return v


def init_variables(model: nn.Module, key, input_shape):
    """Model variables for inputs of shape (1, *input_shape)."""
    return model.init({"params": key, "dropout": key}, jnp.zeros((1, *input_shape), jnp.float32))


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key, input_shape) -> TrainState:
    init_key, rng = jax.random.split(key)
    variables = init_variables(model, init_key, input_shape)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=rng,
    )


# ---------------------------------------------------------------------------------------------------------- losses
def cross_entropy(outputs, labels, key=None, *, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy on logits (mean logits for a heteroscedastic head)."""
    logits = logits_of(outputs)
    onehot = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    return optax.softmax_cross_entropy(logits, onehot)


# ------------------------------------------------------------------------------------------- perturbations
def make_adversary(kind: str, *, eps: float, steps: int = 7, step_size: float | None = None) -> Callable | None:
    """A ``perturb_fn`` for adversarial training (Linf, cross-entropy, random start).

    ``"pgd"``: Madry et al. 2018, `steps` steps of size `step_size` (default 2.5·eps/steps).
    ``"fgsm_rs"``: Wong et al. 2020 "fast is better than free": one step of size `step_size` (default 1.25·eps)
    from a uniform random start, projected to the eps ball — about 2× the cost of a standard step.
    """
    if kind in ("none", "", None):
        return None
    if kind == "pgd":
        size = step_size or 2.5 * eps / steps
        return lambda f, x, y, k: attacks.pgd(f, x, y, key=k, eps=eps, step_size=size, steps=steps)
    if kind == "fgsm_rs":
        size = step_size or 1.25 * eps
        return lambda f, x, y, k: attacks.pgd(f, x, y, key=k, eps=eps, step_size=size, steps=1)
    raise ValueError(f"unknown adversary {kind!r}; use {', '.join(ADVERSARIES)}")


# ----------------------------------------------------------------------------------------------------- optimizers
def make_optimizer(
    name: str, lr: float, *, total_steps: int, schedule: str = "onecycle", weight_decay: float = 0.0,
    warmup_frac: float = 0.15, momentum: float = 0.9,
) -> optax.GradientTransformation:
    if schedule == "onecycle":
        sched = optax.cosine_onecycle_schedule(total_steps, lr, pct_start=warmup_frac, div_factor=25.0,
                                               final_div_factor=1e3)
    elif schedule == "cosine":
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, int(warmup_frac * total_steps)), total_steps)
    elif schedule == "constant":
        sched = optax.constant_schedule(lr)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use {', '.join(SCHEDULES)}")
    kernels_only = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731 - no decay on BN/bias
    if name == "sgd":
        parts = [optax.add_decayed_weights(weight_decay, mask=kernels_only)] if weight_decay else []
        return optax.chain(*parts, optax.sgd(sched, momentum=momentum, nesterov=True))
    if name == "adam":
        return optax.adamw(sched, weight_decay=weight_decay, mask=kernels_only)
    raise ValueError(f"unknown optimizer {name!r}; use {', '.join(OPTIMIZERS)}")


# ------------------------------------------------------------------------------------------------------- the steps
def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    loss_fn: Callable = cross_entropy,
    augment_fn: Callable | None = None,
    perturb_fn: Callable | None = None,
    donate: bool = True,
    jit: bool = True,
):
    """A jitted ``train_step(state, images, labels) -> (state, metrics)``; images uint8 or float in [0, 1].

    ``jit=False`` returns the pure step unjitted (e.g. to ``vmap`` it over ensemble members)."""

    def train_step(state: TrainState, images, labels):
        key = jax.random.fold_in(state.rng, state.step)
        k_aug, k_pert, k_drop, k_loss = jax.random.split(key, 4)
        x = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images
        if augment_fn is not None:
            x = augment_fn(k_aug, x)
        if perturb_fn is not None:
            eval_vars = state.variables
            x = jax.lax.stop_gradient(
                perturb_fn(lambda z: logits_of(model.apply(eval_vars, z)), x, labels, k_pert))

        def objective(params):
            variables = {"params": params}
            if state.batch_stats:
                variables["batch_stats"] = state.batch_stats
            outputs, new_vars = model.apply(variables, x, train=True, rngs={"dropout": k_drop},
                                            mutable=["batch_stats"] if state.batch_stats else [])
            per_example = loss_fn(outputs, labels, k_loss)
            return per_example.mean(), (outputs, new_vars)

        (loss, (outputs, new_vars)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        acc = jnp.mean(jnp.argmax(logits_of(outputs), -1) == labels)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  batch_stats=new_vars.get("batch_stats", state.batch_stats))
        return new_state, {"loss": loss, "accuracy": acc}

    if not jit:
        return train_step
    return jax.jit(train_step, donate_argnums=(0,) if donate else ())


def make_ensemble_train_step(model: nn.Module, tx: optax.GradientTransformation, **train_step_kwargs):
    """A jitted step training all members of a deep ensemble at once: ``step(stacked_states, images, labels)``.

    :func:`make_train_step` vmapped over members (each has its own params, optimizer state and PRNG key, stacked
    on a leading axis by :func:`create_ensemble_states`); every member sees the same batch.
    """
    single = make_train_step(model, tx, jit=False, **train_step_kwargs)
    return jax.jit(jax.vmap(single, in_axes=(0, None, None)), donate_argnums=(0,))


def create_ensemble_states(model: nn.Module, tx: optax.GradientTransformation, keys, input_shape) -> TrainState:
    """One :class:`TrainState` per key, stacked on a leading member axis (:func:`robust_jax.uncertainty.stack`)."""
    return uncertainty.stack([create_train_state(model, tx, k, input_shape) for k in keys])


def make_predict(model: nn.Module, **apply_kwargs):
    """A jitted ``predict(variables, images) -> logits`` (eval mode). Variables are traced: no recompiles."""

    @jax.jit
    def predict(variables, images):
        x = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images
        return logits_of(model.apply(variables, x, **apply_kwargs))

    return predict


def evaluate(predict, variables, images, labels, batch_size: int = 500) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``predict(variables, images)`` (:func:`make_predict`) over a dataset, in
    fixed-size padded batches split over all devices (:func:`robust_jax.sharding.run_sharded`)."""
    logits = sharding.run_sharded(functools.partial(predict, variables), images, batch_size=batch_size)
    loss = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(labels))
    return {"accuracy": float(np.mean(logits.argmax(-1) == labels)), "loss": float(loss.mean())}


# ------------------------------------------------------------------------------------------------------ the config
class ConfigError(ValueError):
    """An invalid :class:`TrainConfig` field: ``.field`` names it, ``.choices`` lists its valid values (if any)."""

    def __init__(self, field: str, detail: str, choices: tuple | None = None):
        self.field, self.detail, self.choices = field, detail, choices
        super().__init__(f"{field}: {detail}")


def _option(default=dataclasses.MISSING, help: str = "", *, factory=None, choices: tuple | None = None,
            separator: str | None = None, ge: float | None = None, gt: float | None = None, lt: float | None = None,
            cli: bool = True):
    """A :class:`TrainConfig` field with the metadata its validation and the command line's flags are built from:
    ``help``; ``choices`` (each ``separator``-separated part of the value must be one); bounds ``ge``/``gt``/``lt``;
    ``cli=False`` for fields the command line sets through other flags (architecture, loss)."""
    metadata = {"help": help, "choices": choices, "separator": separator, "ge": ge, "gt": gt, "lt": lt, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    """Everything that determines a training run's result. The fields' metadata (help, choices, bounds) is the one
    source of ``experiments.train``'s flags and of :meth:`validate`."""

    dataset: str = _option("mnist", "dataset to train on", choices=tuple(data_lib.DATASETS))
    architecture: dict = _option(help="model config for robust_jax.models.create, e.g. {'name': 'ResNet10', "
                                      "'width': 16}", factory=lambda: {"name": "BasicCNN"}, cli=False)
    epochs: int = _option(3, "training epochs", ge=1)
    batch_size: int = _option(128, "batch size (a multiple of the number of devices)", ge=1)
    optimizer: str = _option("adam", "optimizer", choices=OPTIMIZERS)
    lr: float = _option(1e-3, "peak learning rate", gt=0)
    schedule: str = _option("onecycle", "learning-rate schedule", choices=SCHEDULES)
    weight_decay: float = _option(0.0, "weight decay (kernels only)", ge=0)
    label_smoothing: float = _option(0.0, "label smoothing", ge=0, lt=1)
    augment: str = _option("none", "training augmentations, '+'-separated (e.g. flip_crop+rotate)",
                           choices=tuple(transforms.AUGMENTATIONS), separator="+")
    rotation_degrees: float = _option(30.0, "rotate augmentation: angles uniform in +-this", ge=0)
    adversary: str = _option("none", "adversarial training (Linf)", choices=ADVERSARIES)
    adv_eps: float = _option(8 / 255, "adversarial training eps (pixels in [0, 1])", ge=0)
    adv_steps: int = _option(7, "attack steps for --adversary=pgd", ge=1)
    adv_step_size: float | None = _option(None, "attack step size (default 2.5*eps/steps for pgd, 1.25*eps for "
                                                "fgsm_rs)", gt=0)
    loss: str = _option("ce", "training loss: cross-entropy, or the heteroscedastic head's sampled-softmax loss "
                              "(Kendall & Gal)", choices=LOSSES, cli=False)
    hetero_samples: int = _option(16, "noise samples per example in the heteroscedastic loss", ge=1)
    seed: int = _option(0, "seed of the initialisation, the per-step randomness and each epoch's data order")
    checkpoint_every_steps: int | None = _option(
        None, "checkpoint period in steps (default: a quarter epoch, at most 500); checkpoints are also saved at "
              "every epoch end and on SIGINT/SIGTERM", ge=1)
    keep_checkpoints: int = _option(2, "checkpoints kept in the workdir", ge=1)
    max_train_examples: int | None = _option(None, "train on the first N training examples only (quick runs)", ge=1)
    max_eval_examples: int | None = _option(None, "validate on the first N validation examples only", ge=1)
    # a hyper-parameter, not part of the architecture, so checkpoints trained with an opt-in kernel (e.g.
    # "onednn_bf16") load with the default everywhere
    conv_impl: str = _option("custom_vjp", "convolution kernels for training (oneDNN ones are opt-in, CPU only; "
                                           "auto: bf16 oneDNN where the CPU has fast bf16 units, see "
                                           "models.choose_conv_impl); evaluation uses the default",
                             choices=models.CONV_IMPLS)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field (type, choice or bound) and its valid values."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, md = getattr(self, f.name), f.metadata
            base, optional = _base_type(hints[f.name])
            if value is None:
                if optional:
                    continue
                raise ConfigError(f.name, "must be set")
            if base in (int, float):
                ok = isinstance(value, (int, float) if base is float else int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, base)
            if not ok:
                raise ConfigError(f.name, f"expected {base.__name__}, got {value!r}")
            if md.get("choices"):
                parts = value.split(md["separator"]) if md.get("separator") else [value]
                bad = [p for p in parts if p not in md["choices"]]
                if bad:
                    raise ConfigError(f.name, f"unknown {f.name} {bad[0]!r}; choose from {', '.join(md['choices'])}"
                                      + (f" (joined by {md['separator']!r})" if md.get("separator") else ""),
                                      md["choices"])
            for key, ok, words in (("ge", lambda v, b: v >= b, "at least"), ("gt", lambda v, b: v > b, "above"),
                                   ("lt", lambda v, b: v < b, "below")):
                if md.get(key) is not None and not ok(value, md[key]):
                    raise ConfigError(f.name, f"must be {words} {md[key]}, got {value!r}")
        if "conv_impl" in self.architecture:  # it would be overridden by the field, silently
            raise ConfigError("architecture", "set conv_impl as TrainConfig(conv_impl=...), not inside architecture")
        try:
            models.create({**self.architecture, "conv_impl": self.conv_impl})
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError("architecture", f"{self.architecture!r} does not build a model: {e}") from None

    def to_json(self):
        return dataclasses.asdict(self)


def _base_type(hint) -> tuple[type, bool]:
    """``int | None`` -> ``(int, True)``; ``float`` -> ``(float, False)``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return typing.get_origin(args[0]) or args[0], len(args) < len(typing.get_args(hint))
    return typing.get_origin(hint) or hint, False


def config_loss(config: TrainConfig) -> Callable:
    if config.loss == "ce":
        return lambda o, y, k: cross_entropy(o, y, k, label_smoothing=config.label_smoothing)
    if config.loss == "hetero":
        return lambda o, y, k: uncertainty.hetero_loss(o, y, k, num_samples=config.hetero_samples)
    raise ValueError(f"unknown loss {config.loss!r}; use {', '.join(LOSSES)}")


# Fields that may differ between the runs of one workdir: they change how often and how many checkpoints are
# written, never the trained parameters or the metrics.
RESUMABLE_CHANGES = ("checkpoint_every_steps", "keep_checkpoints")


class ConfigMismatchError(ValueError):
    """A workdir holds a run whose recorded ``config.json`` differs from the requested config."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_diff(recorded: dict, config: TrainConfig) -> list[tuple[str, Any, Any]]:
    """``(field, recorded value, requested value)`` for every field where `config` differs from a recorded
    ``config.json``, architecture keys as ``"architecture.width"``. A field added to :class:`TrainConfig` after the
    recording counts as its default; a missing value is ``"<absent>"``."""
    as_json = lambda c: _flatten(json.loads(json.dumps(c)))
    old = as_json({**dataclasses.asdict(TrainConfig()), **recorded})
    new = as_json(config.to_json())
    absent = "<absent>"
    return [(k, old.get(k, absent), new.get(k, absent)) for k in sorted(old.keys() | new.keys())
            if old.get(k, absent) != new.get(k, absent)]


def _check_workdir(workdir: Path, config: TrainConfig, log) -> None:
    """Refuse a workdir recorded for another config (or holding checkpoints without a config.json)."""
    path = workdir / "config.json"
    if not path.exists():
        if _step_dirs(workdir / "checkpoints"):
            raise ConfigMismatchError(f"{workdir / 'checkpoints'} holds checkpoints but {path} is missing, so the "
                                      f"run's config cannot be checked; refusing to resume it. Use another workdir.")
        return
    try:
        recorded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigMismatchError(f"cannot read {path} ({e}); refusing to resume {workdir}") from None
    diff = config_diff(recorded, config)
    blocking = [d for d in diff if d[0] not in RESUMABLE_CHANGES]
    if blocking:
        lines = "\n".join(f"  {k}: {json.dumps(old)} in config.json, {json.dumps(new)} requested"
                          for k, old, new in blocking)
        raise ConfigMismatchError(
            f"refusing to resume {workdir}: its run was recorded with another config ({path}, left unchanged):\n"
            f"{lines}\nRerun with the recorded values to resume it, or use another workdir for a new run.")
    for k, old, new in diff:
        log(f"note: {k} is {json.dumps(new)} in this run ({json.dumps(old)} in config.json): it changes the "
            f"checkpointing only, not the results")


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_interval(every: int | None, steps_per_epoch: int) -> int:
    """Steps between periodic checkpoints: `every`, or by default a quarter epoch (at most 500 steps), so an epoch
    is checkpointed well before it ends. Checkpoints are also saved at every epoch end and when a run stops."""
    return every or min(500, max(1, -(-steps_per_epoch // 4)))


@dataclasses.dataclass
class EpochTotals:
    """Running totals of the current epoch, checkpointed with the train state: what its metrics line is built from."""

    batches: int = 0
    images: int = 0
    loss_sum: float = 0.0
    accuracy_sum: float = 0.0
    seconds: float = 0.0  # wall-clock seconds of the epoch's steps and periodic saves (not validation)


_UNFINISHED = ocp.path.step.TMP_DIR_SUFFIX  # orbax saves into "<step><this>-<timestamp>/", then renames it


def _step_dirs(ckdir: Path) -> list[int]:
    if not ckdir.is_dir():
        return []
    return sorted(int(p.name) for p in ckdir.iterdir() if p.is_dir() and p.name.isdigit())


def _reader(ckdir: Path):
    """A manager for reading only (it never saves, so it deletes nothing); orbax's read_only=True logs warnings."""
    return ocp.CheckpointManager(ckdir, options=ocp.CheckpointManagerOptions(create=False,
                                                                             enable_async_checkpointing=False))


def _restore_latest(ckdir: Path, template: TrainState, log) -> tuple[TrainState, EpochTotals | None] | None:
    """The newest readable checkpoint in `ckdir` as (state, totals); totals is None for a checkpoint written before
    totals were checkpointed. None if there is none. Unfinished saves are reported (the writer removes them)."""
    if not ckdir.is_dir():
        return None
    unfinished = sorted(p.name for p in ckdir.iterdir() if _UNFINISHED in p.name)
    if unfinished:
        log(f"ignoring {len(unfinished)} unfinished checkpoint save(s) in {ckdir}, cut short by an interrupted run: "
            f"{', '.join(unfinished)}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    errors = []
    with _reader(ckdir) as reader:
        steps = sorted(reader.all_steps(), reverse=True)
    for step in steps:
        try:
            with _reader(ckdir) as reader:  # a fresh manager per attempt: it fixes its item layout on first use
                if (ckdir / str(step) / "default").is_dir():  # single-item layout of earlier versions
                    return reader.restore(step, args=ocp.args.StandardRestore(abstract)), None
                r = reader.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 progress=ocp.args.JsonRestore()))
            progress = dict(r.progress)
            if progress.pop("step") != int(r.state.step) or int(r.state.step) != step:
                raise ValueError(f"step {step} holds state of step {int(r.state.step)}")
            return r.state, EpochTotals(**progress)
        except Exception as e:  # a damaged checkpoint: fall back to an older one, saying so
            errors.append(e)
            log(f"checkpoint at step {step} in {ckdir} is unreadable ({type(e).__name__}: {str(e)[:300]}); "
                f"trying an older one")
    if errors:
        raise RuntimeError(f"no readable checkpoint in {ckdir} (steps {steps})") from errors[0]
    return None


class _StopOnSignals:
    """Within the block, the first SIGINT or SIGTERM is recorded in ``.signal`` (the loop checkpoints and returns);
    a second one restores the previous handlers and raises KeyboardInterrupt. Only in the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signal: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signal is not None:
            self._restore()
            abort = KeyboardInterrupt(f"second signal ({signal.Signals(signum).name})")
            abort.signum = signum
            raise abort
        self.signal = signal.Signals(signum).name

    def _restore(self):
        for s, h in self._previous.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)
        self._previous = {}

    def __enter__(self):
        if self.enabled:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        self._restore()


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` all or nothing (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_metrics(path: Path, up_to_step: int, log) -> list[dict]:
    """The lines of metrics.jsonl up to `up_to_step`; lines past it (left by a run whose later checkpoints are gone)
    are dropped from the file."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    kept = [r for r in records if r["step"] <= up_to_step]
    if len(kept) < len(records):
        log(f"dropping {len(records) - len(kept)} line(s) of {path} past step {up_to_step}, the checkpoint resumed")
        _write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _split(config: TrainConfig, which: str, limit: int | None, given, data_dir):
    """The (images, labels) of split `which` ("train" / "val"), its first `limit` examples only if set."""
    if given is not None:
        x, y = given
        return (x[:limit], y[:limit]) if limit else (x, y)
    split = data_lib.splits(config.dataset)[which]
    if limit:
        split = data_lib.head(config.dataset, split, limit)  # load what is used, not the whole split
    return data_lib.load(config.dataset, split, data_dir=data_dir)


def _epoch_line(r: dict, epochs: int) -> str:
    return (f"epoch {r['epoch']}/{epochs} (step {r['step']}): train loss {r['train_loss']:.4f} "
            f"acc {r['train_accuracy']:.4f} | val loss {r['val_loss']:.4f} acc {r['val_accuracy']:.4f} | "
            f"{r['seconds']:.1f} s, {r['images_per_s']:.0f} img/s")


# ------------------------------------------------------------------------------------------------------ the loop
def train(
    config: TrainConfig,
    workdir: str | Path,
    *,
    data_dir: str | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
    loss_fn: Callable | None = None,
    perturb_fn: Callable | None = None,
    train_data: tuple[np.ndarray, np.ndarray] | None = None,
    val_data: tuple[np.ndarray, np.ndarray] | None = None,
    log: Callable[[str], None] | None = None,
    handle_signals: bool = True,
    resume_hint: str = "call train() again with the same config and workdir to resume",
) -> dict:
    """Train (or resume) a classifier. Writes to `workdir`: ``config.json`` (once, for a fresh workdir),
    ``metrics.jsonl`` (one JSON line per epoch), ``checkpoints/`` (orbax: train state and epoch totals).

    Returns ``{"step", "stopped_early", "interrupted", "state", "train_seconds", "conv_impl"}`` (the kernels the train
    step used: ``config.conv_impl``, or what ``"auto"`` chose for ``use="train"``) and, unless interrupted, ``"val"``
    (accuracy and loss). ``interrupted`` is the name of the signal that arrived ("SIGINT" / "SIGTERM"; one arriving
    during the last step or the last validation lets the run finish its last epoch first), or "stop_after_steps"
    when that stopped the run, else None; ``stopped_early`` is whether it is set.

    - `stop_after_steps` ends the run at that global step (after checkpointing), as a signal would.
    - `handle_signals`: in the main thread, SIGINT / SIGTERM during the loop checkpoint the current step and return
      (the line logged says where, then `resume_hint`); a second signal raises KeyboardInterrupt.
    - `train_data` / `val_data` replace the dataset's splits with given (images uint8, labels) arrays.
    - `log` (default ``tqdm.write``, which keeps lines clear of the progress bar) gets one line per epoch and the
      resume / stop messages.

    Raises :class:`ConfigError` for an invalid config and :class:`ConfigMismatchError` for a workdir recorded with
    another config, both before any data is loaded or any file written.
    """
    log = log or tqdm.write
    config.validate()
    workdir = Path(workdir)
    ckdir = (workdir / "checkpoints").absolute()
    _check_workdir(workdir, config, log)
    n_dev = sharding.num_devices()
    if config.batch_size % n_dev:
        raise ConfigError("batch_size", f"{config.batch_size} is not a multiple of the {n_dev} devices")
    info = data_lib.info(config.dataset)
    x_train, y_train = _split(config, "train", config.max_train_examples, train_data, data_dir)
    x_val, y_val = _split(config, "val", config.max_eval_examples, val_data, data_dir)
    steps_per_epoch = data_lib.num_batches(len(x_train), config.batch_size, drop_remainder=True)
    if steps_per_epoch == 0:
        raise ConfigError("batch_size", f"{config.batch_size} exceeds the {len(x_train)} training examples")
    total_steps = steps_per_epoch * config.epochs
    interval = checkpoint_interval(config.checkpoint_every_steps, steps_per_epoch)
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "config.json").exists():
        _write_atomic(workdir / "config.json", json.dumps(config.to_json(), indent=2) + "\n")

    model = models.create({**config.architecture, "conv_impl": config.conv_impl}, use="train")
    # validation: "auto" resolves to the f32 eval kernels there, so reported accuracies do not depend on the host
    eval_model = models.create({**config.architecture, "conv_impl": config.conv_impl}, use="eval")
    if config.conv_impl == "auto":
        log(f"conv_impl=auto: training with {model.conv_impl!r}, validating with {eval_model.conv_impl!r}")
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if model.conv_impl.startswith("onednn") and load > cores and not os.environ.get("ROBUST_JAX_ONEDNN_THREADS"):
            log(f"note: load average {load:.1f} on {cores} cores: on a shared machine oneDNN's bf16 weight gradients "
                f"can be many times slower with a thread team per call; set ROBUST_JAX_ONEDNN_THREADS=1 there "
                f"(benchmarks/README.md)")
    tx = make_optimizer(config.optimizer, config.lr, total_steps=total_steps, schedule=config.schedule,
                        weight_decay=config.weight_decay)
    state = create_train_state(model, tx, jax.random.PRNGKey(config.seed), info.image_shape)
    if loss_fn is None:
        loss_fn = config_loss(config)
    if perturb_fn is None:
        perturb_fn = make_adversary(config.adversary, eps=config.adv_eps, steps=config.adv_steps,
                                    step_size=config.adv_step_size)
    augment_fn = transforms.make_augment(config.augment, rotation_degrees=config.rotation_degrees)
    train_step = make_train_step(model, tx, loss_fn=loss_fn, augment_fn=augment_fn, perturb_fn=perturb_fn)
    predict = make_predict(eval_model)

    restored = _restore_latest(ckdir, state, log)
    totals = EpochTotals()
    if restored is None:
        log(f"no checkpoint in {workdir}, starting fresh")
    else:
        state, saved_totals = restored
        step = int(state.step)
        log(f"resumed from step {step} in {workdir} ({step}/{total_steps} steps done)")
        if saved_totals is None:
            log("note: the checkpoint predates checkpointed epoch totals: this epoch's train_loss, train_accuracy "
                "and seconds cover only the steps from here on")
        elif saved_totals.batches != (step - 1) % steps_per_epoch + 1:
            log(f"warning: the checkpoint's epoch totals cover {saved_totals.batches} batches, not the "
                f"{(step - 1) % steps_per_epoch + 1} before step {step} (different training data?)")
        totals = saved_totals or totals
    state = sharding.replicate(state)
    step = int(state.step)
    last_saved = step if restored is not None else None
    metrics_path = workdir / "metrics.jsonl"
    records = _read_metrics(metrics_path, step, log)
    manager = ocp.CheckpointManager(ckdir, options=ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints, create=True, enable_async_checkpointing=False,
        cleanup_tmp_directories=True))

    def finish_epoch():
        """At an epoch end: its metrics line (unless already written, by the run that was interrupted after it)."""
        nonlocal totals
        epoch = step // steps_per_epoch
        if totals.batches and all(r["epoch"] != epoch for r in records):
            val = evaluate(predict, state.variables, x_val, y_val)
            record = {"epoch": epoch, "step": step, "train_loss": totals.loss_sum / totals.batches,
                      "train_accuracy": totals.accuracy_sum / totals.batches, "val_loss": val["loss"],
                      "val_accuracy": val["accuracy"], "images_per_s": totals.images / max(totals.seconds, 1e-9),
                      "seconds": totals.seconds}
            records.append(record)
            _write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in records))
            log(_epoch_line(record, config.epochs))
        totals = EpochTotals()

    bar = tqdm(total=total_steps, initial=step, disable=not progress, desc=f"train {config.dataset}",
               unit="step", dynamic_ncols=True)
    pending: list = []

    def flush():
        if not pending:
            return
        for m in jax.device_get(pending):
            totals.loss_sum += float(m["loss"])
            totals.accuracy_sum += float(m["accuracy"])
        bar.update(len(pending))
        bar.set_postfix(loss=f"{float(pending[-1]['loss']):.3f}", epoch=(step - 1) // steps_per_epoch + 1)
        pending.clear()

    def save(seconds: float):
        nonlocal last_saved
        flush()
        totals.seconds = seconds
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(jax.device_get(state)),
            progress=ocp.args.JsonSave({"step": step, **dataclasses.asdict(totals)})))
        last_saved = step

    stop_requested = lambda: stop.signal is not None or (stop_after_steps is not None and step >= stop_after_steps)
    try:
        with _StopOnSignals(handle_signals) as stop:
            if step and step % steps_per_epoch == 0:
                finish_epoch()  # the checkpoint ends an epoch whose line the interrupted run may not have written
            while step < total_steps and not stop_requested():
                epoch, start_batch = divmod(step, steps_per_epoch)
                t0, seconds_before = time.perf_counter(), totals.seconds
                for xb, yb in data_lib.batches(x_train, y_train, config.batch_size, seed=config.seed, epoch=epoch,
                                               drop_remainder=True, start_batch=start_batch):
                    state, m = train_step(state, *sharding.shard_batch((xb, yb)))
                    pending.append(m)
                    step += 1
                    totals.batches += 1
                    totals.images += len(xb)
                    halt = stop_requested() and step < total_steps  # after the last step: finish the epoch
                    if halt or step % steps_per_epoch == 0 or step % interval == 0:
                        save(seconds_before + time.perf_counter() - t0)
                    elif len(pending) >= 20:
                        flush()
                    if halt:
                        break
                else:
                    finish_epoch()
            if step != last_saved:  # nothing ran since (or the first checkpoint of) a run stopped before any step
                save(totals.seconds)
            interrupted = stop.signal or ("stop_after_steps" if stop_requested() and step < total_steps else None)
    finally:
        bar.close()
        manager.wait_until_finished()
        manager.close()
    result = {"step": step, "stopped_early": interrupted is not None, "interrupted": interrupted, "state": state,
              "train_seconds": sum(r["seconds"] for r in records) + totals.seconds, "conv_impl": model.conv_impl}
    if interrupted:
        log(f"stopped by {interrupted} at step {step}/{total_steps}: checkpoint saved in {ckdir}; {resume_hint}")
    elif records and records[-1]["step"] == step:
        result["val"] = {"accuracy": records[-1]["val_accuracy"], "loss": records[-1]["val_loss"]}
    else:
        result["val"] = evaluate(predict, state.variables, x_val, y_val)
    return result


def train_seconds(workdir: str | Path) -> float:
    """Total measured training seconds over all epochs recorded in `workdir/metrics.jsonl`."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return 0.0
    return sum(json.loads(line)["seconds"] for line in path.read_text().splitlines() if line.strip())
