"""Batch sweeps (robust_jax/sweep.py, experiments/sweep.py): keys, resumption, device / process invariance.

The slow tests run the tiny sweep of tests/sweep_tiny.py (MNIST BasicCNN checkpoints, N=32, batches of 16; two of
its cells attack a defence: MC-dropout with EOT, the heteroscedastic head) as subprocesses: one process with one
device (the reference), one process with 4 forced host devices, two processes with 2 forced host devices each joined
by ``jax.distributed`` on 127.0.0.1 (a real multi-controller run), and a run killed with SIGKILL and resumed. Defended
cells are also checked against the Defence and the attack called directly on the same images and keys.
"""

import csv
import dataclasses
import functools
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from robust_jax import evaluate, sharding, sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = Path(__file__).with_name("sweep_tiny.py")
TINY_CELLS = 8
ONE_PASS, ADAPTIVE = evaluate.PROTOCOLS  # the original study's protocol and EOT (never spelled here: names may change)


# ------------------------------------------------------------------------------------------------ subprocesses
def _env(devices: int | None = None) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _cmd(out, *extra):
    # kernels pinned: "auto" depends on the host (oneDNN bf16 on a CPU with fast bf16 units), and these runs compare
    # tables across device counts with the f32 reference kernels
    return [sys.executable, "-m", "experiments.sweep", f"--config={TINY}", f"--out_dir={out}", "--noprogress",
            "--conv_impl=custom_vjp", *extra]


