"""Training: a pure, jitted train step with a pluggable loss and input perturbation, and a resumable loop.

- :class:`TrainState` holds params, batch stats, optimizer state, step and the base PRNG key. Per-step randomness
  is ``fold_in(rng, step)``, and the data order of each epoch is a permutation fixed by ``(seed, epoch)``, so a run
  killed and resumed from a checkpoint yields bit-identical parameters to an uninterrupted one.
- ``loss_fn(outputs, labels, key) -> per-example loss`` plugs in cross-entropy, heteroscedastic or other losses.
- ``perturb_fn(logits_fn, x, y, key) -> x'`` plugs in adversarial training (PGD/FGSM) or transformation
  augmentation without copying the step. It sees the model in eval mode through ``logits_fn``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from robust_jax import data as data_lib
from robust_jax import sharding
from robust_jax.models import logits_of


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


# ---------------------------------------------------------------------------------------------------- augmentation
def flip_crop(key, x, pad: int = 4):
    """Random horizontal flip and random crop after zero-padding by `pad` (per example). x: float NHWC."""
    n, h, w, _ = x.shape
    k_flip, k_y, k_x = jax.random.split(key, 3)
    flip = jax.random.bernoulli(k_flip, 0.5, (n,))
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oy = jax.random.randint(k_y, (n,), 0, 2 * pad + 1)
    ox = jax.random.randint(k_x, (n,), 0, 2 * pad + 1)
    crop = lambda img, a, b: jax.lax.dynamic_slice(img, (a, b, 0), (h, w, img.shape[-1]))  # noqa: E731
    return jax.vmap(crop)(xp, oy, ox)


def random_rotation(key, x, max_degrees: float = 30.0):
    """Rotate each image by an angle drawn uniformly from [-max_degrees, max_degrees] (zero fill)."""
    from robust_jax import transforms

    return transforms.rotate(x, jax.random.uniform(key, (x.shape[0],), minval=-max_degrees, maxval=max_degrees))


AUGMENTATIONS: dict[str, Callable | None] = {"none": None, "flip_crop": flip_crop, "rotate": random_rotation}


def make_augment(names: str, *, rotation_degrees: float = 30.0) -> Callable | None:
    """Compose augmentations named in a ``+``-separated string, e.g. ``"flip_crop+rotate"`` (applied in order)."""
    fns = []
    for name in [n for n in names.split("+") if n and n != "none"]:
        if name not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {name!r}; use {', '.join(AUGMENTATIONS)} joined by '+'")
        fn = AUGMENTATIONS[name]
        if name == "rotate":
            fn = lambda k, x, fn=fn: fn(k, x, rotation_degrees)
        fns.append(fn)
    if not fns:
        return None

    def augment(key, x):
        for i, fn in enumerate(fns):
            x = fn(jax.random.fold_in(key, i), x)
        return x

    return augment


def make_adversary(kind: str, *, eps: float, steps: int = 7, step_size: float | None = None) -> Callable | None:
    """A ``perturb_fn`` for adversarial training (Linf, cross-entropy, random start).

    ``"pgd"``: Madry et al. 2018, `steps` steps of size `step_size` (default 2.5·eps/steps).
    ``"fgsm_rs"``: Wong et al. 2020 "fast is better than free": one step of size `step_size` (default 1.25·eps)
    from a uniform random start, projected to the eps ball — about 2× the cost of a standard step on this CPU.
    """
    from robust_jax import attacks

    if kind in ("none", "", None):
        return None
    if kind == "pgd":
        size = step_size or 2.5 * eps / steps
        return lambda f, x, y, k: attacks.pgd(f, x, y, key=k, eps=eps, step_size=size, steps=steps)
    if kind == "fgsm_rs":
        size = step_size or 1.25 * eps
        return lambda f, x, y, k: attacks.pgd(f, x, y, key=k, eps=eps, step_size=size, steps=1)
    raise ValueError(f"unknown adversary {kind!r}; use none, pgd or fgsm_rs")


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
        raise ValueError(f"unknown schedule {schedule!r}; use onecycle, cosine or constant")
    kernels_only = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731 - no decay on BN/bias
    if name == "sgd":
        parts = [optax.add_decayed_weights(weight_decay, mask=kernels_only)] if weight_decay else []
        return optax.chain(*parts, optax.sgd(sched, momentum=momentum, nesterov=True))
    if name == "adam":
        return optax.adamw(sched, weight_decay=weight_decay, mask=kernels_only)
    raise ValueError(f"unknown optimizer {name!r}; use sgd or adam")


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


def make_predict(model: nn.Module, **apply_kwargs):
    """A jitted ``predict(variables, images) -> logits`` (eval mode). Variables are traced: no recompiles."""

    @jax.jit
    def predict(variables, images):
        x = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images
        return logits_of(model.apply(variables, x, **apply_kwargs))

    return predict


def predict_logits(predict, variables, images, batch_size: int = 500) -> np.ndarray:
    """Logits for all `images`, in fixed-size (padded) batches split over all devices."""
    return sharding.run_sharded(lambda x: predict(variables, x), images, batch_size=batch_size)


def evaluate(predict, variables, images, labels, batch_size: int = 500) -> dict[str, float]:
    logits = predict_logits(predict, variables, images, batch_size)
    loss = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(labels))
    return {"accuracy": float(np.mean(logits.argmax(-1) == labels)), "loss": float(loss.mean())}


# ------------------------------------------------------------------------------------------------------ the loop
@dataclasses.dataclass
class TrainConfig:
    dataset: str = "mnist"
    architecture: dict = dataclasses.field(default_factory=lambda: {"name": "BasicCNN"})
    epochs: int = 3
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    schedule: str = "onecycle"
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    augment: str = "none"  # "+"-separated: none | flip_crop | rotate
    rotation_degrees: float = 30.0  # range of the "rotate" augmentation
    adversary: str = "none"  # none | pgd | fgsm_rs (adversarial training, Linf)
    adv_eps: float = 8 / 255
    adv_steps: int = 7
    adv_step_size: float | None = None
    loss: str = "ce"  # "ce" | "hetero" (heteroscedastic head, Kendall & Gal sampled-softmax loss)
    hetero_samples: int = 16
    seed: int = 0
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 2
    max_train_examples: int | None = None  # for tests and quick runs
    max_eval_examples: int | None = None
    # convolution kernels for training (robust_jax.conv.IMPLS): a hyper-parameter, not part of the architecture, so
    # checkpoints trained with an opt-in kernel (e.g. "onednn_bf16") load with the default everywhere
    conv_impl: str = "custom_vjp"

    def __post_init__(self):
        if "conv_impl" in self.architecture:  # it would be overridden by the field below, silently
            raise ValueError("set conv_impl as TrainConfig(conv_impl=...), not inside architecture")

    def to_json(self):
        return dataclasses.asdict(self)


def config_loss(config: TrainConfig) -> Callable:
    if config.loss == "ce":
        return lambda o, y, k: cross_entropy(o, y, k, label_smoothing=config.label_smoothing)
    if config.loss == "hetero":
        from robust_jax import uncertainty

        return lambda o, y, k: uncertainty.hetero_loss(o, y, k, num_samples=config.hetero_samples)
    raise ValueError(f"unknown loss {config.loss!r}; use ce or hetero")


def _checkpoint_manager(workdir: Path, keep: int):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
    )


def _restore(manager, state: TrainState) -> TrainState:
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))


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
    log: Callable[[str], None] = print,
) -> dict:
    """Train (or resume) a classifier; returns the final metrics. Writes to `workdir`:
    ``config.json``, ``metrics.jsonl`` (one JSON line per epoch), ``checkpoints/`` (orbax), ``final.json``.

    `stop_after_steps` ends the run early at that global step (after checkpointing) — used to test resumption.
    `train_data` / `val_data` replace the dataset's splits with given (images uint8, labels) arrays.
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    from robust_jax import models

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config.to_json(), indent=2))
    info = data_lib.info(config.dataset)
    sp = data_lib.splits(config.dataset)
    x_train, y_train = train_data or data_lib.load(config.dataset, sp["train"], data_dir=data_dir)
    x_val, y_val = val_data or data_lib.load(config.dataset, sp["val"], data_dir=data_dir)
    if config.max_train_examples:
        x_train, y_train = x_train[: config.max_train_examples], y_train[: config.max_train_examples]
    if config.max_eval_examples:
        x_val, y_val = x_val[: config.max_eval_examples], y_val[: config.max_eval_examples]

    model = models.create({**config.architecture, "conv_impl": config.conv_impl})
    steps_per_epoch = data_lib.num_batches(len(x_train), config.batch_size, drop_remainder=True)
    total_steps = steps_per_epoch * config.epochs
    tx = make_optimizer(config.optimizer, config.lr, total_steps=total_steps, schedule=config.schedule,
                        weight_decay=config.weight_decay)
    state = create_train_state(model, tx, jax.random.PRNGKey(config.seed), info.image_shape)
    if loss_fn is None:
        loss_fn = config_loss(config)
    if perturb_fn is None:
        perturb_fn = make_adversary(config.adversary, eps=config.adv_eps, steps=config.adv_steps,
                                    step_size=config.adv_step_size)
    augment_fn = make_augment(config.augment, rotation_degrees=config.rotation_degrees)
    train_step = make_train_step(model, tx, loss_fn=loss_fn, augment_fn=augment_fn, perturb_fn=perturb_fn)
    predict = make_predict(model)

    manager = _checkpoint_manager(workdir, config.keep_checkpoints)
    if manager.latest_step() is not None:
        state = _restore(manager, state)
        log(f"resumed from step {int(state.step)} in {workdir}")
    state = sharding.replicate(state)
    step = int(state.step)
    n_dev = sharding.num_devices()
    if config.batch_size % n_dev:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {n_dev} devices")

    metrics_path = workdir / "metrics.jsonl"
    bar = tqdm(total=total_steps, initial=step, disable=not progress, desc=f"train {config.dataset}",
               unit="step", dynamic_ncols=True)
    stopped_early = False
    while step < total_steps:
        epoch, start_batch = divmod(step, steps_per_epoch)
        t0, n_seen, sums = time.time(), 0, {"loss": 0.0, "accuracy": 0.0}
        pending = []
        for xb, yb in data_lib.batches(x_train, y_train, config.batch_size, seed=config.seed, epoch=epoch,
                                       drop_remainder=True, start_batch=start_batch):
            state, m = train_step(state, *sharding.shard_batch((xb, yb)))
            pending.append(m)
            step += 1
            n_seen += len(xb)
            if len(pending) >= 20 or step % steps_per_epoch == 0:
                for pm in jax.device_get(pending):
                    sums = {k: sums[k] + float(pm[k]) for k in sums}
                bar.update(len(pending))
                bar.set_postfix(loss=f"{float(pending[-1]['loss']):.3f}", epoch=epoch + 1)
                pending = []
            if step % config.checkpoint_every_steps == 0 or step % steps_per_epoch == 0 or step == stop_after_steps:
                manager.save(step, args=ocp.args.StandardSave(jax.device_get(state)))
            if stop_after_steps is not None and step >= stop_after_steps:
                stopped_early = True
                break
        if stopped_early:
            break
        elapsed = time.time() - t0
        n_batches = steps_per_epoch - start_batch
        val = evaluate(predict, state.variables, x_val, y_val)
        record = {"epoch": epoch + 1, "step": step, "train_loss": sums["loss"] / n_batches,
                  "train_accuracy": sums["accuracy"] / n_batches, "val_loss": val["loss"],
                  "val_accuracy": val["accuracy"], "images_per_s": n_seen / elapsed, "seconds": elapsed}
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log(json.dumps(record))
    bar.close()
    manager.wait_until_finished()
    result = {"step": step, "stopped_early": stopped_early, "state": state}
    if not stopped_early:
        result["val"] = evaluate(predict, state.variables, x_val, y_val)
    return result


def train_seconds(workdir: str | Path) -> float:
    """Total measured training seconds over all epochs recorded in `workdir/metrics.jsonl`."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return 0.0
    return sum(json.loads(line)["seconds"] for line in path.read_text().splitlines() if line.strip())
