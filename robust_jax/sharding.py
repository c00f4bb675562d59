"""Data parallelism over all devices with ``jax.sharding``: the same code runs on 1 or N devices.

The batch axis is split over a 1-D mesh named ``"data"``; parameters are replicated. ``jax.jit`` then runs any
pure function (a train step, an attack) data-parallel, with gradient means computed across devices by XLA.
Test on a CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.

Multi-process (one process per host, ``jax.distributed``): :func:`initialize_distributed`, :func:`global_mesh`
(all processes' devices), :func:`global_batch` (each process supplies only its rows, :func:`process_rows`),
:func:`global_replicated`, :func:`to_host` (gather), :func:`per_process`, :func:`all_processes`,
:func:`broadcast_from_main`; with one
process they behave like the single-process helpers.
"""

from __future__ import annotations

import functools
import os

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
    """Every array of `tree` on every device of `m` (one that spans several processes: :func:`global_replicated`,
    every process passing the same values)."""
    if spans_processes(m):
        return global_replicated(jax.device_get(tree), m)
    return jax.device_put(tree, replicated(m))


def spans_processes(m: Mesh | None = None) -> bool:
    """True if `m` holds devices of other processes than this one (a multi-controller mesh)."""
    return any(d.process_index != jax.process_index() for d in (m or mesh()).devices.flat)


def pad_batch(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
    """Pad axis 0 (repeating the last row) to a multiple of `multiple`; returns (padded, original length)."""
    n = x.shape[0]
    pad = (-n) % multiple
    if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    return x, n


def run_sharded(fn, *batch_args, batch_size: int | None = None, m: Mesh | None = None, indexed: bool = False,
                on_chunk=None):
    """Apply a jitted ``fn(*batch_args) -> pytree`` data-parallel over all devices, in chunks of `batch_size`.

    The library's one batched-inference helper (predictions, attacks over a dataset, oracles). Each chunk is padded
    to the chunk size (so ``fn`` compiles once) and to a multiple of the device count, split over the mesh, and the
    outputs are concatenated on the host as numpy with the padding removed. On a mesh spanning several processes
    every process passes the same full arrays, contributes its rows of each chunk and receives all outputs. ``fn``
    must map each example independently (attacks, predictions), so padding never changes real outputs. With
    ``indexed=True`` it is called as ``fn(chunk_index, *chunk)`` (e.g. to fold the index into a PRNG key);
    ``on_chunk(k)`` is called after each chunk with its number of real examples (progress bars).
    """
    m = m or mesh()
    n = batch_args[0].shape[0]
    bs = batch_size or n
    bs += (-bs) % num_devices(m)
    multi = spans_processes(m)
    lo, hi = process_rows(bs, m) if multi else (0, bs)
    outs = []
    for i, start in enumerate(range(0, n, bs)):
        chunk = [np.asarray(a[start : start + bs]) for a in batch_args]
        k = chunk[0].shape[0]
        chunk = tuple(pad_batch(c, bs)[0] for c in chunk)
        chunk = global_batch(tuple(c[lo:hi] for c in chunk), bs, m) if multi else shard_batch(chunk, m)
        out = fn(i, *chunk) if indexed else fn(*chunk)
        outs.append(jax.tree.map(lambda o, k=k: np.asarray(o)[:k], to_host(out)))
        if on_chunk is not None:
            on_chunk(k)
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


# ------------------------------------------------------------------------------- multi-process (multi-controller)
# One program per process (host), every process running the same jitted calls on a mesh of all processes' devices
# (``jax.distributed``). With one process these functions reduce to the single-process ones above.

def launcher() -> str | None:
    """The multi-process launcher this process runs under, detected from its environment: ``"slurm"`` (``srun``
    with more than one task), ``"openmpi"`` (``mpirun``), ``"tpu"`` (a multi-host Cloud TPU slice whose
    ``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` list several hosts, or a Megascale multi-slice run), or None
    (a plain process). JAX's ``jax.distributed.initialize()`` then finds the coordinator, the process count and id
    itself. (On a GCE TPU VM whose environment has none of these variables, JAX asks the metadata server: pass
    ``mode="on"`` to :func:`initialize_distributed`.)"""
    env = os.environ
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and _int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and _int(env.get("OMPI_COMM_WORLD_SIZE", "2")) > 1:
        return "openmpi"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        return "tpu"
    return None


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        return 0


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, mode: str = "auto", local_device_ids=None) -> bool:
    """Call ``jax.distributed.initialize`` when this is one process of several; returns whether it did.

    Must run before JAX initialises its backend (the first array or ``jax.devices()``). `mode`: ``"auto"``
    initialises when an explicit `coordinator_address` / ``num_processes > 1`` is given (all three of
    `coordinator_address`, `num_processes`, `process_id` are then required) or a :func:`launcher` is detected;
    ``"on"`` always (JAX auto-detects what is not given: TPU VMs, SLURM, Open MPI); ``"off"`` never.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"mode must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off":
        return False
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    if explicit and (coordinator_address is None or num_processes is None or process_id is None):
        raise ValueError("an explicit multi-process launch needs coordinator_address ('host:port' of process 0), "
                         f"num_processes and process_id; got {coordinator_address!r}, {num_processes!r}, "
                         f"{process_id!r}")
    if mode == "auto" and not explicit and launcher() is None:
        return False
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
    return True


def is_main_process() -> bool:
    """True on process 0 (the one that writes files); always True in a single-process run."""
    return jax.process_index() == 0


@functools.cache
def global_mesh() -> Mesh:
    """A 1-D ``"data"`` mesh of every device of every process, ordered by process then device id, so that each
    process's devices hold one contiguous block of rows of a sharded batch. With one process: all local devices."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), ("data",))


