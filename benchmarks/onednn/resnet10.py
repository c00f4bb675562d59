"""ResNet-10 with the CIFAR stem, as robust_jax.models.ResNet10 (commit 994423e), with a pluggable convolution.

Same parameter tree as robust_jax's model (Conv_0/Conv_1/shortcut/BatchNorm names), so variables carry over.
``conv`` is passed to every ``nn.Conv(conv_general_dilated=...)``; None means ``lax.conv_general_dilated``.
Self-contained so the benchmark does not depend on the live /work/main working tree.
"""
from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class _Block(nn.Module):
    features: int
    strides: int
    train: bool
    conv: Callable | None = None

    @nn.compact
    def __call__(self, x):
        norm = lambda **kw: nn.BatchNorm(use_running_average=not self.train, momentum=0.9, **kw)  # noqa: E731
        conv = lambda *a, **kw: nn.Conv(*a, use_bias=False, conv_general_dilated=self.conv, **kw)  # noqa: E731
        s = (self.strides, self.strides)
        h = conv(self.features, (3, 3), strides=s, padding=((1, 1), (1, 1)))(x)
        h = nn.relu(norm()(h))
        h = conv(self.features, (3, 3), padding=((1, 1), (1, 1)))(h)
        h = norm(scale_init=nn.initializers.zeros)(h)
        if x.shape[-1] != self.features or self.strides != 1:
            x = conv(self.features, (1, 1), strides=s, name="shortcut")(x)
            x = norm(name="shortcut_bn")(x)
        return nn.relu(h + x)


class ResNet10(nn.Module):
    num_classes: int = 10
    width: int = 64
    conv: Callable | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = (x.astype(jnp.float32) - jnp.asarray(CIFAR_MEAN)) / jnp.asarray(CIFAR_STD)
        h = nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="stem",
                    conv_general_dilated=self.conv)(h)
        h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(h))
        for i in range(4):
            h = _Block(self.width * 2**i, 2 if i > 0 else 1, train, self.conv)(h)
        h = jnp.mean(h, axis=(1, 2))
        return nn.Dense(self.num_classes)(h)


def flip_crop(key, x, pad: int = 4):
    n, h, w, _ = x.shape
    k_flip, k_y, k_x = jax.random.split(key, 3)
    flip = jax.random.bernoulli(k_flip, 0.5, (n,))
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oy = jax.random.randint(k_y, (n,), 0, 2 * pad + 1)
    ox = jax.random.randint(k_x, (n,), 0, 2 * pad + 1)
    crop = lambda img, a, b: jax.lax.dynamic_slice(img, (a, b, 0), (h, w, img.shape[-1]))  # noqa: E731
    return jax.vmap(crop)(xp, oy, ox)


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation):
    """Jitted SGD step on uint8 images: flip+crop, BatchNorm in train mode, CE loss (as robust_jax's train step)."""

    def step(params, batch_stats, opt_state, images, labels, key):
        x = flip_crop(key, images.astype(jnp.float32) / 255.0)

        def objective(p):
            logits, new = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
            return cross_entropy(logits, labels).mean(), new["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return jax.jit(step)


def sgd(lr=0.05, weight_decay=5e-4) -> optax.GradientTransformation:
    mask = lambda p: jax.tree.map(lambda a: a.ndim > 1, p)  # noqa: E731
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=mask), optax.sgd(lr, momentum=0.9, nesterov=True))


def fwd_input_grad(model: nn.Module):
    """Jitted gradient of the mean CE loss w.r.t. the input images (eval mode), the inner step of PGD."""

    def loss(variables, x, y):
        return cross_entropy(model.apply(variables, x), y).mean()

    return jax.jit(jax.grad(loss, argnums=1))
