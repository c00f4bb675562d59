"""Flax linen models, used through pure ``model.apply``.

Every model takes float32 pixels in [0, 1], NHWC, and normalises inside (``mean``/``std`` attributes), so attacks
work in pixel space. Call signature::

    model.apply(variables, x, train=False, mc_dropout=False, rngs={"dropout": key})

- ``train=True``: dropout on, BatchNorm uses batch statistics (pass ``mutable=["batch_stats"]``).
- ``mc_dropout=True``: dropout stays **on at inference** (needs ``rngs={"dropout": key}``) while BatchNorm keeps
  its running statistics. This is the MC-dropout mode; with ``dropout_rate=0`` it equals the deterministic model.
- ``hetero=True`` (attribute): a heteroscedastic head; the model returns ``(logit_mean, logit_log_variance)``
  instead of logits (Kendall & Gal 2017, see ``robust_jax.uncertainty``).
- ``conv_impl`` (attribute, one of :data:`CONV_IMPLS`): how every ``nn.Conv`` convolves. ``"custom_vjp"`` (default) is
  ``robust_jax.conv.conv_general_dilated``: the same forward convolution, with a backward pass made of ordinary
  channels-last convolutions, which XLA:CPU runs fast inside rolled loops (``lax.fori_loop`` / ``lax.scan``);
  ``"xla"`` is plain ``lax.conv_general_dilated`` (JAX's own transpose rules; needed for forward-mode autodiff,
  ``jax.jvp`` / ``jax.jacfwd``). ``"onednn"`` / ``"onednn_bf16"`` are opt-in oneDNN kernels on CPU (f32 /
  bf16 compute, f32 in and out; ``robust_jax.onednn``; they fall back to ``"custom_vjp"`` with a warning where
  oneDNN cannot run). ``"auto"`` picks one of these per host and per use (:func:`choose_conv_impl`): declare the
  use to :func:`create` (``create(config, use="attack")``, which means ``"auto"`` unless the config names a
  ``conv_impl``; the model then records the concrete choice), to ``checkpoints.load(..., use=...)`` /
  ``Classifier.for_use(...)``, or set ``TrainConfig(conv_impl="auto")``; a module built directly with
  ``conv_impl="auto"`` resolves it for ``use="eval"``. Parameters, their names and the outputs (up to bf16
  rounding) are the same for all. A callable with the signature of ``lax.conv_general_dilated`` is used as given
  (benchmarks of other kernels).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from robust_jax import conv as conv_lib
from robust_jax import onednn

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _normalise(x, mean, std):
    if x.ndim != 4:
        raise ValueError(f"expected NHWC images, got shape {x.shape}")
    if x.shape[-1] != len(mean):
        raise ValueError(f"expected {len(mean)} channel(s), got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):  # a trace-time check: it holds under jit too
        raise TypeError(f"expected floating-point pixels in [0, 1], got dtype {x.dtype} (convert integer images "
                        f"with x.astype(np.float32) / 255)")
    return (x.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


CONV_IMPLS = ("custom_vjp", "xla", "onednn", "onednn_bf16", "auto")
CONV_USES = ("eval", "attack", "train", "higher_order", "forward_mode")


def choose_conv_impl(use: str, *, backend: str, cpu_vendor: str = "", cpu_flags=(), onednn_available: bool = False,
                     device_count: int = 1) -> str:
    """What ``conv_impl="auto"`` means: a pure function of the use and the host's facts (no I/O; see
    :func:`host_conv_impl` for this host's).

    `use` (one of :data:`CONV_USES`):

    - ``"eval"``: ``"custom_vjp"`` everywhere. Forward passes whose numbers are reported (clean accuracy on a card,
      ECE / calibration, detector scores) stay on the f32 kernels they were measured with, so they do not move.
    - ``"attack"`` (input gradients) and ``"train"`` (parameter gradients, f32 master weights), first-order reverse
      mode: ``"onednn_bf16"`` on a CPU backend with oneDNN available and bf16 units that beat f32: AMX
      (``amx_bf16``) or AMD's ``avx512_bf16`` (Zen 4 / Zen 5), with any `device_count` (on several devices the FFI
      calls are partitioned over the batch-sharded mesh of :mod:`robust_jax.sharding`, see
      :mod:`robust_jax.onednn`). Otherwise ``"custom_vjp"``: GPU / TPU, CPUs without bf16 units, and Intel
      ``avx512_bf16`` without AMX (Cooper Lake; Emerald Rapids with AMX off, whose bf16 dot product runs below the
      f32 FMA rate, so bf16 training there was slower than XLA f32). Measurements per host:
      ``benchmarks/README.md`` and ``benchmarks/onednn/REPORT.md``. On a shared machine, train with
      ``ROBUST_JAX_ONEDNN_THREADS=1`` (:mod:`robust_jax.onednn`).
    - ``"higher_order"`` (``jax.grad`` of ``jax.grad``, e.g. gradient penalties): ``"custom_vjp"``, whose backward
      pass is differentiable again (oneDNN's is not).
    - ``"forward_mode"`` (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``): ``"xla"``, the only one with forward-mode AD.
    """
    if use not in CONV_USES:
        raise ValueError(f"unknown use {use!r}; use one of {CONV_USES}")
    if use == "forward_mode":
        return "xla"
    if use in ("eval", "higher_order"):
        return "custom_vjp"
    flags = set(cpu_flags)
    fast_bf16 = "amx_bf16" in flags or ("avx512_bf16" in flags and cpu_vendor == "AuthenticAMD")
    del device_count  # a fact of the host that no longer changes the choice (kept for callers passing it)
    if backend == "cpu" and onednn_available and fast_bf16:
        return "onednn_bf16"
    return "custom_vjp"


def host_conv_impl(use: str) -> str:
    """:func:`choose_conv_impl` with this host's facts: JAX's default backend and device count, the CPU vendor and
    flags (``/proc/cpuinfo``), and whether oneDNN builds and runs bf16 natively here (checked only when it would
    be chosen, since the first check builds the library)."""
    cpu = onednn.cpu_facts()
    facts = {"backend": jax.default_backend(), "device_count": jax.device_count(), "cpu_vendor": cpu["vendor"],
             "cpu_flags": cpu["flags"]}
    impl = choose_conv_impl(use, **facts, onednn_available=True)
    if impl.startswith("onednn") and not (onednn.available() and onednn.native_bf16()):
        impl = choose_conv_impl(use, **facts, onednn_available=False)
    return impl


def resolve_conv_impl(impl, use: str = "eval"):
    """The concrete ``conv_impl`` for `use`: ``"auto"`` -> :func:`host_conv_impl`; any other name of
    :data:`CONV_IMPLS` (or a callable) unchanged."""
    if use not in CONV_USES:
        raise ValueError(f"unknown use {use!r}; use one of {CONV_USES}")
    if impl == "auto":
        return host_conv_impl(use)
    if not callable(impl) and impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv_impl {impl!r}; use one of {CONV_IMPLS}")
    return impl


def resolve_conv(impl):
    """The ``conv_general_dilated`` function for a model's ``conv_impl``: ``"custom_vjp"`` (:mod:`robust_jax.conv`),
    ``"xla"`` (``lax.conv_general_dilated``), ``"onednn"`` / ``"onednn_bf16"`` (opt-in oneDNN kernels on CPU, f32 /
    bf16 compute with f32 in and out; they fall back to ``"custom_vjp"`` with a one-time warning where oneDNN cannot
    run, see :mod:`robust_jax.onednn`), ``"auto"`` (the choice for ``use="eval"``; :func:`create` resolves it for
    other uses), or a callable with the signature of ``lax.conv_general_dilated``."""
    if callable(impl):
        return impl
    if impl == "custom_vjp":
        return conv_lib.conv_general_dilated
    if impl == "xla":
        return lax.conv_general_dilated
    if impl in ("onednn", "onednn_bf16"):
        return onednn.make_conv_general_dilated(jnp.bfloat16 if impl == "onednn_bf16" else jnp.float32)
    if impl == "auto":  # a module built with conv_impl="auto" directly: the eval choice (create(use=...) otherwise)
        return resolve_conv(host_conv_impl("eval"))
    raise ValueError(f"unknown conv_impl {impl!r}; use one of {CONV_IMPLS}")


def _conv(conv_impl):
    """``nn.Conv`` with the chosen convolution function (same parameters for every ``conv_impl``)."""
    return functools.partial(nn.Conv, conv_general_dilated=resolve_conv(conv_impl))


class _Head(nn.Module):
    """Final dense layer: logits, or (mean, log-variance) for the heteroscedastic head."""

    num_classes: int
    hetero: bool = False

    @nn.compact
    def __call__(self, h):
        logits = nn.Dense(self.num_classes, name="logits")(h)
        if not self.hetero:
            return logits
        log_var = nn.Dense(self.num_classes, name="log_var", kernel_init=nn.initializers.zeros,
                           bias_init=nn.initializers.constant(-4.0))(h)
        return logits, log_var


class BasicCNN(nn.Module):
    """The original study's MNIST ConvNet: conv3x3-64, conv3x3-64, max-pool, dropout, dense-128, dropout, dense-10."""

    num_classes: int = 10
    dropout_rate: float = 0.25  # after the pooling layer
    dense_dropout_rate: float | None = None  # after dense-128; default 2 * dropout_rate (0.5, as in the original study)
    hetero: bool = False
    mean: Sequence[float] = MNIST_MEAN
    std: Sequence[float] = MNIST_STD
    conv_impl: str = "custom_vjp"

    @nn.compact
    def __call__(self, x, train: bool = False, mc_dropout: bool = False):
        drop = not (train or mc_dropout)
        Conv = _conv(self.conv_impl)
        h = _normalise(x, self.mean, self.std)
        h = nn.relu(Conv(64, (3, 3), padding="VALID")(h))
        h = nn.relu(Conv(64, (3, 3), padding="VALID")(h))
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
        h = nn.Dropout(self.dropout_rate, deterministic=drop)(h)
        h = h.reshape(h.shape[0], -1)
        h = nn.relu(nn.Dense(128)(h))
        dense_rate = 2 * self.dropout_rate if self.dense_dropout_rate is None else self.dense_dropout_rate
        h = nn.Dropout(dense_rate, deterministic=drop)(h)
        return _Head(self.num_classes, self.hetero)(h)


class AllConvNet(nn.Module):
    """Fully convolutional CIFAR-10 net in the all-convolutional style (Springenberg et al. 2015).

    3x3 convolutions, downsampling by stride-2 convolutions (no pooling layers), a 1x1 convolution to the classes
    and global average pooling. BatchNorm after each conv (a modern addition that makes it train in few epochs).
    Dropout after each downsampling stage, as in All-CNN-C, so MC-dropout is meaningful. ``width`` scales the
    channels: (width, 2·width, 4·width); All-CNN-C is width 96 with 2·width=192 in the last two stages.
    """

    num_classes: int = 10
    width: int = 32
    dropout_rate: float = 0.0
    hetero: bool = False
    mean: Sequence[float] = CIFAR_MEAN
    std: Sequence[float] = CIFAR_STD
    conv_impl: str = "custom_vjp"

    @nn.compact
    def __call__(self, x, train: bool = False, mc_dropout: bool = False):
        drop = not (train or mc_dropout)
        Conv = _conv(self.conv_impl)
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
        conv = lambda c, k=3, s=1: Conv(c, (k, k), strides=(s, s), padding="SAME", use_bias=False)  # noqa: E731
        h = _normalise(x, self.mean, self.std)
        w = self.width
        for stage, c in enumerate((w, 2 * w, 4 * w)):
            h = nn.relu(norm()(conv(c)(h)))
            h = nn.relu(norm()(conv(c)(h)))
            if stage < 2:
                h = nn.relu(norm()(conv(2 * c, s=2)(h)))  # strided conv replaces pooling
                h = nn.Dropout(self.dropout_rate, deterministic=drop)(h)
        h = nn.relu(norm()(conv(4 * w, k=1)(h)))
        h = nn.Dropout(self.dropout_rate, deterministic=drop)(h)
        out = Conv(self.num_classes * (2 if self.hetero else 1), (1, 1), name="classifier")(h)
        out = jnp.mean(out, axis=(1, 2))  # global average pooling
        if not self.hetero:
            return out
        logits, log_var = jnp.split(out, 2, axis=-1)
        return logits, log_var - 4.0


class _BasicBlock(nn.Module):
    features: int
    strides: int
    train: bool
    conv_impl: str = "custom_vjp"

    @nn.compact
    def __call__(self, x):
        Conv = _conv(self.conv_impl)
        norm = lambda **kw: nn.BatchNorm(use_running_average=not self.train, momentum=0.9, **kw)  # noqa: E731
        s = (self.strides, self.strides)
        h = Conv(self.features, (3, 3), strides=s, padding=((1, 1), (1, 1)), use_bias=False)(x)
        h = nn.relu(norm()(h))
        h = Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(h)
        h = norm(scale_init=nn.initializers.zeros)(h)  # zero-init residual: each block starts as identity
        if x.shape[-1] != self.features or self.strides != 1:
            x = Conv(self.features, (1, 1), strides=s, use_bias=False, name="shortcut")(x)
            x = norm(name="shortcut_bn")(x)
        return nn.relu(h + x)


class ResNet10(nn.Module):
    """ResNet-10: BasicBlocks, stages [1, 1, 1, 1] with (w, 2w, 4w, 8w) channels.

    ``stem="cifar"``: 3x3 conv, stride 1 (32x32 inputs). ``stem="imagenet"``: 7x7 conv stride 2 + 3x3 max-pool
    stride 2 (Imagenette). Dropout (rate ``dropout_rate``) before the classifier. BatchNorm uses running
    statistics in eval and MC-dropout modes.
    """

    num_classes: int = 10
    width: int = 64
    stem: str = "cifar"
    stages: Sequence[int] = (1, 1, 1, 1)
    dropout_rate: float = 0.0
    hetero: bool = False
    mean: Sequence[float] = CIFAR_MEAN
    std: Sequence[float] = CIFAR_STD
    conv_impl: str = "custom_vjp"

    @nn.compact
    def __call__(self, x, train: bool = False, mc_dropout: bool = False):
        Conv = _conv(self.conv_impl)
        h = _normalise(x, self.mean, self.std)
        if self.stem == "cifar":
            h = Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="stem")(h)
        elif self.stem == "imagenet":
            h = Conv(self.width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False, name="stem")(h)
        else:
            raise ValueError(f"unknown stem {self.stem!r}; use 'cifar' or 'imagenet'")
        h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(h))
        if self.stem == "imagenet":
            h = nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, n_blocks in enumerate(self.stages):
            for j in range(n_blocks):
                strides = 2 if (i > 0 and j == 0) else 1
                h = _BasicBlock(self.width * 2**i, strides, train, self.conv_impl)(h)
        h = jnp.mean(h, axis=(1, 2))
        h = nn.Dropout(self.dropout_rate, deterministic=not (train or mc_dropout))(h)
        return _Head(self.num_classes, self.hetero)(h)


