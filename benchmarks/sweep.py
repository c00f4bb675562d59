"""Sweep throughput: the CIFAR-10 robustness-curve sweep on 1 / 2 / 4 devices and 1 / 2 processes; prints JSON.

    python -m benchmarks.sweep [--checkpoints=cifar10_resnet10,cifar10_resnet10_pgd,cifar10_resnet10_rot]
                               [--num_examples=64] [--batch_size=64] [--variants=1x1,1x2,1x4,2x1,2x2]
                               [--vectorise=true] [--out=benchmarks/results/sweep.json]

Each variant ``PxD`` runs the sweep of experiments/sweeps/cifar10_robustness_curve.py (PGD-10, 9 eps values from 0 to
16/255, all in one compiled call per batch) restricted to ``--checkpoints`` and ``--num_examples``, from scratch, in
fresh processes: P processes (``jax.distributed`` on 127.0.0.1) with D forced host devices each. Reported per variant:
``cells_per_hour`` (from the cells' compute time, and from the wall time of the whole run including start-up and
compilation), ``image_steps_per_s`` (N x eps values x PGD steps per second of compute; each image-step is one
forward and backward pass), the attack executables compiled and XLA compilations in all, and whether the tables
of all variants are equal. ``vectorise`` compares one cell holding all eps values with one cell per eps value (a
loop of calls to one executable compiled for a single eps) on one device. ``environment`` records ``lscpu``'s model
name and flags and the load average before and after: on a shared 2-core machine the numbers move with the load.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

from robust_jax import xla_defaults

flags.DEFINE_list("checkpoints", ["cifar10_resnet10", "cifar10_resnet10_pgd", "cifar10_resnet10_rot"],
                  "checkpoints of the robustness-curve sweep (width-16 ResNets share one executable)")
flags.DEFINE_integer("num_examples", 64, "N per cell (first N test images)")
flags.DEFINE_integer("batch_size", 64, "global batch (a multiple of every device count)")
flags.DEFINE_list("variants", ["1x1", "1x2", "1x4", "2x1", "2x2"], "processes x devices per process")
flags.DEFINE_bool("vectorise", True, "also time eps-array cells against one cell per eps value")
flags.DEFINE_string("out", None, "also write the JSON here")
# worker mode (one process of a variant)
flags.DEFINE_string("worker_out", None, "internal: run the sweep into this dir")
flags.DEFINE_string("worker_mode", "curve", "internal: curve | vectorise")
flags.DEFINE_string("coordinator_address", None, "internal")
flags.DEFINE_integer("num_processes", None, "internal")
flags.DEFINE_integer("process_id", None, "internal")
FLAGS = flags.FLAGS

ROOT = Path(__file__).resolve().parents[1]


def build(mode: str):
    from experiments.sweeps.cifar10_robustness_curve import EPS, PGD
    from robust_jax.sweep import Cell, Sweep

    common = {"params": PGD, "n": FLAGS.num_examples, "batch_size": FLAGS.batch_size}
    if mode == "curve":
        return Sweep("bench_curve", [Cell(c, "pgd", EPS, **common) for c in FLAGS.checkpoints])
    c = FLAGS.checkpoints[0]
    return Sweep("bench_vectorise", [Cell(c, "pgd", EPS, group="array", **common)]
                 + [Cell(c, "pgd", [e], group="loop", **common) for e in EPS])


def worker():
    from robust_jax import sharding

    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    import jax
    from absl import logging

    from robust_jax import sweep

    logging.set_verbosity(logging.WARNING)
    sweep.run(build(FLAGS.worker_mode), FLAGS.worker_out, progress=False)
    if jax.process_count() > 1:
        jax.distributed.shutdown()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, processes: int, devices: int, mode: str = "curve") -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join([f for f in env.get("XLA_FLAGS", "").split()
                                 if "xla_force_host_platform_device_count" not in f]
                                + [f"--xla_force_host_platform_device_count={devices}"])
    base = [sys.executable, "-m", "benchmarks.sweep", f"--worker_out={out}", f"--worker_mode={mode}",
            f"--checkpoints={','.join(FLAGS.checkpoints)}", f"--num_examples={FLAGS.num_examples}",
            f"--batch_size={FLAGS.batch_size}"]
    extra = [[]] if processes == 1 else [[f"--coordinator_address=127.0.0.1:{_port()}",
                                          f"--num_processes={processes}", f"--process_id={i}"]
                                         for i in range(processes)]
    if processes > 1:
        extra = [[extra[0][0], *e[1:]] for e in extra]  # one coordinator address for all
    t0 = time.perf_counter()
    procs = [subprocess.Popen(base + e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for e in extra]
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t0
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"worker failed ({processes}x{devices}):\n{err[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    cells = [json.loads(f.read_text()) for f in sorted((out / "cells").glob("*.json"))]
    return {"wall_s": wall, "summary": summary, "cells": cells, "table": json.loads((out / "table.json").read_text())}


def image_steps(rec: dict) -> int:
    return rec["result"]["n"] * len(rec["config"]["values"]) * int(rec["config"]["params"].get("steps", 1))


def report_curve(r: dict, processes: int, devices: int) -> dict:
    cells = r["cells"]
    compute = sum(c["timing"]["compute_seconds"] for c in cells)
    total = sum(c["timing"]["seconds"] for c in cells)
    steps = sum(image_steps(c) for c in cells)
    comp = r["summary"]["compiles"]
    return {
        "processes": processes, "devices_per_process": devices, "devices": processes * devices,
        "cells": len(cells), "wall_s": round(r["wall_s"], 1), "cells_compute_s": round(compute, 1),
        "cells_s_incl_compile_and_load": round(total, 1),
        "cells_per_hour_compute": round(3600 * len(cells) / compute, 1),
        "cells_per_hour_wall": round(3600 * len(cells) / r["wall_s"], 1),
        "image_steps_per_s": round(steps / compute, 1),
        "per_cell_compute_s": [c["timing"]["compute_seconds"] for c in cells],
        "attack_executables_compiled": comp["executables_compiled_this_run"],
        "compile_s": comp["compile_seconds"], "xla_backend_compiles": comp["xla_backend_compiles"],
        "examples_loaded_per_process": r["summary"]["examples_loaded_per_process"],
    }


def lscpu() -> dict:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    get = lambda k: next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith(k + ":")), "")
    return {"model_name": get("Model name"), "cpus": get("CPU(s)"), "flags": get("Flags")}


def main(argv):
    del argv
    if FLAGS.worker_out:
        worker()
        return
    from robust_jax import sweep

    env = {"lscpu": lscpu(), "load_average_before": os.getloadavg(), "cpu_count": os.cpu_count(),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    cfg = {"checkpoints": FLAGS.checkpoints, "num_examples": FLAGS.num_examples, "batch_size": FLAGS.batch_size,
           "sweep": "experiments/sweeps/cifar10_robustness_curve.py (PGD-10, eps 0..16/255, 9 values)"}
    result = {"config": cfg, "variants": [], "environment": env}
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in FLAGS.variants:
            p, d = (int(s) for s in v.split("x"))
            r = launch(Path(tmp) / f"curve_{v}", p, d)
            tables[v] = sweep.comparable(r["table"])
            result["variants"].append(report_curve(r, p, d))
            print(json.dumps(result["variants"][-1]), file=sys.stderr, flush=True)
        result["tables_equal_across_variants"] = all(t == next(iter(tables.values())) for t in tables.values())
        if FLAGS.vectorise:
            r = launch(Path(tmp) / "vectorise", 1, 1, "vectorise")
            by_group = {}
            for c in r["cells"]:
                g = "array" if len(c["config"]["values"]) > 1 else "loop"
                by_group.setdefault(g, []).append(c)
            arr, loop = by_group["array"], by_group["loop"]
            a_s = sum(c["timing"]["compute_seconds"] for c in arr)
            l_s = sum(c["timing"]["compute_seconds"] for c in loop)
            rows = r["table"]
            same = (sorted((x["value"], x["robust_correct"]) for x in rows if x["group"] == "array")
                    == sorted((x["value"], x["robust_correct"]) for x in rows if x["group"] == "loop"))
            result["vectorise"] = {
                "checkpoint": FLAGS.checkpoints[0], "eps_values": len(arr[0]["config"]["values"]),
                "array_cell_compute_s": round(a_s, 2), "loop_of_cells_compute_s": round(l_s, 2),
                "speedup_compute": round(l_s / a_s, 2),
                "array_compile_s": sum(c["timing"]["compile_seconds"] for c in arr),
                "loop_compile_s": sum(c["timing"]["compile_seconds"] for c in loop),
                "loop_executables_compiled": sum(c["timing"]["compiled"] for c in loop),
                "same_results": same,
            }
    env["load_average_after"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    print(text)
    if FLAGS.out:
        Path(FLAGS.out).write_text(text + "\n")


if __name__ == "__main__":
    xla_defaults()
    app.run(main)
