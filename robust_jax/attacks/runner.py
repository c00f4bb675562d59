"""Run an attack over a whole dataset: fixed-size chunks, data-parallel over all devices, compiled once."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from robust_jax import sharding


def run_attack(attack: Callable, variables, x, y, *, key, batch_size: int = 256, progress: bool = True,
               desc: str = "attack", mesh=None):
    """Apply ``attack(variables, x, y, key) -> pytree of per-example arrays`` to all of (x, y).

    The attack is jitted once with the variables as traced arguments; each chunk of `batch_size` examples is
    padded to full size (no recompiles), split over the devices of `mesh` (all devices by default) and uses key
    ``fold_in(key, chunk_index)``. Returns the concatenated outputs as numpy, padding removed.
    """
    from tqdm.auto import tqdm

    m = mesh or sharding.mesh()
    n_dev = sharding.num_devices(m)
    bs = batch_size + (-batch_size) % n_dev
    jitted = jax.jit(attack)
    variables = sharding.replicate(variables, m)
    x, y = np.asarray(x), np.asarray(y)
    outs = []
    with tqdm(total=len(x), desc=desc, unit="img", disable=not progress, dynamic_ncols=True, leave=False) as bar:
        for i, start in enumerate(range(0, len(x), bs)):
            xb, yb = x[start : start + bs], y[start : start + bs]
            k = len(xb)
            xb, yb = sharding.pad_batch(xb, bs)[0], sharding.pad_batch(yb, bs)[0]
            xb, yb = sharding.shard_batch((xb, yb), m)
            out = jitted(variables, xb, yb, jax.random.fold_in(key, i))
            outs.append(jax.tree.map(lambda o, k=k: np.asarray(o)[:k], out))
            bar.update(k)
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
