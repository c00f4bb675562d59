"""Toys for the tests: a linear classifier on small random images (its input gradient and Jacobian are known in
closed form), and MNIST-shaped data with a training configuration that learns it in a few steps."""

import jax.numpy as jnp
import numpy as np


def linear(w, b):
    """logits = flatten(x) @ w + b."""
    return lambda x: x.reshape(x.shape[0], -1) @ w + b


def toy_linear(n=8, shape=(4, 4, 1), c=3, seed=0, *, labels="random"):
    """(logits_fn, w, b, x, y). ``labels="predicted"`` uses the model's own predictions, so every example starts
    correctly classified."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    w = jnp.asarray(rng.normal(size=(d, c)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(c,)), jnp.float32)
    x = jnp.asarray(rng.uniform(size=(n, *shape)), jnp.float32)
    f = linear(w, b)
    if labels == "predicted":
        y = jnp.argmax(f(x), -1).astype(jnp.int32)
    else:
        y = jnp.asarray(rng.integers(0, c, n), jnp.int32)
    return f, w, b, x, y


def toy_mnist(n=256, seed=0):
    """(uint8 images (n, 28, 28, 1), int32 labels): noise with the row band 2c..2c+2 lit up for label c."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.integers(0, 60, (n, 28, 28, 1))
    for i, c in enumerate(y):
        x[i, 2 * c : 2 * c + 3, :, 0] = 255
    return x.astype(np.uint8), y.astype(np.int32)


def toy_train_config(**overrides):
    """A ``TrainConfig`` that learns :func:`toy_mnist` in a few steps: BasicCNN (dropout 0.1), 2 epochs at batch 32,
    Adam at 3e-3, seed 3."""
    from robust_jax import training  # imported here: the attack tests that import this module do not load it

    base = dict(dataset="mnist", architecture={"name": "BasicCNN", "dropout_rate": 0.1}, epochs=2, batch_size=32,
                optimizer="adam", lr=3e-3, seed=3)
    return training.TrainConfig(**{**base, **overrides})
