"""A linear classifier on small random images: its input gradient and Jacobian are known in closed form."""

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