def process_rows(global_size: int, m: Mesh | None = None) -> tuple[int, int]:
    """``(lo, hi)``: the rows ``[lo, hi)`` of a batch of `global_size` rows (split over `m`, default
    :func:`global_mesh`) that this process's devices hold — the part of the batch this process loads."""
    m = m or global_mesh()
    if global_size % num_devices(m):
        raise ValueError(f"batch size {global_size} is not divisible by the {num_devices(m)} devices; pad it")
    index = data_sharding(m).addressable_devices_indices_map((global_size,))
    starts = sorted(sl[0].start or 0 for sl in index.values())
    per = global_size // num_devices(m)
    lo, hi = starts[0], starts[-1] + per
    if hi - lo != per * len(starts):
        raise ValueError(f"this process's devices hold non-contiguous rows {starts} of the mesh; use global_mesh()")
    return lo, hi


def global_batch(local, global_size: int, m: Mesh | None = None):
    """The global array of `global_size` rows sharded over `m` (default :func:`global_mesh`) from this process's
    rows ``local`` (a pytree of arrays holding rows :func:`process_rows` of it): no process holds the whole batch."""
    m = m or global_mesh()
    sh = data_sharding(m)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(
        sh, np.asarray(a), (global_size, *np.shape(a)[1:])), local)


def global_replicated(tree, m: Mesh | None = None):
    """Every array of `tree` replicated on all devices of `m` (default :func:`global_mesh`); every process passes
    the same values (model variables, keys, budgets)."""
    sh = replicated(m or global_mesh())
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sh, np.asarray(a), np.shape(a)), tree)


def to_host(tree):
    """Numpy copies of the arrays of `tree` in full on every process (an all-gather across processes when an array
    is not fully addressable here; plain ``np.asarray`` otherwise)."""
    from jax.experimental import multihost_utils

    def get(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(get, tree)


def per_process(value) -> np.ndarray:
    """Every process's numeric `value` (one per process, in process order; a barrier when there are several)."""
    value = np.asarray([value])
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value)).reshape(jax.process_count())


def all_processes(flag: bool) -> bool:
    """True iff `flag` is True on every process (a barrier; trivially `flag` in a single-process run)."""
    return bool(np.all(per_process(np.int32(bool(flag)))))


def broadcast_from_main(array):
    """Process 0's value of the numpy `array` (same shape and dtype on every process), on every process."""
    if jax.process_count() == 1:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(array)))
