"""Run an attack over a whole dataset on the host: fixed-size chunks, data-parallel over all devices, compiled once,
with a progress bar. Chunking, padding and sharding are :func:`robust_jax.sharding.run_sharded`'s."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from robust_jax import sharding


def run_attack(attack: Callable, variables, x, y, *, key, batch_size: int = 256, progress: bool = True,
               desc: str = "attack", mesh=None):
    """Apply ``attack(variables, x, y, key) -> pytree of per-example arrays`` to all of (x, y).

    The attack is jitted once with the variables as traced arguments; each chunk of `batch_size` examples is
    padded to full size (no recompiles), split over the devices of `mesh` (all local devices by default; a mesh of
    several processes: every process passes the same full arrays, see ``sharding.run_sharded``) and uses key
    ``fold_in(key, chunk_index)``. Returns the concatenated outputs as numpy, padding removed.
    """
    m = mesh or sharding.mesh()
    jitted = jax.jit(attack)
    variables = sharding.replicate(variables, m)
    x, y = np.asarray(x), np.asarray(y)
    multi = sharding.spans_processes(m)

    def fn(i, xb, yb):
        k = jax.random.fold_in(key, i)  # on a mesh of several processes every argument is a global array
        return jitted(variables, xb, yb, sharding.global_replicated(jax.device_get(k), m) if multi else k)

    with tqdm(total=len(x), desc=desc, unit="img", disable=not progress, dynamic_ncols=True, leave=False) as bar:
        return sharding.run_sharded(fn, x, y, batch_size=batch_size, m=m, indexed=True, on_chunk=bar.update)