MODELS = {"BasicCNN": BasicCNN, "AllConvNet": AllConvNet, "ResNet10": ResNet10}
ALIASES = {"basic_cnn": "BasicCNN", "allconv": "AllConvNet", "resnet10": "ResNet10"}


def create(config: dict[str, Any], *, use: str = "eval") -> nn.Module:
    """Build a model from an architecture config such as ``{"name": "ResNet10", "width": 16}``, for `use` (one of
    :data:`CONV_USES`). A ``conv_impl`` of ``"auto"`` is resolved for `use` (:func:`choose_conv_impl`), so
    ``model.conv_impl`` names the kernels used. Without a ``conv_impl``, ``use="eval"`` (the default) keeps the
    models' default (``"custom_vjp"``, f32) and any other declared use means ``"auto"``."""
    config = dict(config)
    impl = config.get("conv_impl", None if use == "eval" else "auto")
    if impl is None:
        resolve_conv_impl("custom_vjp", use)  # validates `use`
    else:
        config["conv_impl"] = resolve_conv_impl(impl, use)
    name = config.pop("name")
    name = ALIASES.get(name, name)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS) + sorted(ALIASES)}")
    for k in ("mean", "std", "stages"):
        if k in config:
            config[k] = tuple(config[k])
    return MODELS[name](**config)


def logits_of(outputs):
    """Logits of a model's output (the mean logits for a heteroscedastic head)."""
    return outputs[0] if isinstance(outputs, tuple) else outputs
