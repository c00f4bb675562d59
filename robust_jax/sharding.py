"""Data parallelism over all devices with ``jax.sharding``: the same code runs on 1 or N devices.

The batch axis is split over a 1-D mesh named ``"data"``; parameters are replicated. ``jax.jit`` then runs any
pure function (a train step, an attack) data-parallel, with gradient means computed across devices by XLA.
Test on a CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


@functools.cache
def mesh(num_devices: int | None = None) -> Mesh:
    devices = jax.devices()[: num_devices or None]
    return Mesh(np.asarray(devices), ("data",))


def data_sharding(m: Mesh | None = None) -> NamedSharding:
    """Shard axis 0 over the mesh."""
    return NamedSharding(m or mesh(), P("data"))


def replicated(m: Mesh | None = None) -> NamedSharding:
    return NamedSharding(m or mesh(), P())


def num_devices(m: Mesh | None = None) -> int:
    return (m or mesh()).devices.size


def shard_batch(tree, m: Mesh | None = None):
    """Place every array of `tree` with its leading (batch) axis split over the mesh.

    The batch size must be divisible by the number of devices (see :func:`pad_batch`).
    """
    m = m or mesh()
    n = num_devices(m)
    sharding = data_sharding(m)

    def put(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by the {n} devices; pad it (pad_batch)")
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree)


def replicate(tree, m: Mesh | None = None):
    return jax.device_put(tree, replicated(m))


def pad_batch(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
    """Pad axis 0 (repeating the last row) to a multiple of `multiple`; returns (padded, original length)."""
    n = x.shape[0]
    pad = (-n) % multiple
    if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    return x, n


def run_sharded(fn, *batch_args, batch_size: int | None = None, m: Mesh | None = None):
    """Apply a jitted ``fn(*batch_args) -> pytree`` data-parallel over all devices, in chunks of `batch_size`.

    Each chunk is padded to the chunk size (so ``fn`` compiles once) and to a multiple of the device count, split
    over the mesh, and the outputs are concatenated on the host with the padding removed. ``fn`` must map each
    example independently (attacks, predictions), so padding never changes real outputs.
    """
    m = m or mesh()
    n = batch_args[0].shape[0]
    bs = batch_size or n
    bs += (-bs) % num_devices(m)
    outs = []
    for start in range(0, n, bs):
        chunk = [np.asarray(a[start : start + bs]) for a in batch_args]
        k = chunk[0].shape[0]
        chunk = [pad_batch(c, bs)[0] for c in chunk]
        out = fn(*shard_batch(tuple(chunk), m))
        outs.append(jax.tree.map(lambda o, k=k: np.asarray(o)[:k], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