def _run(out, *extra, devices=None, timeout=900):
    proc = subprocess.run(_cmd(out, *extra), capture_output=True, text=True, env=_env(devices), cwd=ROOT,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((Path(out) / "summary.json").read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _table(out) -> list[dict]:
    return sweep.read_table(Path(out) / "table.json")


@pytest.fixture(scope="module")
def needs_tiny(request):
    from robust_jax import checkpoints, data

    for name in ("mnist_basic_cnn", "mnist_basic_cnn_hetero"):
        if name not in checkpoints.available():
            pytest.skip(f"checkpoint {name} not present")
    try:
        data.load("mnist", "test[0:1]", cache=False)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no MNIST data: {e}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, needs_tiny):
    """The tiny sweep, uninterrupted, on one process with one device."""
    out = tmp_path_factory.mktemp("reference")
    return out, _run(out, devices=1)


# ---------------------------------------------------------------------------------------------------- fast
def test_wilson_interval():
    lo, hi = sweep.wilson(5, 10)
    assert abs(lo - 0.2366) < 1e-4 and abs(hi - 0.7634) < 1e-4
    lo, hi = sweep.wilson(0, 10)
    assert lo == 0.0 and abs(hi - 0.2775) < 1e-4
    lo, hi = sweep.wilson(10, 10)
    assert abs(lo - 0.7225) < 1e-4 and hi == 1.0


def test_effective_batch_is_a_multiple_of_the_devices():
    assert sweep.effective_batch(256, 1000, 1) == 256
    assert sweep.effective_batch(250, 1000, 4) == 252
    assert sweep.effective_batch(256, 32, 4) == 32
    assert sweep.effective_batch(256, 30, 4) == 32


def test_key_covers_the_full_config(needs_tiny):
    base = sweep.Cell("mnist_basic_cnn", "pgd", [0.1, 0.3], params={"steps": 3}, n=32, batch_size=16)
    key = sweep.plan(0, base, 1).key
    assert sweep.plan(7, base, 1).key == key  # the position in the grid is not part of the config
    # defaults written out are the same configuration
    explicit = sweep.Cell("mnist_basic_cnn", "pgd", [0.1, 0.3], params={"steps": 3, "rel_step_size": 0.25,
                                                                         "norm": "linf"}, n=32, batch_size=16)
    assert sweep.plan(0, explicit, 1).key == key
    variants = [
        dict(params={"steps": 4}), dict(params={"steps": 3, "rel_step_size": 0.5}), dict(values=[0.1]),
        dict(values=[0.1, 0.2]), dict(seed=1), dict(n=16), dict(split="test[100:]"), dict(batch_size=8),
        dict(attack="fgsm", params={}), dict(checkpoint="mnist_basic_cnn_hetero"), dict(conv_impl="xla"),
    ]
    keys = {sweep.plan(0, dataclasses.replace(base, **v), 1).key for v in variants}
    assert len(keys) == len(variants) and key not in keys
    # batch 16 on 3 devices runs as 18: another computation, another key
    assert sweep.plan(0, base, 3).key != key and sweep.plan(0, base, 3).batch == 18
    assert sweep.plan(0, base, 4).key == key


def test_key_follows_checkpoint_content(tmp_path, monkeypatch, needs_tiny):
    from robust_jax import checkpoints

    src = checkpoints.root() / "mnist_basic_cnn"
    dst = tmp_path / "mnist_basic_cnn"
    (dst / "variables").mkdir(parents=True)
    (dst / "card.json").write_text((src / "card.json").read_text())
    sums = (src / checkpoints.CHECKSUMS).read_text()
    (dst / checkpoints.CHECKSUMS).write_text(sums)
    cell = sweep.Cell("mnist_basic_cnn", "fgsm", [0.1], n=16)
    original = sweep.plan(0, cell, 1).key
    monkeypatch.setenv("ROBUST_JAX_CHECKPOINTS", str(tmp_path))
    assert sweep.plan(0, cell, 1).key == original  # same content, another folder: same key
    (dst / checkpoints.CHECKSUMS).write_text(sums.replace(sums[:8], "0" * 8, 1))  # other weights
    assert sweep.plan(0, cell, 1).key != original


def test_defence_is_part_of_the_key(needs_tiny):
    plain = sweep.Cell("mnist_basic_cnn", "fgsm", [0.1, 0.3], n=32, batch_size=16)
    assert "defence" not in sweep.plan(0, plain, 1).config  # plain cells keep their keys (committed results stay valid)
    base = dataclasses.replace(plain, defence="epistemic", protocol=ADAPTIVE, mc_samples=4, eot_samples=2)
    p = sweep.plan(0, base, 1)
    assert p.config["defence"] == {"kind": "epistemic", "protocol": ADAPTIVE, "mc_samples": 4, "eot_samples": 2}
    variants = [dict(defence="none"), dict(protocol=ONE_PASS), dict(mc_samples=5), dict(eot_samples=3),
                dict(defence="aleatoric", checkpoint="mnist_basic_cnn_hetero"), dict(seed=1)]
    keys = {sweep.plan(0, dataclasses.replace(base, **v), 1).key for v in variants}
    assert len(keys) == len(variants) and not keys & {p.key, sweep.plan(0, plain, 1).key}
    assert sweep.plan(0, dataclasses.replace(base, label="x", group="y"), 1).key == p.key  # presentation only
    # unresolvable: unknown defence or protocol, no protocol, the aleatoric defence without a heteroscedastic head
    for bad, match in [(dict(defence="bayes"), "unknown defence"), (dict(protocol="deck2"), "protocol"),
                       (dict(protocol=""), "protocol"), (dict(defence="aleatoric"), "heteroscedastic")]:
        with pytest.raises(ValueError, match=match):
            sweep.plan(0, dataclasses.replace(base, **bad), 1)
    with pytest.raises(ValueError, match="without a defence"):
        dataclasses.replace(plain, protocol=ADAPTIVE)
    with pytest.raises(ValueError, match="mc_samples"):
        dataclasses.replace(base, mc_samples=0)


def test_attack_kernels_are_part_of_the_key(monkeypatch, needs_tiny):
    """A cell's attack kernels are in its key, written only when they are not custom_vjp (whose keys are those of
    every cell run before the kernels were recorded); "auto" is the host's choice for the attack's use (AutoAttack:
    the evaluation kernels); the table and the default label name them."""
    from robust_jax import models

    cell = sweep.Cell("mnist_basic_cnn", "pgd", [0.1], params={"steps": 3}, n=32, batch_size=16)
    legacy = sweep.plan(0, dataclasses.replace(cell, conv_impl="custom_vjp"), 1)
    assert "conv_impl" not in legacy.config and legacy.conv_impl == "custom_vjp"
    assert legacy.key == hashlib.sha256(sweep.canonical(legacy.config).encode()).hexdigest()[:24]
    other = {impl: sweep.plan(0, dataclasses.replace(cell, conv_impl=impl), 1) for impl in ("xla", "onednn_bf16")}
    for impl, p in other.items():
        assert p.config["conv_impl"] == impl == p.conv_impl
        assert {k: v for k, v in p.config.items() if k != "conv_impl"} == legacy.config
    assert len({legacy.key, *(p.key for p in other.values())}) == 3
    host = {"attack": "onednn_bf16"}  # a CPU with fast bf16 units
    monkeypatch.setattr(models, "host_conv_impl", lambda use: host.get(use, "custom_vjp"))
    assert sweep.plan(0, cell, 1).key == other["onednn_bf16"].key
    aa = sweep.Cell("mnist_basic_cnn", "autoattack", [0.1], n=32, batch_size=16)
    assert sweep.plan(0, aa, 1).conv_impl == "custom_vjp" and "conv_impl" not in sweep.plan(0, aa, 1).config
    assert sweep.plan(0, dataclasses.replace(aa, conv_impl="onednn_bf16"), 1).conv_impl == "onednn_bf16"
    host.clear()  # e.g. GPU / TPU, or no bf16 units: auto is custom_vjp, the key the one it always was
    assert sweep.plan(0, cell, 1).key == legacy.key
    with pytest.raises(ValueError, match="conv_impl"):
        sweep.plan(0, dataclasses.replace(cell, conv_impl="cudnn"), 1)
    rec = {"config": other["xla"].config, "result": {"n": 32, "clean_correct": 30, "robust_correct": [10]},
           "timing": {"seconds": 1.0, "compile_seconds": 0.0}, "run": {"devices": 1, "processes": 1}}
    (row,) = sweep.rows_of("s", other["xla"], rec, "ran")
    assert row["conv_impl"] == "xla" and row["label"] == "mnist_basic_cnn [xla]" and tuple(row) == sweep.COLUMNS
    (row,) = sweep.rows_of("s", legacy, {**rec, "config": legacy.config}, "ran")
    assert row["conv_impl"] == "custom_vjp" and row["label"] == "mnist_basic_cnn"


def test_committed_cells_keep_their_keys(needs_tiny):
    """The cells under results/sweeps/ (computed with custom_vjp kernels, before the kernels were recorded) have the
    keys of their configurations, and a cell of that configuration with ``conv_impl="custom_vjp"`` has the same key:
    a rerun with ``--conv_impl=custom_vjp`` reuses them."""
    import jax

    import robust_jax
    from robust_jax import checkpoints

    files = sorted((ROOT / "results" / "sweeps").glob("*/cells/*.json"))
    if not files:
        pytest.skip("no committed sweep results")
    replanned = 0
    for f in files:
        rec = json.loads(f.read_text())
        cfg = rec["config"]
        assert "conv_impl" not in cfg, f
        assert hashlib.sha256(sweep.canonical(cfg).encode()).hexdigest()[:24] == rec["key"] == f.stem, f
        if ((cfg["jax"], cfg["robust_jax"]) != (jax.__version__, robust_jax.__version__)
                or cfg["checkpoint"] not in checkpoints.available()
                or sweep.checkpoint_digest(cfg["checkpoint"]) != cfg["checkpoint_sha256"]):
            continue  # another version or other weights: another key whatever the kernels
        d, dfc = cfg["data"], cfg.get("defence") or {}
        samples = {"mc_samples": dfc["mc_samples"], "eot_samples": dfc["eot_samples"]} if dfc else {}
        cell = sweep.Cell(cfg["checkpoint"], cfg["attack"], cfg["values"], params=cfg["params"], seed=cfg["seed"],
                          n=d["stop"] - d["start"], split=f"{d['split']}[{d['start']}:]", batch_size=cfg["batch_size"],
                          defence=dfc.get("kind", ""), protocol=dfc.get("protocol", ""), conv_impl="custom_vjp",
                          **samples)
        p = sweep.plan(0, cell, 1)
        assert p.config == cfg and p.key == rec["key"], f
        replanned += 1
    if not replanned:
        pytest.skip("the committed cells were computed with another JAX or library version, or other weights")


def test_cells_differentiate_the_attack_kernels_and_score_with_the_eval_kernels(tmp_path, monkeypatch, needs_tiny):
    """With an attack model whose logits are negated (``Classifier.for_use`` patched), a plain and a defended cell
    give the FGSM of the negated network scored by the real one, per example; the clean bits are the real one's."""
    import types

    import jax

    from robust_jax import attacks, checkpoints, data

    def negated(self, use, conv_impl="auto"):
        neg = lambda v, x, **kw: -self.model.apply(v, x, **kw)  # noqa: E731
        return types.SimpleNamespace(apply=neg, model=self.model, variables=self.variables, card=self.card)

    monkeypatch.setattr(checkpoints.Classifier, "for_use", negated)
    n, eps = 16, 0.2
    plain = sweep.Cell("mnist_basic_cnn", "fgsm", [eps], n=n, batch_size=n, conv_impl="custom_vjp")
    cells = [plain, dataclasses.replace(plain, defence="none", protocol=ONE_PASS)]
    summary = sweep.run(sweep.Sweep("kernels", cells), tmp_path, progress=False, log=lambda m: None, figures_=False)
    assert sorted(summary["ran"]) == [0, 1] and not summary["failed"]
    m = checkpoints.load("mnist_basic_cnn")
    x8, y = data.load("mnist", f"test[0:{n}]", cache=False)

    @functools.partial(jax.jit, static_argnums=3)
    def direct(variables, xb, key, sign):
        logits = lambda z: m.apply(variables, z)  # noqa: E731
        xa = attacks.fgsm(lambda z: sign * logits(z), xb, y, key=key, eps=eps)
        return jax.numpy.argmax(logits(xb), -1) == y, jax.numpy.argmax(logits(xa), -1) == y

    x = x8.astype(np.float32) / 255.0
    clean, robust = (np.asarray(a) for a in direct(m.variables, x, sweep.batch_key(0, 0), -1.0))
    assert not np.array_equal(robust, np.asarray(direct(m.variables, x, sweep.batch_key(0, 0), 1.0)[1]))
    rows = _table(tmp_path)
    assert len(rows) == 2
    for r in rows:
        rec = json.loads((tmp_path / "cells" / f"{r['key']}.json").read_text())["result"]
        assert np.array_equal(sweep.unbits(rec["clean_bits"], n), clean), r["cell"]
        assert np.array_equal(sweep.unbits(rec["robust_bits"][0], n), robust), r["cell"]


def test_finished_cells_are_reused_only_with_the_same_config(tmp_path, needs_tiny):
    p = sweep.plan(0, sweep.Cell("mnist_basic_cnn", "fgsm", [0.1], n=16), 1)
    f = tmp_path / "cells" / f"{p.key}.json"
    assert sweep.read_cell(tmp_path, p) is None
    sweep.atomic_write(f, json.dumps({"key": p.key, "config": {**p.config, "seed": 5}}))
    assert sweep.read_cell(tmp_path, p) is None  # a file under the key with another config is not silently reused
    f.write_text("{truncated")
    assert sweep.read_cell(tmp_path, p) is None
    sweep.atomic_write(f, json.dumps({"key": p.key, "config": p.config, "result": {}}))
    assert sweep.read_cell(tmp_path, p)["key"] == p.key
    assert [x.name for x in (tmp_path / "cells").iterdir()] == [f.name]  # no temporary file left


def test_launcher_detection(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_")):
            monkeypatch.delenv(k)
    assert sharding.launcher() is None
    slurm = {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    assert sharding.launcher() is None  # one task: a plain process
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert sharding.launcher() == "slurm"
    for k in slurm:
        monkeypatch.delenv(k)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t0")
    assert sharding.launcher() is None
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t0,t1,t2,t3")
    assert sharding.launcher() == "tpu"


def test_initialize_distributed_arguments(monkeypatch):
    calls = []
    monkeypatch.setattr(sharding.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(sharding, "launcher", lambda: None)
    assert sharding.initialize_distributed() is False  # a plain process: nothing to join
    assert sharding.initialize_distributed("h:1", 2, 0, mode="off") is False
    with pytest.raises(ValueError, match="coordinator_address"):
        sharding.initialize_distributed(num_processes=2)
    assert sharding.initialize_distributed("h:1", 2, 1) is True
    assert calls[-1]["coordinator_address"] == "h:1" and calls[-1]["process_id"] == 1
    monkeypatch.setattr(sharding, "launcher", lambda: "slurm")
    assert sharding.initialize_distributed() is True and calls[-1]["coordinator_address"] is None
    assert len(calls) == 2


def test_single_process_rows():
    n = sharding.num_devices(sharding.global_mesh())
    assert sharding.process_rows(4 * n) == (0, 4 * n)
    assert sharding.per_process(3).tolist() == [3] and sharding.all_processes(True)


def test_shipped_configs_resolve(needs_tiny):
    from experiments.sweep import SWEEPS_DIR, load_config
    from robust_jax import checkpoints

    configs = {p.stem: load_config(p.stem) for p in SWEEPS_DIR.glob("*.py") if p.stem != "__init__"}
    assert {"cifar10_robustness_curve", "cifar10_autoattack", "energy_lambda", "uncertainty_fgsm",
            "uncertainty_grid"} <= set(configs)
    cifar = [c for c in checkpoints.available() if checkpoints.read_card(c)["dataset"] == "cifar10"]
    curve = configs["cifar10_robustness_curve"]
    assert sorted(c.checkpoint for c in curve.cells) == sorted(cifar)
    assert all(c.values[0] == 0 and abs(c.values[-1] - 16 / 255) < 1e-12 and c.attack == "pgd" for c in curve.cells)
    (lam,) = configs["energy_lambda"].cells
    assert lam.checkpoint == "cifar10_resnet10" and lam.values == (0.1, 0.3, 1.0, 3.0, 10.0)
    assert lam.params["eps"] == 8 / 255
    assert {c.checkpoint for c in configs["uncertainty_fgsm"].cells} == {"mnist_basic_cnn", "mnist_basic_cnn_hetero"}
    # the uncertainty study's grid: its checkpoints per defence, every defence x protocol x attack on both datasets
    import ast

    study = ast.parse((ROOT / "experiments" / "uncertainty_robustness.py").read_text())
    (picks,) = [ast.literal_eval(n.value) for n in study.body if isinstance(n, ast.Assign)
                and [getattr(t, "id", None) for t in n.targets] == ["CHECKPOINTS"]]
    grid = configs["uncertainty_grid"].cells
    seen = {}
    for c in grid:
        ds = checkpoints.read_card(c.checkpoint)["dataset"]
        assert picks[ds][c.defence] == c.checkpoint
        assert c.split == "test[150:]" and c.seed == 0 and c.mc_samples == 20 and c.eot_samples == 8
        seen.setdefault((ds, c.attack, c.defence), set()).add(c.protocol)
    assert set(seen) == {(ds, a, d) for ds in picks for a in ("fgsm", "pgd") for d in evaluate.DEFENCES}
    for (_, _, d), protocols in seen.items():  # the deterministic network: one cell (its protocols are one attack)
        assert protocols == ({ONE_PASS} if d == "none" else set(evaluate.PROTOCOLS))
    for s in configs.values():
        keys = [sweep.plan(i, c, 4).key for i, c in enumerate(s.cells)]
        assert len(set(keys)) == len(keys)


# ---------------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_reference_run_outputs(reference):
    out, summary = reference
    assert sorted(summary["ran"]) == list(range(TINY_CELLS)) and not summary["failed"] and not summary["reused"]
    # one executable per (architecture, attack, number of eps values, defence): PGD x2 eps (cells 0, 1), PGD x1
    # (2, 3), FGSM, and one per defended cell; and the AutoAttack cell's stages (compiled on the host)
    assert summary["compiles"]["executables_compiled_this_run"] == 6
    assert summary["devices"] == 1 and summary["processes"] == 1
    assert summary["examples_loaded_per_process"] == [32 + 32]  # the AutoAttack cell loads its slice whole
    rows = _table(out)
    assert len(rows) == 14 and all(r["n"] == 32 for r in rows)
    with open(out / "table.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 14
    assert [(r["defence"], r["protocol"]) for r in csv_rows[-6:-2]] == [("epistemic", ADAPTIVE)] * 2 + [
        ("aleatoric", ONE_PASS)] * 2
    aa = [r for r in rows if r["attack"] == "autoattack"]
    assert [r["value"] for r in aa] == [0.1, 0.3] and aa[1]["robust_correct"] <= aa[0]["robust_correct"]
    assert {(r["defence"], r["protocol"], r["mc_samples"]) for r in csv_rows[:8]} == {("", "", "")}
    for r in rows:
        assert 0 <= r["ci_low"] <= r["robust_accuracy"] <= r["ci_high"] <= 1
        if not r["defence"]:  # a deterministic prediction; a stochastic one may be right after an attack only
            assert r["robust_accuracy"] <= r["clean_accuracy"] + 1e-12
    for group in ("pgd", "pgd_single", "fgsm", "defended", "autoattack"):
        png = out / f"{group}.png"
        assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_eps_array_cell_equals_single_eps_cells(reference):
    out, _ = reference
    rows = _table(out)
    array_cell = {r["value"]: r for r in rows if r["cell"] == 0}
    singles = {r["value"]: r for r in rows if r["cell"] in (2, 3)}
    assert set(array_cell) == set(singles) == {0.1, 0.3}
    for v in (0.1, 0.3):
        assert array_cell[v]["robust_correct"] == singles[v]["robust_correct"]
    # per example, not only in count
    recs = {r["cell"]: json.loads((out / "cells" / f"{r['key']}.json").read_text()) for r in rows}
    bits = {c: recs[c]["result"]["robust_bits"] for c in (0, 2, 3)}
    assert bits[0] == [bits[2][0], bits[3][0]]
    mask = sweep.unbits(recs[0]["result"]["robust_bits"][0], 32)
    assert mask.sum() == array_cell[0.1]["robust_correct"]


@pytest.mark.slow
def test_four_devices_give_the_same_table(reference, tmp_path):
    out, _ = reference
    summary = _run(tmp_path, devices=4)
    assert summary["devices"] == 4 and summary["processes"] == 1
    assert sweep.comparable(_table(tmp_path)) == sweep.comparable(_table(out))
    assert {r["devices"] for r in _table(tmp_path)} == {4}


@pytest.mark.slow
def test_two_processes_give_the_same_table(reference, tmp_path):
    """Two processes x 2 host devices, jax.distributed over 127.0.0.1: one 4-device mesh, each process loading half
    of every batch; process 0 writes the table."""
    out, _ = reference
    port = _free_port()
    procs = [subprocess.Popen(_cmd(tmp_path, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                   f"--process_id={i}"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(2), cwd=ROOT) for i in (0, 1)]
    try:
        results = [p.communicate(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 4
    # each process loads only its rows of the in-graph cells' batches, and the AutoAttack cell's 32 examples whole
    assert summary["examples_loaded_per_process"] == [16 + 32, 16 + 32]
    assert sweep.comparable(_table(tmp_path)) == sweep.comparable(_table(out))
    assert {(r["devices"], r["processes"]) for r in _table(tmp_path)} == {(4, 2)}


@pytest.mark.slow
def test_killed_sweep_resumes_with_the_missing_cells(reference, tmp_path):
    out, _ = reference
    proc = subprocess.Popen(_cmd(tmp_path, "--pause_after_cell=3"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env(1), cwd=ROOT)
    cells = tmp_path / "cells"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if cells.is_dir() and len(list(cells.glob("*.json"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(f.name for f in cells.glob("*.json"))
    assert 2 <= len(finished) < TINY_CELLS
    for f in cells.glob("*.json"):
        json.loads(f.read_text())  # every finished file is complete
    assert not (tmp_path / "table.json").exists()

    summary = _run(tmp_path)
    assert len(summary["reused"]) == len(finished) and len(summary["ran"]) == TINY_CELLS - len(finished)
    assert sorted(summary["reused"] + summary["ran"]) == list(range(TINY_CELLS)) and not summary["failed"]
    assert sweep.comparable(_table(tmp_path)) == sweep.comparable(_table(out))
    statuses = [r["status"] for r in _table(tmp_path)]
    assert statuses.count("reused") > 0 and statuses.count("ran") > 0

    again = _run(tmp_path)  # everything finished: nothing runs, nothing compiles
    assert again["ran"] == [] and len(again["reused"]) == TINY_CELLS
    assert again["compiles"]["executables_compiled_this_run"] == 0 and again["compiles"]["xla_backend_compiles"] == 0


@pytest.mark.slow
def test_failing_cells_are_recorded_and_the_sweep_goes_on(tmp_path, needs_tiny):
    grid = sweep.Sweep("failing", [
        sweep.Cell("no_such_checkpoint", "fgsm", [0.1], n=16),
        sweep.Cell("mnist_basic_cnn", "pgd", [0.1], params={"steps": 1, "norm": "l3"}, n=16, batch_size=16),
        sweep.Cell("mnist_basic_cnn", "fgsm", [0.1], n=16, batch_size=16),
    ])
    summary = sweep.run(grid, tmp_path, progress=False, log=lambda m: None)
    assert summary["ran"] == [2]
    failed = {f["cell"]: f["error"] for f in summary["failed"]}
    assert set(failed) == {0, 1}
    assert "no_such_checkpoint" in failed[0] and "l3" in failed[1]
    assert [r["cell"] for r in _table(tmp_path)] == [2]
    assert json.loads((tmp_path / "summary.json").read_text())["failed"] == summary["failed"]


@pytest.mark.slow
def test_autoattack_cells_are_the_staged_host_runner(tmp_path, needs_tiny):
    """Sweep cells of attack "autoattack" (reduced budgets) are robust_jax.autoattack_eval.evaluate on the cell's
    images with PRNGKey(seed) and the dataset positions as keys, per example, at each eps (the computation of
    experiments.autoattack); per-example keys make them independent of the batch size; a slice that does not start
    at 0 keys its examples by their dataset positions; a defence is refused."""
    import jax

    from robust_jax import autoattack_eval, checkpoints, data

    params = {"version": "custom", "attacks_to_run": ["apgd-ce", "apgd-t"],
              "options": {"apgd-ce": {"steps": 3}, "apgd-t": {"steps": 3, "n_target_classes": 2}}}
    grid = sweep.Sweep("aa", [
        sweep.Cell("mnist_basic_cnn", "autoattack", [0.1, 0.3], params=params, n=16, batch_size=16),
        sweep.Cell("mnist_basic_cnn", "autoattack", [0.1], params=params, n=16, batch_size=8),
        sweep.Cell("mnist_basic_cnn", "autoattack", [0.1], params=params, n=8, split="test[8:]", batch_size=8),
    ])
    summary = sweep.run(grid, tmp_path, progress=False, log=lambda m: None)
    assert summary["ran"] == [0, 1, 2] and not summary["failed"]
    rows = _table(tmp_path)
    by = {(r["cell"], r["value"]): r["robust_correct"] for r in rows}
    assert by[(0, 0.1)] == by[(1, 0.1)]
    assert by[(0, 0.3)] <= by[(0, 0.1)]
    assert np.all([r["robust_correct"] <= r["clean_correct"] for r in rows])
    recs = {r["cell"]: json.loads((tmp_path / "cells" / f"{r['key']}.json").read_text()) for r in rows}
    assert not list((tmp_path / "cells").glob(".*"))  # the within-cell states are removed when a cell finishes

    m = checkpoints.load("mnist_basic_cnn")
    x, y = data.load("mnist", "test[0:16]")
    direct = autoattack_eval.evaluate(autoattack_eval.defence_builder("none", m, 1), m.variables, data.to_float(x), y,
                                      key=jax.random.PRNGKey(0), norm="linf", eps=0.1, batch_size=16,
                                      progress=False, **{k: params[k] for k in ("version", "attacks_to_run",
                                                                                 "options")})
    robust = direct["robust"]["apgd-t"]
    assert 0 < robust.sum() < direct["robust"]["clean"].sum()  # the check can fail: some points fall, some hold
    np.testing.assert_array_equal(sweep.unbits(recs[0]["result"]["robust_bits"][0], 16), robust)
    np.testing.assert_array_equal(sweep.unbits(recs[0]["result"]["clean_bits"], 16), direct["robust"]["clean"])
    np.testing.assert_array_equal(sweep.unbits(recs[2]["result"]["robust_bits"][0], 8), robust[8:])
    stages = recs[0]["result"]["attack"]["stages"]
    assert [s["eps"] for s in stages] == [0.1, 0.3]
    assert stages[0]["robust_accuracy"]["apgd-t"] == pytest.approx(robust.mean())
    with pytest.raises(ValueError, match="experiments.autoattack"):
        sweep.plan(0, dataclasses.replace(grid.cells[0], defence="epistemic", protocol=ADAPTIVE), 1)


@pytest.mark.slow
def test_autoattack_cell_resumes_inside(tmp_path, monkeypatch, needs_tiny):
    """A sweep killed in the middle of an AutoAttack cell (second chunk of APGD-CE) continues from the cell's state
    file and gives the uninterrupted cell's result, per example."""
    from robust_jax import runner

    params = {"version": "custom", "attacks_to_run": ["apgd-ce", "apgd-t"],
              "options": {"apgd-ce": {"steps": 2}, "apgd-t": {"steps": 2, "n_target_classes": 2}}}
    grid = sweep.Sweep("aa", [sweep.Cell("mnist_basic_cnn", "autoattack", [0.1], params=params, n=16, batch_size=8)])
    whole = sweep.run(grid, tmp_path / "whole", progress=False, log=lambda m: None)
    assert whole["ran"] == [0]
    real, calls = runner.run_attack, []

    def dying(*a, **k):
        calls.append(k["desc"])
        if calls.count("apgd-ce") == 2:
            raise KeyboardInterrupt  # not an Exception: the sweep does not record it as a failed cell
        return real(*a, **k)

    monkeypatch.setattr(runner, "run_attack", dying)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(grid, tmp_path / "killed", progress=False, log=lambda m: None)
    (state,) = (tmp_path / "killed" / "cells").glob(".*.state.npz")
    assert json.loads(str(np.load(state)["meta"]))["attacks"]["apgd-ce"]["position"] == 8
    again = []
    monkeypatch.setattr(runner, "run_attack", lambda *a, **k: again.append(k["desc"]) or real(*a, **k))
    resumed = sweep.run(grid, tmp_path / "killed", progress=False, log=lambda m: None)
    assert resumed["ran"] == [0] and not list((tmp_path / "killed" / "cells").glob(".*"))
    assert again.count("apgd-ce") == 1  # only the chunk that was not finished
    a, b = (json.loads(next((d / "cells").glob("*.json")).read_text())["result"] for d in
            (tmp_path / "whole", tmp_path / "killed"))
    assert a["clean_bits"] == b["clean_bits"] and a["robust_bits"] == b["robust_bits"]


@pytest.mark.slow
def test_defended_cells_equal_direct_calls(tmp_path, needs_tiny):
    """A defended cell is its Defence attacked and evaluated directly (``Defence.attacked(protocol)``, through the
    cell's attack kernels, given to the attack with the batch key, each eps on its own; the defended prediction
    ``Defence.probs`` with ``sweep.prediction_key`` of it), per example, for every batch; another seed gives other
    draws and another result; the deterministic network under either protocol is the plain cell."""
    import jax

    from robust_jax import attacks, checkpoints, data

    n, bs, eps, pgd = 16, 8, [0.1, 0.2], {"steps": 2, "rel_step_size": 0.25}
    epistemic = sweep.Cell("mnist_basic_cnn", "pgd", eps, params=pgd, n=n, batch_size=bs, defence="epistemic",
                           protocol=ADAPTIVE, mc_samples=3, eot_samples=2)
    none = dataclasses.replace(epistemic, defence="none", protocol=ONE_PASS)
    cells = [
        epistemic,
        dataclasses.replace(epistemic, seed=1),
        dataclasses.replace(epistemic, attack="fgsm", params={}, protocol=ONE_PASS),
        dataclasses.replace(epistemic, checkpoint="mnist_basic_cnn_hetero", attack="fgsm", params={},
                            defence="aleatoric"),
        dataclasses.replace(epistemic, checkpoint="mnist_basic_cnn_hetero", defence="aleatoric", protocol=ONE_PASS),
        none,
        dataclasses.replace(none, protocol=ADAPTIVE),
        dataclasses.replace(none, defence="", protocol=""),  # the plain network
    ]
    summary = sweep.run(sweep.Sweep("defended", cells), tmp_path, progress=False, log=lambda m: None)
    assert sorted(summary["ran"]) == list(range(len(cells))) and not summary["failed"]
    rows = _table(tmp_path)
    bits = {}
    for r in rows:
        rec = json.loads((tmp_path / "cells" / f"{r['key']}.json").read_text())["result"]
        bits[r["cell"]] = (sweep.unbits(rec["clean_bits"], n), np.stack([sweep.unbits(h, n)
                                                                          for h in rec["robust_bits"]]))
    x8, y = data.load("mnist", f"test[0:{n}]", cache=False)
    x = x8.astype(np.float32) / 255.0
    models = {c: checkpoints.load(c) for c in ("mnist_basic_cnn", "mnist_basic_cnn_hetero")}

    def direct(cell):
        m = models[cell.checkpoint]
        d = evaluate.Defence(cell.defence or "none", m, cell.mc_samples, cell.eot_samples,
                             attack_model=m.for_use("attack", cell.conv_impl))

        @jax.jit
        def batch(variables, xb, yb, key):
            correct = lambda z: d.probs(variables, z, sweep.prediction_key(key))[0].mean(0).argmax(-1) == yb
            logits_fn = d.attacked(cell.protocol or ONE_PASS)(variables)
            adv = [attacks.fgsm(logits_fn, xb, yb, key=key, eps=e) if cell.attack == "fgsm" else
                   attacks.pgd(logits_fn, xb, yb, key=key, eps=e, step_size=0.25 * e, steps=2) for e in cell.values]
            return correct(xb), jax.numpy.stack([correct(a) for a in adv])

        out = [batch(m.variables, x[b:b + bs], y[b:b + bs], sweep.batch_key(cell.seed, b // bs))
               for b in range(0, n, bs)]
        return np.concatenate([np.asarray(c) for c, _ in out]), np.concatenate([np.asarray(r) for _, r in out], 1)

    for i, cell in enumerate(cells):
        clean, robust = direct(cell)
        assert np.array_equal(bits[i][0], clean), f"cell {i}: clean"
        assert np.array_equal(bits[i][1], robust), f"cell {i}: robust"
    # the keys are used: seed 1 draws other dropout masks (attack and prediction) and the result changes
    assert not (np.array_equal(bits[0][0], bits[1][0]) and np.array_equal(bits[0][1], bits[1][1]))
    for i in (6, 7):
        assert np.array_equal(bits[i][0], bits[5][0]) and np.array_equal(bits[i][1], bits[5][1])
    by = {(r["cell"], r["value"]): r for r in rows}
    assert [(by[i, 0.1]["defence"], by[i, 0.1]["protocol"]) for i in (0, 3, 7)] == [
        ("epistemic", ADAPTIVE), ("aleatoric", ADAPTIVE), ("", "")]
    assert by[0, 0.1]["mc_samples"] == 3 and by[0, 0.1]["eot_samples"] == 2 and by[7, 0.1]["mc_samples"] is None
