"""Batch sweeps: a grid of cells evaluated vectorised, sharded over every device of every process, resumably.

    from robust_jax import sweep
    grid = sweep.Sweep("curve", [sweep.Cell("cifar10_resnet10", "pgd", eps, params={"steps": 10}, n=1000)])
    summary = sweep.run(grid, "results/sweeps/curve")      # table.csv, table.json, figures, summary.json

A **cell** is (checkpoint, attack + its parameters, a 1-D array of budget values — ``eps``, or ``λ`` for LE-PGD —,
seed, the first N examples of a split of the checkpoint's dataset, global batch size). All its budget values run in
**one compiled call** per batch (the attacks take array-valued ``eps`` / ``lam``), returning per example whether the
clean and each attacked input are classified correctly. Each batch is split over a 1-D mesh of all devices of all
processes (:func:`robust_jax.sharding.global_mesh`); every process loads only the rows its devices hold
(:func:`robust_jax.sharding.process_rows`) and the global batch is assembled with
``jax.make_array_from_process_local_data``; results are all-gathered and process 0 alone writes files.

**Compilation**: one executable per (architecture, attack + parameters, number of budget values, batch shape, mesh,
defence), compiled ahead of time with the weights, the budget values, the data and the seed as *arguments*: every
checkpoint of one architecture and every set of budget values of one length reuse it. ``summary["compiles"]`` counts
these executables and every XLA backend compilation of the run (small helpers included).

**Resumption**: each finished cell is written atomically (temporary file + ``os.replace``) as
``<out>/cells/<key>.json``; the key is a SHA-256 of the cell's full configuration: checkpoint name, architecture and
content hash (of ``variables.sha256``), attack and every parameter (defaults included), budget values, data slice,
seed, effective batch size, the attack's convolution kernels (below), and the library and JAX versions. A rerun
skips cells whose file exists and holds the same configuration; changing anything makes a new key. A cell that fails
is recorded in the summary and the sweep goes on (a rerun retries it).

**Kernels**: a cell's attack differentiates its checkpoint with the convolution kernels ``Cell.conv_impl`` (default
``"auto"``: :func:`robust_jax.models.choose_conv_impl` for the attack's use on this host, e.g. ``"onednn_bf16"`` on
a CPU with fast bf16 units, ``"custom_vjp"`` on GPU / TPU or CPUs without them); clean and robust accuracy (and a
defence's prediction) always come from the f32 evaluation kernels of ``checkpoints.load`` (``"custom_vjp"``). A
result computed with other attack kernels is another result, so the attack kernels are part of the key, as
``config["conv_impl"]``, written only when they are not ``"custom_vjp"``, the kernels of every cell run before they
were recorded: those cells keep their keys. ``autoattack`` resolves ``"auto"`` for ``use="eval"``
(:attr:`AttackSpec.conv_use`): FAB's minimal perturbations and the in-graph success checks that decide which
attack's output is kept sit on the decision boundary, where bf16 rounding would decide.

**Determinism**: the PRNG key of batch ``b`` of a cell is ``fold_in(PRNGKey(seed), b)`` and JAX's random numbers do
not depend on how an array is sharded, so a cell's result does not depend on the number of devices or processes
as long as the effective batch size (``batch_size`` rounded up to a multiple of the device count; part of the key)
and the attack kernels (part of the key; ``"auto"`` depends on the host) are the same: choose a ``batch_size``
divisible by every device count you use (the defaults are), and pin ``conv_impl`` to compare runs on different hosts.

Attacks (:data:`ATTACKS`; :func:`register_attack` adds one): ``fgsm`` and ``pgd`` sweep ``eps``; ``le_pgd`` sweeps
``lam`` at a fixed ``eps``; ``autoattack`` runs AutoAttack's protocol on the host in stages
(:func:`robust_jax.autoattack_eval.evaluate`, the runner of ``python -m experiments.autoattack``): each of its attacks
only on the points the ones before it left, in chunks of ``batch_size`` sharded over the mesh, one eps after the other,
with ``PRNGKey(seed)`` and the examples' dataset positions as keys — so a cell's result is that command's with the same
checkpoint, images and seed, and does not depend on the batch size or the device count (beyond the
floating-point effect of the batch shape). On an adversarially trained
network, where most points survive the first attack and few survive them all, that is far cheaper than running every
attack on every point in one compiled function (benchmarks/README.md). Every process loads such a cell's whole slice
(the stages pick examples by what is left, not by position), and its within-cell state (after every chunk) is kept as
``<out>/cells/.<key>.eps<i>.state.npz`` until the cell finishes, so a killed sweep resumes inside a long AutoAttack cell
too. Such cells attack the network itself (a randomised defence: ``python -m experiments.autoattack --version=rand``).

**Defended cells** (the uncertainty study's grid): a cell with ``defence`` set (one of
:data:`robust_jax.evaluate.DEFENCES`: ``"none"``, ``"epistemic"`` = MC-dropout, ``"aleatoric"`` = heteroscedastic head)
attacks the :class:`robust_jax.evaluate.Defence` of its checkpoint under ``protocol`` (one of
:data:`robust_jax.evaluate.PROTOCOLS`: the original study's one stochastic pass per gradient step, or the adaptive EOT
over ``eot_samples`` draws), ``Defence.attacked(protocol)`` being what the attack differentiates, and scores clean and
attacked inputs with the *defended* prediction: the argmax of the mean softmax over ``mc_samples`` dropout masks /
logit draws (``Defence.probs``), drawn with :func:`prediction_key` of the batch key — the same draws for the clean
input and every budget value. The attack gets the batch key itself, as in a plain cell. Defence, protocol, and both
sample counts are part of the key and of the executable; a cell without ``defence`` is the plain network, as before
(its key is unchanged).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
import traceback
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

import robust_jax
from robust_jax import attacks, autoattack_eval, checkpoints, evaluate, models, sharding
from robust_jax import data as data_lib

FORMAT = 1  # version of the cell-file format and of the key's contents (part of every key)
Z95 = 1.959963984540054


# ------------------------------------------------------------------------------------------------------ attacks
@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """``fn(logits_fn, x, y, *, key, values, indices, **params) -> x_adv`` with a leading axis of ``len(values)``.

    ``values`` is the traced 1-D array of budget values (named `budget`: ``"eps"`` or ``"lam"``); ``indices`` are
    the examples' dataset positions (per-example keys); ``params`` are static (compiled in), `defaults` filled in.
    `conv_use` (one of ``models.CONV_USES``) is the use a cell's ``conv_impl="auto"`` is resolved for: ``"attack"``
    (input gradients: the fast kernels of the host), or ``"eval"`` for an attack whose outcome is decided by a
    forward pass at the decision boundary (the f32 kernels whose predictions are reported).

    An attack evaluated on the host instead (several compiled stages with host-side bookkeeping between them, as
    AutoAttack's, which drops the fooled points between its attacks) gives `host` and no `fn`:
    ``host(runner, plan, classifier, x, y, state_dir) -> (x_adv per budget value, info)`` with `x` the cell's
    examples as floats in [0, 1] (on every process), `x_adv` a list of arrays shaped like `x`, and `info` a JSON
    record stored in the cell file; the cell scores them with the evaluation kernels like any other."""

    fn: Callable | None
    budget: str = "eps"
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    conv_use: str = "attack"
    host: Callable | None = None

    def __post_init__(self):
        if (self.fn is None) == (self.host is None):
            raise ValueError("an attack spec gives exactly one of fn (in-graph) and host (host-side stages)")


def _fgsm(logits_fn, x, y, *, key, values, indices, **p):
    del indices
    return attacks.fgsm(logits_fn, x, y, key=key, eps=values, validate=False, **p)


def _step(eps, step_size, rel_step_size):
    """An absolute `step_size` if given, else ``rel_step_size * eps`` (per budget value when eps is swept)."""
    return step_size if step_size is not None else rel_step_size * eps


def _pgd(logits_fn, x, y, *, key, values, indices, steps, rel_step_size, step_size=None, **p):
    del indices
    return attacks.pgd(logits_fn, x, y, key=key, eps=values, step_size=_step(values, step_size, rel_step_size),
                       steps=steps, validate=False, **p)


def _le_pgd(logits_fn, x, y, *, key, values, indices, eps, steps, rel_step_size, step_size=None, **p):
    del indices
    return attacks.le_pgd(logits_fn, x, y, key=key, lam=values, eps=eps,
                          step_size=_step(eps, step_size, rel_step_size), steps=steps, validate=False, **p)


AUTOATTACK_PARAMS = ("norm", "version", "attacks_to_run", "options")


def _autoattack(runner: Runner, p: Plan, classifier, x, y, state_dir):
    """AutoAttack's staged protocol (:func:`robust_jax.autoattack_eval.evaluate`: each attack only on the points the
    ones before it left) at each eps of the cell, one after the other, with ``PRNGKey(seed)`` and the examples'
    dataset positions as their keys — the computation of ``python -m experiments.autoattack`` with the same seed,
    checkpoint and images. Resumable within the cell: a state file per eps under `state_dir`."""
    unknown = sorted(set(p.params) - set(AUTOATTACK_PARAMS))
    if unknown:
        raise ValueError(f"autoattack cell: unknown parameters {unknown} (known: {list(AUTOATTACK_PARAMS)})")
    builder = runner.builder(p, classifier.for_use(ATTACKS[p.cell.attack].conv_use, p.conv_impl))
    variables = jax.device_get(classifier.variables)
    indices = np.arange(p.start, p.stop, dtype=np.int32)
    x_adv, info = [], []
    for i, eps in enumerate(p.cell.values):
        state = None if state_dir is None else Path(state_dir) / f".{p.key}.eps{i}.state.npz"
        res = autoattack_eval.evaluate(
            builder, variables, x, y, key=jax.random.PRNGKey(p.cell.seed), norm=p.params["norm"], eps=eps,
            version=p.params["version"], attacks_to_run=p.params.get("attacks_to_run"),
            options=p.params.get("options"), batch_size=p.batch, state=state, config={"cell": p.key, "eps_index": i},
            indices=indices, mesh=runner.mesh, progress=False)
        x_adv.append(res["x_adv"])
        info.append({"eps": eps, "robust_accuracy": res["robust_accuracy"], "seconds": res["seconds"],
                     "images_attacked": {a: v["images_attacked"] for a, v in res["passes"].items()},
                     "flags": res["flags"]})
    return x_adv, {"stages": info}


ATTACKS: dict[str, AttackSpec] = {
    "fgsm": AttackSpec(_fgsm),
    "pgd": AttackSpec(_pgd, defaults={"steps": 10, "rel_step_size": 0.25, "norm": "linf"}),
    "le_pgd": AttackSpec(_le_pgd, budget="lam", defaults={"steps": 30, "rel_step_size": 0.25}),
    "autoattack": AttackSpec(None, defaults={"norm": "linf", "version": "standard"}, conv_use="eval",
                             host=_autoattack),
}


def register_attack(name: str, fn: Callable | None, *, budget: str = "eps", defaults: Mapping | None = None,
                    conv_use: str = "attack", host: Callable | None = None) -> None:
    """Add an attack for cells (e.g. from a config file); `fn`, `budget`, `conv_use` and `host` as in
    :class:`AttackSpec`."""
    ATTACKS[name] = AttackSpec(fn, budget, dict(defaults or {}), conv_use, host)


# --------------------------------------------------------------------------------------------------- the grid
@dataclasses.dataclass(frozen=True)
class Cell:
    """One unit of work and of resumption: `attack` (a key of :data:`ATTACKS`) with `params` on checkpoint
    `checkpoint`, at every budget value of `values`, on the first `n` examples of `split` of the checkpoint's
    dataset, in global batches of `batch_size`, keys from `seed`. `group` / `label`: the figure and the line the
    cell's points go to (defaults: ``<dataset>_<attack>`` and the checkpoint name, plus the defence).

    `defence` (one of :data:`robust_jax.evaluate.DEFENCES`; empty: the plain network) attacks the checkpoint's
    :class:`robust_jax.evaluate.Defence` with `mc_samples` draws per defended prediction, under `protocol` (one of
    :data:`robust_jax.evaluate.PROTOCOLS`, required with a defence) with `eot_samples` draws per adaptive step.

    `conv_impl` (one of ``models.CONV_IMPLS``): the convolution kernels the attack differentiates, ``"auto"``
    resolved for the attack's :attr:`AttackSpec.conv_use` on the running host (see the module docstring, "Kernels");
    every reported prediction uses the f32 evaluation kernels."""

    checkpoint: str
    attack: str
    values: Sequence[float]
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    n: int = 1000
    split: str = "test"
    batch_size: int = 256
    group: str = ""
    label: str = ""
    defence: str = ""
    protocol: str = ""
    mc_samples: int = evaluate.Defence.__dataclass_fields__["mc_samples"].default
    eot_samples: int = evaluate.Defence.__dataclass_fields__["eot_samples"].default
    conv_impl: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "values", tuple(float(v) for v in np.atleast_1d(np.asarray(self.values, float))))
        object.__setattr__(self, "params", dict(self.params))
        if not self.values:
            raise ValueError(f"cell {self.checkpoint}/{self.attack}: no budget values")
        if self.n < 1 or self.batch_size < 1:
            raise ValueError(f"cell {self.checkpoint}/{self.attack}: need n >= 1 and batch_size >= 1")
        if self.protocol and not self.defence:
            raise ValueError(f"cell {self.checkpoint}/{self.attack}: protocol {self.protocol!r} without a defence")
        if self.mc_samples < 1 or self.eot_samples < 1:
            raise ValueError(f"cell {self.checkpoint}/{self.attack}: need mc_samples >= 1 and eot_samples >= 1")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A named grid of cells (a config file under ``experiments/sweeps/`` defines ``SWEEP = Sweep(...)``)."""

    name: str
    cells: Sequence[Cell]
    description: str = ""

    def __post_init__(self):
        object.__setattr__(self, "cells", tuple(self.cells))
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"sweep name {self.name!r} must be a plain file name")

    def replace_cells(self, **changes) -> Sweep:
        """The same sweep with `changes` applied to every cell (e.g. ``n=64`` for a quick run: new keys)."""
        return dataclasses.replace(self, cells=[dataclasses.replace(c, **changes) for c in self.cells])


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def checkpoint_digest(name: str) -> str:
    """SHA-256 of checkpoint `name`'s ``variables.sha256`` (the content hash of every variable file; the files are
    checked against it when loaded), or of the variable files themselves if it has none."""
    path = checkpoints.root() / name
    sums = path / checkpoints.CHECKSUMS
    h = hashlib.sha256()
    if sums.is_file():
        h.update(sums.read_bytes())
    else:
        for f in sorted(p for p in (path / "variables").rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _data_range(dataset: str, split: str, n: int) -> tuple[str, int, int]:
    """("test", 0, n): the absolute range of the first `n` examples of `split` (fewer if the split is shorter)."""
    m = re.fullmatch(r"(\w+)\[(\d+):(\d+)\]", data_lib.head(dataset, split, n))
    return m.group(1), int(m.group(2)), int(m.group(3))


def effective_batch(batch_size: int, n: int, devices: int) -> int:
    """The global batch a cell runs with: ``min(batch_size, n)`` rounded up to a multiple of the device count."""
    bs = min(batch_size, n)
    return bs + (-bs) % devices


@dataclasses.dataclass
class Plan:
    """A resolved cell: its key, the full configuration the key hashes, and what running it needs."""

    index: int
    cell: Cell
    key: str
    config: dict
    dataset: str
    base: str
    start: int
    stop: int
    batch: int
    params: dict
    budget: str
    conv_impl: str  # the attack's kernels (concrete)

    @property
    def n(self) -> int:
        return self.stop - self.start


UNRECORDED_CONV_IMPL = "custom_vjp"
"""The attack kernels of a configuration without ``"conv_impl"`` (every cell run before the kernels were recorded)."""


def plan(index: int, cell: Cell, devices: int) -> Plan:
    """Resolve `cell`: read its checkpoint's card and content hash (not the weights), fill in the attack's default
    parameters, resolve its attack kernels (``models.resolve_conv_impl`` for the attack's ``conv_use``), and derive
    its key. Raises for an unknown checkpoint, attack, split or ``conv_impl``."""
    if cell.attack not in ATTACKS:
        raise ValueError(f"unknown attack {cell.attack!r}; known: {sorted(ATTACKS)} (sweep.register_attack adds one)")
    spec = ATTACKS[cell.attack]
    card = checkpoints.read_card(cell.checkpoint)
    dataset = card["dataset"]
    base, start, stop = _data_range(dataset, cell.split, cell.n)
    params = {**spec.defaults, **cell.params}
    batch = effective_batch(cell.batch_size, stop - start, devices)
    defence = _defence_config(cell, card)
    conv_impl = models.resolve_conv_impl(cell.conv_impl, spec.conv_use)
    config = {
        "format": FORMAT,
        "checkpoint": cell.checkpoint,
        "checkpoint_sha256": checkpoint_digest(cell.checkpoint),
        "architecture": {k: v for k, v in card["architecture"].items() if k != "conv_impl"},
        "attack": cell.attack,
        "params": params,
        "budget": spec.budget,
        "values": list(cell.values),
        "data": {"dataset": dataset, "split": base, "start": start, "stop": stop},
        "seed": int(cell.seed),
        "batch_size": batch,
        "robust_jax": robust_jax.__version__,
        "jax": jax.__version__,
    }
    if defence is not None:  # only in defended cells: a plain cell keeps the key it always had
        if spec.host is not None:
            raise ValueError(f"attack {cell.attack!r} runs on the host and evaluates the network itself; for a "
                             f"randomised defence use python -m experiments.autoattack --version=rand --defence=...")
        config["defence"] = defence
    if spec.host is not None:  # host-side stages: another computation than the in-graph one of the same name
        config["engine"] = "host"
    if conv_impl != UNRECORDED_CONV_IMPL:  # only with other kernels: a custom_vjp cell keeps the key it always had
        config["conv_impl"] = conv_impl
    key = hashlib.sha256(canonical(config).encode()).hexdigest()[:24]
    return Plan(index, cell, key, config, dataset, base, start, stop, batch, params, spec.budget, conv_impl)


def _defence_config(cell: Cell, card: dict) -> dict | None:
    """The defence part of a cell's configuration (None for a plain cell); raises for an unknown defence or
    protocol, or the aleatoric defence on a checkpoint without a heteroscedastic head."""
    if not cell.defence:
        return None
    if cell.defence not in evaluate.DEFENCES:
        raise ValueError(f"unknown defence {cell.defence!r}; known: {list(evaluate.DEFENCES)}")
    if cell.protocol not in evaluate.PROTOCOLS:
        raise ValueError(f"defence {cell.defence!r} needs a protocol, one of {list(evaluate.PROTOCOLS)}; got "
                         f"{cell.protocol!r}")
    if cell.defence == "aleatoric" and not card["architecture"].get("hetero"):
        raise ValueError(f"the aleatoric defence needs a heteroscedastic checkpoint; {cell.checkpoint} is not one")
    return {"kind": cell.defence, "protocol": cell.protocol, "mc_samples": int(cell.mc_samples),
            "eot_samples": int(cell.eot_samples)}


def batch_key(seed: int, b: int) -> jax.Array:
    """The PRNG key of batch `b` of a cell with `seed` (the attack's key)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), b)


PREDICTION_STREAM = 1
"""Defended cells draw their prediction's dropout masks / logit noise from ``fold_in(batch key, PREDICTION_STREAM)``."""


def prediction_key(key: jax.Array) -> jax.Array:
    """The key of a defended cell's prediction (clean and every budget value) in the batch with key `key`."""
    return jax.random.fold_in(key, PREDICTION_STREAM)


# ------------------------------------------------------------------------------------------------ statistics
def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (95% by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k == 0 else lo, 1.0 if k == n else hi)  # exact at the ends (k = 0 / n), not 1 - 1e-16


# ------------------------------------------------------------------------------------------------------- files
def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader (or a killed writer) never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_cell(out_dir: Path, p: Plan) -> dict | None:
    """The finished cell file of `p` if it exists and holds exactly `p`'s configuration, else None."""
    f = Path(out_dir) / "cells" / f"{p.key}.json"
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(rec, dict) or rec.get("key") != p.key or rec.get("config") != p.config:
        return None
    return rec


def _bits(mask: np.ndarray) -> str:
    return np.packbits(np.asarray(mask, bool)).tobytes().hex()


def unbits(hex_: str, n: int) -> np.ndarray:
    """The boolean per-example mask stored in a cell file (``clean_bits`` / ``robust_bits``)."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(hex_), np.uint8))[:n].astype(bool)


# ---------------------------------------------------------------------------------------------------- runner
class _CompileCounter:
    """Counts XLA backend compilations (every executable JAX builds while it is active)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count, self.seconds = 0, 0.0

    def __call__(self, event, duration, **_):
        if event == self.EVENT:
            self.count += 1
            self.seconds += duration

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


@dataclasses.dataclass
class _Compiled:
    fn: Any
    seconds: float
    desc: str
    uses: int = 0


class Runner:
    """Runs cells on a mesh (default: every device of every process); keeps the compiled executables, loaded
    checkpoints and loaded data between cells."""

    def __init__(self, *, mesh=None, data_dir=None, progress: bool = True, log: Callable[[str], None] | None = None):
        self.mesh = mesh or sharding.global_mesh()
        self.devices = sharding.num_devices(self.mesh)
        self.processes = jax.process_count()
        self.main = sharding.is_main_process()
        self.data_dir = data_dir
        self.progress = progress and self.main
        self._log = log
        self.compiled: dict[str, _Compiled] = {}
        self._builders: dict[str, Callable] = {}
        self._models: OrderedDict[str, tuple] = OrderedDict()
        self._data: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self.examples_loaded = 0  # by this process (its rows of each batch; each slice once)
        self.rep = NamedSharding(self.mesh, P())
        self.rows = NamedSharding(self.mesh, P("data"))
        self.rows2 = NamedSharding(self.mesh, P(None, "data"))

    def log(self, msg: str) -> None:
        if not self.main:
            return
        if self._log is not None:
            self._log(msg)
        else:
            tqdm.write(msg, file=sys.stderr)

    # -- checkpoints (two kept: cells are run grouped by checkpoint)
    def model(self, name: str):
        if name not in self._models:
            m = checkpoints.load(name)
            self._models[name] = (m, sharding.global_replicated(jax.device_get(m.variables), self.mesh))
            while len(self._models) > 2:
                self._models.popitem(last=False)
        self._models.move_to_end(name)
        return self._models[name]

    # -- data: this process's rows of every batch of the cell, padded with zeros past the end of the slice
    def _rows(self, dataset: str, base: str, a: int, b: int):
        k = (dataset, base, a, b)
        if k not in self._data:
            self._data[k] = data_lib.load(dataset, f"{base}[{a}:{b}]", data_dir=self.data_dir, cache=False)
            self.examples_loaded += b - a
        return self._data[k]

    def local_batches(self, p: Plan) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        lo, hi = sharding.process_rows(p.batch, self.mesh)
        shape = data_lib.info(p.dataset).image_shape
        out = []
        for b0 in range(p.start, p.stop, p.batch):
            a, z = min(b0 + lo, p.stop), min(b0 + hi, p.stop)
            x = np.zeros((hi - lo, *shape), np.uint8)
            y = np.zeros((hi - lo,), np.int32)
            if z > a:
                x[: z - a], y[: z - a] = self._rows(p.dataset, p.base, a, z)
            idx = np.arange(b0 + lo, b0 + hi, dtype=np.int32)
            out.append((x, y, idx))
        return out

    # -- compilation: one executable per (architecture, attack + params, #values, batch shape, mesh, defence, kernels)
    def executable(self, p: Plan, classifier, variables) -> tuple[_Compiled, bool]:
        """`classifier`: the loaded :class:`robust_jax.checkpoints.Classifier` with the evaluation kernels (its module
        and card; the weights are an argument of the executable): it scores the clean and attacked inputs, while the
        attack differentiates ``classifier.for_use(..., p.conv_impl)`` (the same weights)."""
        shape = tuple(data_lib.info(p.dataset).image_shape)
        defence = p.config.get("defence")
        desc = canonical({"architecture": p.config["architecture"], "attack": p.cell.attack, "params": p.params,
                          "values": len(p.cell.values), "batch": [p.batch, *shape],
                          "mesh": [d.id for d in self.mesh.devices.flat], "conv_impl": p.conv_impl,
                          **({"defence": defence} if defence else {})})
        ck = hashlib.sha256(desc.encode()).hexdigest()[:16]
        if ck in self.compiled:
            return self.compiled[ck], False
        spec, params, model = ATTACKS[p.cell.attack], dict(p.params), classifier.model
        attacked = classifier.for_use(spec.conv_use, p.conv_impl)

        def plain_fn(variables, x8, y, idx, seed_chunk, values):
            x = x8.astype(jnp.float32) / 255.0
            logits_fn = lambda z: models.logits_of(model.apply(variables, z))
            attack_fn = lambda z: models.logits_of(attacked.apply(variables, z))
            key = batch_key(seed_chunk[0], seed_chunk[1])
            clean = jnp.argmax(logits_fn(x), -1) == y
            x_adv = spec.fn(attack_fn, x, y, key=key, values=values, indices=idx, **params)
            robust = jax.vmap(lambda xa: jnp.argmax(logits_fn(xa), -1) == y)(x_adv)
            return clean, robust

        def defended_fn(variables, x8, y, idx, seed_chunk, values):
            d = evaluate.Defence(defence["kind"], classifier, defence["mc_samples"], defence["eot_samples"],
                                 attack_model=attacked)
            x = x8.astype(jnp.float32) / 255.0
            key = batch_key(seed_chunk[0], seed_chunk[1])
            k_pred = prediction_key(key)  # the same draws for the clean input and every budget value
            correct = lambda z: jnp.argmax(d.probs(variables, z, k_pred)[0].mean(0), -1) == y
            x_adv = spec.fn(d.attacked(defence["protocol"])(variables), x, y, key=key, values=values, indices=idx,
                            **params)
            # one budget value at a time: mc_samples x batch forward passes in memory, not x len(values) as well
            return correct(x), jax.lax.map(correct, x_adv)

        cell_fn = defended_fn if defence else plain_fn

        rep, rows = self.rep, self.rows
        jitted = jax.jit(cell_fn, in_shardings=(rep, rows, rows, rows, rep, rep), out_shardings=(rows, self.rows2))
        sds = lambda s, dt, sh: jax.ShapeDtypeStruct(s, dt, sharding=sh)
        t0 = time.perf_counter()
        fn = jitted.lower(jax.tree.map(lambda a: sds(a.shape, a.dtype, rep), variables),
                          sds((p.batch, *shape), jnp.uint8, rows), sds((p.batch,), jnp.int32, rows),
                          sds((p.batch,), jnp.int32, rows), sds((2,), jnp.int32, rep),
                          sds((len(p.cell.values),), jnp.float32, rep)).compile()
        c = _Compiled(fn, time.perf_counter() - t0, desc)
        self.compiled[ck] = c
        return c, True

    def builder(self, p: Plan, attacked) -> Callable:
        """``variables -> logits_fn`` of the network `attacked` (a Classifier with the cell's attack kernels), one
        function object per (architecture, kernels): host-side attacks key their compiled stages on it, so every
        checkpoint of one architecture reuses them."""
        k = canonical({"architecture": p.config["architecture"], "conv_impl": p.conv_impl})
        if k not in self._builders:
            self._builders[k] = autoattack_eval.defence_builder("none", attacked, 1)
        return self._builders[k]

    def run_cell(self, p: Plan, bar=None, state_dir=None) -> dict:
        """Evaluate one cell on all processes; returns its record (the cell file's contents). `state_dir`: where an
        attack that runs on the host (:attr:`AttackSpec.host`) keeps its within-cell state (resumption)."""
        if ATTACKS[p.cell.attack].host is not None:
            return self._run_host_cell(p, bar, state_dir)
        t0 = time.perf_counter()
        ok, err, prepared = True, "", None
        try:  # everything that could fail on one process only happens before the first collective call
            m, variables = self.model(p.cell.checkpoint)
            batches = self.local_batches(p)
            exe, fresh = self.executable(p, m, variables)
            prepared = (variables, batches, exe, fresh)
        except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
            ok, err = False, _error(e)
        if not sharding.all_processes(ok):
            raise CellError(err or "failed on another process")
        variables, batches, exe, fresh = prepared
        t1 = time.perf_counter()
        values = sharding.global_replicated(np.asarray(p.cell.values, np.float32), self.mesh)
        clean, robust = [], []
        for b, (x, y, idx) in enumerate(batches):
            args = sharding.global_batch((x, y, idx), p.batch, self.mesh)
            sc = sharding.global_replicated(np.asarray([p.cell.seed, b], np.int32), self.mesh)
            c, r = sharding.to_host(exe.fn(variables, *args, sc, values))
            k = min(p.batch, p.stop - p.start - b * p.batch)
            clean.append(c[:k])
            robust.append(r[:, :k])
            if bar is not None:
                bar.update(k)
        exe.uses += 1
        clean, robust = np.concatenate(clean), np.concatenate(robust, axis=1)
        t2 = time.perf_counter()
        return self._record(p, clean, robust, {"seconds": round(t2 - t0, 3), "compute_seconds": round(t2 - t1, 3),
                                               "compile_seconds": round(exe.seconds, 3) if fresh else 0.0,
                                               "compiled": fresh})

    def _record(self, p: Plan, clean, robust, timing: dict, info: dict | None = None) -> dict:
        result = {"n": int(clean.size), "clean_correct": int(clean.sum()),
                  "robust_correct": [int(v) for v in robust.sum(1)], "clean_bits": _bits(clean),
                  "robust_bits": [_bits(r) for r in robust]}
        return {
            "format": FORMAT, "key": p.key, "config": p.config, "result": result | ({"attack": info} if info else {}),
            "timing": timing,
            "run": {"devices": self.devices, "processes": self.processes, "host": platform.node(),
                    "backend": jax.default_backend(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")},
        }

    def _run_host_cell(self, p: Plan, bar, state_dir) -> dict:
        """A cell whose attack runs on the host (:attr:`AttackSpec.host`): every process loads the cell's whole
        slice (the stages pick their examples by what earlier stages left, not by position), the attack's stages run
        sharded over the mesh, and the clean and attacked inputs are scored with the evaluation kernels, as in an
        in-graph cell. ``compiled`` / ``compile_seconds``: the XLA compilations during the cell."""
        t0 = time.perf_counter()
        ok, err, prepared = True, "", None
        try:  # everything that could fail on one process only happens before the first collective call
            m, variables = self.model(p.cell.checkpoint)
            x8, y = self._rows(p.dataset, p.base, p.start, p.stop)
            prepared = (m, variables, data_lib.to_float(x8), np.asarray(y, np.int32))
        except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
            ok, err = False, _error(e)
        if not sharding.all_processes(ok):
            raise CellError(err or "failed on another process")
        m, variables, x, y = prepared
        with _CompileCounter() as compiles:
            x_adv, info = ATTACKS[p.cell.attack].host(self, p, m, x, y, state_dir)
            pred = jax.jit(lambda v, xb: jnp.argmax(models.logits_of(m.model.apply(v, xb)), -1))
            correct = lambda xs: sharding.run_sharded(lambda xb: pred(variables, xb), xs, batch_size=p.batch,
                                                      m=self.mesh) == y
            clean, robust = correct(x), np.stack([correct(xa) for xa in x_adv])
        if bar is not None:
            bar.update(p.n)
        if self.main and state_dir is not None:
            for f in Path(state_dir).glob(f".{p.key}.*"):
                f.unlink(missing_ok=True)
        return self._record(p, clean, robust, {"seconds": round(time.perf_counter() - t0, 3),
                                               "compile_seconds": round(compiles.seconds, 3),
                                               "compiled": compiles.count > 0}, info)


class CellError(RuntimeError):
    """A cell failed (on this or another process)."""


def _error(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {str(e).strip()[:800]}{where}"


# ------------------------------------------------------------------------------------------------ the table
COLUMNS = ("sweep", "cell", "group", "label", "key", "checkpoint", "architecture", "dataset", "data", "attack",
           "defence", "protocol", "mc_samples", "eot_samples", "conv_impl", "params", "budget", "value", "seed",
           "batch_size", "n", "clean_correct", "clean_accuracy", "robust_correct", "robust_accuracy", "ci_low",
           "ci_high", "seconds", "compile_seconds", "devices", "processes", "status")
# Columns that describe how and when a cell ran, not what it computed (they differ between equal runs).
RUN_COLUMNS = ("seconds", "compile_seconds", "devices", "processes", "status")


def rows_of(sweep_name: str, p: Plan, rec: dict, status: str) -> list[dict]:
    """The table rows of a finished cell, one per budget value. Columns `defence`, `protocol`, `mc_samples` and
    `eot_samples` are empty for a plain cell (the network's own prediction, attacked directly); `conv_impl` is the
    kernels the attack differentiated (:data:`UNRECORDED_CONV_IMPL` for a configuration without them), named in the
    default label unless they are those."""
    res, cfg = rec["result"], rec["config"]
    d = cfg["data"]
    arch = cfg["architecture"]
    n = res["n"]
    defence = cfg.get("defence") or {}
    conv_impl = cfg.get("conv_impl", UNRECORDED_CONV_IMPL)
    label = (p.cell.checkpoint + (f" {defence['kind']} ({defence['protocol']})" if defence else "")
             + (f" [{conv_impl}]" if conv_impl != UNRECORDED_CONV_IMPL else ""))
    out = []
    for v, k in zip(cfg["values"], res["robust_correct"]):
        lo, hi = wilson(k, n)
        out.append({
            "sweep": sweep_name, "cell": p.index, "group": p.cell.group or f"{p.dataset}_{p.cell.attack}",
            "label": p.cell.label or label, "key": p.key, "checkpoint": cfg["checkpoint"],
            "architecture": arch.get("name", "") + (f"/{arch['width']}" if "width" in arch else "")
            + ("+hetero" if arch.get("hetero") else ""),
            "dataset": d["dataset"], "data": f"{d['split']}[{d['start']}:{d['stop']}]", "attack": cfg["attack"],
            "defence": defence.get("kind", ""), "protocol": defence.get("protocol", ""),
            "mc_samples": defence.get("mc_samples"), "eot_samples": defence.get("eot_samples"),
            "conv_impl": conv_impl, "params": canonical(cfg["params"]),
            "budget": cfg["budget"], "value": v, "seed": cfg["seed"],
            "batch_size": cfg["batch_size"], "n": n, "clean_correct": res["clean_correct"],
            "clean_accuracy": res["clean_correct"] / n, "robust_correct": k, "robust_accuracy": k / n,
            "ci_low": lo, "ci_high": hi, "seconds": rec["timing"]["seconds"],
            "compile_seconds": rec["timing"]["compile_seconds"], "devices": rec["run"]["devices"],
            "processes": rec["run"]["processes"], "status": status,
        })
    return out


def write_table(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    csv_path, json_path = out_dir / "table.csv", out_dir / "table.json"
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write(csv_path, buf.getvalue())
    atomic_write(json_path, json.dumps(rows, indent=1) + "\n")
    return csv_path, json_path


def figures(rows: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per group: robust accuracy vs budget, one line per label (checkpoint) with its Wilson 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for group, rs in groups.items():
        lines: dict[str, list[dict]] = {}
        for r in rs:
            lines.setdefault(r["label"], []).append(r)
        budget, dataset = rs[0]["budget"], rs[0]["dataset"]
        scale = 255.0 if budget == "eps" and dataset != "mnist" else 1.0
        fig, ax = plt.subplots(figsize=(7 + 2.2 * (len(lines) > 1), 4.5))
        colours = plt.get_cmap("tab10").colors
        for i, (label, lr) in enumerate(lines.items()):  # 10 colours x 3 line styles: no two lines look alike
            lr = sorted(lr, key=lambda r: r["value"])
            x = np.asarray([r["value"] for r in lr]) * scale
            y = 100 * np.asarray([r["robust_accuracy"] for r in lr])
            lo = 100 * np.asarray([r["ci_low"] for r in lr])
            hi = 100 * np.asarray([r["ci_high"] for r in lr])
            colour, style = colours[i % 10], ("-", "--", ":")[(i // 10) % 3]
            ax.plot(x, y, marker="os^"[(i // 10) % 3], ms=3, lw=1.4, ls=style, color=colour, label=label)
            ax.fill_between(x, lo, hi, color=colour, alpha=0.12, lw=0)
        if budget == "lam":
            ax.set_xscale("log")
            ax.set_xlabel("λ (LE-PGD energy weight)")
        else:
            ax.set_xlabel("eps (Linf, ×1/255)" if scale == 255 else "eps (Linf, pixels in [0, 1])")
        attacks_ = sorted({r["attack"] for r in rs})
        ns = sorted({r["n"] for r in rs})
        defended = [r for r in rs if r.get("defence")]
        ax.set_ylabel("accuracy of the defended prediction (%)" if defended else "robust accuracy (%)")
        ax.set_ylim(-2, 102)
        params = json.loads(rs[0]["params"])
        detail = [f"{params['steps']} steps"] if "steps" in params else []
        if "eps" in params:
            detail.append(f"eps {params['eps'] * 255:.3g}/255" if scale == 255 or dataset != "mnist"
                          else f"eps {params['eps']:.3g}")
        for name, col in (("T", "mc_samples"), ("EOT S", "eot_samples")):
            counts = sorted({r[col] for r in defended})
            if counts:
                detail.append(f"{name}={'/'.join(map(str, counts))}")
        ax.set_title(f"{group}: {', '.join(attacks_)}{' (' + ', '.join(detail) + ')' if detail else ''} on {dataset}, "
                     f"N={'/'.join(map(str, ns))} (bands: Wilson 95%)", fontsize=9)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        else:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(out_dir) / f"{group}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------------- run
def run(sweep: Sweep, out_dir, *, runner: Runner | None = None, data_dir=None, progress: bool = True,
        pause_after_cell: float = 0.0, figures_: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Run `sweep` into `out_dir` (``cells/``, ``table.csv``, ``table.json``, ``<group>.png``, ``summary.json``),
    skipping finished cells; returns the summary (on every process; only process 0 writes files).

    Every process of a multi-process run calls this with the same sweep. `pause_after_cell` (seconds) is for
    testing resumption."""
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    runner = runner or Runner(data_dir=data_dir, progress=progress, log=log)
    main = runner.main
    counter = _CompileCounter().__enter__()
    try:
        plans: list[Plan] = []
        failed: list[dict] = []
        seen: dict[str, int] = {}
        duplicates = []
        for i, cell in enumerate(sweep.cells):
            try:
                p = plan(i, cell, runner.devices)
            except Exception as e:  # noqa: BLE001 - an unresolvable cell is a failed cell
                failed.append({"cell": i, "checkpoint": cell.checkpoint, "attack": cell.attack, "key": None,
                               "error": _error(e)})
                continue
            if p.key in seen:
                duplicates.append({"cell": i, "same_as": seen[p.key]})
                continue
            seen[p.key] = i
            plans.append(p)
        digest = zlib.crc32(canonical([[p.index, p.key] for p in plans] + [f["cell"] for f in failed]).encode())
        if len(set(sharding.per_process(np.int64(digest)).tolist())) > 1:
            raise RuntimeError(f"sweep {sweep.name}: the processes resolved different cells (a checkpoint, the data or "
                               f"the config differs between hosts); every process needs the same files")
        records: dict[str, dict] = {}
        if main:
            (out_dir / "cells").mkdir(parents=True, exist_ok=True)
            for f in (out_dir / "cells").glob(".*.tmp*"):  # left by a killed writer
                f.unlink(missing_ok=True)
            for p in plans:
                rec = read_cell(out_dir, p)
                if rec is not None:
                    records[p.key] = rec
        done = sharding.broadcast_from_main(np.asarray([p.key in records for p in plans], np.int32))
        todo = [p for p, d in zip(plans, done) if not d]
        reused = [p for p, d in zip(plans, done) if d]
        order = {}
        for p in todo:  # group by checkpoint (loaded once), keep the config's order otherwise
            order.setdefault(p.cell.checkpoint, []).append(p)
        todo = [p for ps in order.values() for p in ps]
        runner.log(f"sweep {sweep.name}: {len(sweep.cells)} cells, {len(reused)} finished before, {len(todo)} to "
                   f"run, {len(failed)} unresolvable; {runner.devices} devices, {runner.processes} processes")
        ran = []
        outer = tqdm(total=len(todo), desc="cells", unit="cell", disable=not runner.progress, position=0,
                     dynamic_ncols=True)
        for p in todo:
            defence = p.config.get("defence")
            desc = (f"{p.cell.checkpoint} {p.cell.attack} {p.budget}×{len(p.cell.values)}"
                    + (f" {defence['kind']}/{defence['protocol']}" if defence else "")
                    + (f" [{p.conv_impl}]" if p.conv_impl != UNRECORDED_CONV_IMPL else ""))
            inner = tqdm(total=p.n, desc=desc[:60], unit="img", disable=not runner.progress, position=1,
                         leave=False, dynamic_ncols=True)
            try:
                rec = runner.run_cell(p, inner, state_dir=out_dir / "cells")
            except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                failed.append({"cell": p.index, "checkpoint": p.cell.checkpoint, "attack": p.cell.attack,
                               "key": p.key, "error": str(e) if isinstance(e, CellError) else _error(e)})
                runner.log(f"  FAILED cell {p.index} ({desc}): {failed[-1]['error']}")
                continue
            finally:
                inner.close()
            if main:
                atomic_write(out_dir / "cells" / f"{p.key}.json", json.dumps(rec, indent=1) + "\n")
            records[p.key] = rec
            ran.append(p)
            r = rec["result"]
            accs = " ".join(f"{100 * k / r['n']:.1f}" for k in r["robust_correct"])
            t = rec["timing"]
            compiled = f", compiled in {t['compile_seconds']:.1f} s" if t["compiled"] else ""
            runner.log(f"  cell {p.index} {desc}: clean {100 * r['clean_correct'] / r['n']:.1f}%, robust "
                       f"[{accs}]% (N={r['n']}, {t['seconds']:.1f} s{compiled})")
            outer.update(1)
            if pause_after_cell:
                time.sleep(pause_after_cell)
        outer.close()
    finally:
        counter.__exit__(None, None, None)

    summary = {
        "sweep": sweep.name, "description": sweep.description, "out_dir": str(out_dir),
        "cells": len(sweep.cells), "ran": [p.index for p in ran], "reused": [p.index for p in reused],
        "failed": failed, "duplicates": duplicates,
        "compiles": {"executables": len([c for c in runner.compiled.values() if c.uses]),
                     "executables_compiled_this_run": sum(1 for p in ran if records[p.key]["timing"]["compiled"]),
                     "compile_seconds": round(sum(records[p.key]["timing"]["compile_seconds"] for p in ran), 2),
                     "xla_backend_compiles": counter.count,
                     "xla_backend_compile_seconds": round(counter.seconds, 2),
                     "per_executable": [{"uses": c.uses, "seconds": round(c.seconds, 2), **json.loads(c.desc)}
                                        for c in runner.compiled.values()]},
        "devices": runner.devices, "processes": runner.processes, "backend": jax.default_backend(),
        "examples_loaded_per_process": [int(v) for v in sharding.per_process(runner.examples_loaded)],
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    if main:
        rows, reused_keys = [], {p.key for p in reused}
        for p in plans:
            if p.key in records:
                rows.extend(rows_of(sweep.name, p, records[p.key], "reused" if p.key in reused_keys else "ran"))
        csv_path, json_path = write_table(rows, out_dir)
        summary["table"] = [str(csv_path), str(json_path)]
        summary["figures"] = [str(f) for f in figures(rows, out_dir)] if (figures_ and rows) else []
        atomic_write(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        c = summary["compiles"]
        runner.log(f"sweep {sweep.name} done in {summary['seconds']:.0f} s: ran {len(ran)}, reused {len(reused)}, "
                   f"failed {len(failed)} of {len(sweep.cells)} cells; {c['executables_compiled_this_run']} attack "
                   f"executables compiled ({c['compile_seconds']:.0f} s), {c['xla_backend_compiles']} XLA "
                   f"compilations in all; table {csv_path}")
        for f in failed:
            runner.log(f"  failed: cell {f['cell']} ({f['checkpoint']}, {f['attack']}): {f['error']}")
    return summary


def read_table(path) -> list[dict]:
    return json.loads(Path(path).read_text())


def comparable(rows: list[dict]) -> list[dict]:
    """Rows without the columns that say how a cell ran (:data:`RUN_COLUMNS`): equal for equal computations."""
    return [{k: v for k, v in r.items() if k not in RUN_COLUMNS} for r in rows]
