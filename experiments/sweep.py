"""Batch sweeps from a config file (configs as code): ``python -m experiments.sweep --config=<file or name>``.

    python -m experiments.sweep --config=cifar10_robustness_curve               # experiments/sweeps/<name>.py
    python -m experiments.sweep --config=experiments/sweeps/energy_lambda.py --num_examples=200

A config is a Python file defining ``SWEEP = robust_jax.sweep.Sweep(name, cells)``. Writes ``--out_dir`` (default
``results/sweeps/<name>``): ``cells/<key>.json`` (one per finished cell, written atomically), ``table.csv`` /
``table.json`` (one row per cell and budget value), ``<group>.png`` (robust accuracy vs budget, one line per
checkpoint, Wilson 95% bands) and ``summary.json`` (what ran, what was reused, what failed, compilations).
Rerunning continues a killed sweep with its unfinished cells (see :mod:`robust_jax.sweep`). Exit status 2 when some
cell failed (the others are written).

Kernels: each cell's attack differentiates its checkpoint with the cell's ``conv_impl`` (default ``auto``: the fast
attack kernels of the host, e.g. ``onednn_bf16`` on a CPU with fast bf16 units); robust accuracy is
always computed with the f32 evaluation kernels. The attack kernels are part of a cell's key; ``--conv_impl``
overrides them for every cell (``--conv_impl=custom_vjp`` reuses the results written before the kernels were
recorded, e.g. those committed under results/sweeps/).

Multi-process: run the same command in every process. Under SLURM (``srun``), Open MPI (``mpirun``) or on a multi-host
Cloud TPU slice, ``jax.distributed.initialize()`` finds its peers by itself (``--distributed=auto``; ``on`` forces it,
e.g. on a TPU VM whose environment does not list the hosts); elsewhere pass ``--coordinator_address=<host0>:<port>
--num_processes=<P> --process_id=<i>``. Each process loads only its rows of every batch; process 0 writes the files.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from absl import app, flags

from robust_jax import xla_defaults
from robust_jax.models import CONV_IMPLS

# allow_override: tests import several experiment modules into one process; absl's flags are global.
flags.DEFINE_string("config", None, "sweep config: a .py file or a name in experiments/sweeps/", required=True,
                    allow_override=True)
flags.DEFINE_string("out_dir", None, "output dir (default results/sweeps/<sweep name>)", allow_override=True)
flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR)", allow_override=True)
flags.DEFINE_integer("num_examples", None, "override every cell's N (new cell keys: a separate set of results)",
                     allow_override=True)
flags.DEFINE_list("checkpoints", None, "run only the cells of these checkpoints", allow_override=True)
flags.DEFINE_enum("conv_impl", None, CONV_IMPLS, "override every cell's conv_impl: the convolution kernels its attack "
                  "differentiates (default: each cell's own, auto unless the config sets one: models.choose_conv_impl "
                  "for the attack's use, e.g. onednn_bf16 on CPUs with fast bf16 units); custom_vjp "
                  "gives the keys of the results written before the kernels were recorded. Robust accuracy is always "
                  "computed with the f32 evaluation kernels (custom_vjp). A new kernel choice is a new cell key",
                  allow_override=True)
flags.DEFINE_bool("list", False, "print the cells and their keys, run nothing", allow_override=True)
flags.DEFINE_bool("progress", True, "progress bars (process 0)", allow_override=True)
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed.initialize(): auto = when a launcher (SLURM, Open MPI, multi-host TPU) or "
                  "--coordinator_address is detected; on = always; off = never", allow_override=True)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-process launch)",
                    allow_override=True)
flags.DEFINE_integer("num_processes", None, "number of processes (explicit multi-process launch)", allow_override=True)
flags.DEFINE_integer("process_id", None, "this process's id, 0 .. num_processes-1 (explicit multi-process launch)",
                     allow_override=True)
flags.DEFINE_float("pause_after_cell", 0.0, "sleep this long after each finished cell (for testing resumption)",
                   allow_override=True)
FLAGS = flags.FLAGS

SWEEPS_DIR = Path(__file__).resolve().parent / "sweeps"


def load_config(spec: str):
    """The ``SWEEP`` of config `spec`: a path to a .py file, or the name of a file in experiments/sweeps/."""
    from robust_jax import sweep

    path = Path(spec)
    if not path.suffix:
        path = SWEEPS_DIR / f"{spec}.py"
    if not path.is_file():
        known = sorted(p.stem for p in SWEEPS_DIR.glob("*.py") if not p.stem.startswith("_"))
        raise app.UsageError(f"no sweep config {spec!r} (looked for {path}); configs in {SWEEPS_DIR}: {known}")
    mod_spec = importlib.util.spec_from_file_location(f"_sweep_config_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    grid = getattr(module, "SWEEP", None)
    if not isinstance(grid, sweep.Sweep):
        raise app.UsageError(f"{path} must define SWEEP = robust_jax.sweep.Sweep(...)")
    return grid


def main(argv):
    del argv
    from robust_jax import sharding

    # before anything touches the JAX backend
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                    mode=FLAGS.distributed)
    import jax
    from absl import logging

    from robust_jax import sweep

    logging.set_verbosity(logging.WARNING)
    grid = load_config(FLAGS.config)
    if FLAGS.checkpoints:
        grid = type(grid)(grid.name, [c for c in grid.cells if c.checkpoint in FLAGS.checkpoints], grid.description)
    if FLAGS.num_examples:
        grid = grid.replace_cells(n=FLAGS.num_examples)
    if FLAGS.conv_impl:
        grid = grid.replace_cells(conv_impl=FLAGS.conv_impl)
    out = Path(FLAGS.out_dir or f"results/sweeps/{grid.name}")
    if FLAGS.list:
        if sharding.is_main_process():
            devices = sharding.num_devices(sharding.global_mesh())
            for i, c in enumerate(grid.cells):
                try:
                    p = sweep.plan(i, c, devices)
                    state = "done" if sweep.read_cell(out, p) else "todo"
                    d = p.config.get("defence")
                    defended = (f" defence={d['kind']} protocol={d['protocol']} T={d['mc_samples']} "
                                f"S={d['eot_samples']}" if d else "")
                    print(f"{i:3d} {p.key} {state} {c.checkpoint} {c.attack} {p.budget}={list(c.values)} "
                          f"{p.base}[{p.start}:{p.stop}] seed={c.seed} batch={p.batch} conv={p.conv_impl}{defended}")
                except Exception as e:  # noqa: BLE001
                    print(f"{i:3d} unresolvable: {c.checkpoint} {c.attack}: {e}")
        return
    summary = sweep.run(grid, out, data_dir=FLAGS.data_dir, progress=FLAGS.progress,
                        pause_after_cell=FLAGS.pause_after_cell)
    if jax.process_count() > 1:
        jax.distributed.shutdown()
    sys.exit(2 if summary["failed"] else 0)  # every other cell ran and was written; the summary names the failures


if __name__ == "__main__":
    xla_defaults()
    app.run(main)
