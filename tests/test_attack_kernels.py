"""Per-use convolution kernels in the studies: the attacks differentiate the attack model (``m.for_use("attack")``),
every reported number (accuracy, logits, ECE, uncertainty) comes from the evaluation model; the boundary attacks
(``evaluate.BOUNDARY_ATTACKS``) and forward-only searches use the evaluation model too; cached PGD results record the
attack kernels and are recomputed when those differ (tradeoff, calibration), and the committed caches stay valid
for ``--conv_impl=custom_vjp``.

Each check runs in a fresh process (``python tests/test_attack_kernels.py <check>``): a study defines its command-line
flags when imported and absl's flags are global, so two studies cannot be imported into one process. The checkpoint
is a pair of fake linear classifiers sharing one weight matrix: the evaluation model (``custom_vjp``) and the attack
model (``fake_bf16``), whose logits carry a huge bias towards class 0, which no label is, so a number reported
through it is wrong (accuracy 0). Each model logs, when the program runs, every input gradient taken through it
(``eval-grad`` / ``attack-grad``), and every ``runner.run_attack`` call is logged with its description: the log
says which model each attack differentiated, and that forward-only searches differentiated none.
"""

import json
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ATTACK_KERNELS = "fake_bf16"


def _check(name: str):
    proc = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith(f"{name}: ok"), proc.stdout[-2000:]


def test_robustness_kernels():
    _check("robustness")


def test_uncertainty_robustness_kernels():
    _check("uncertainty_robustness")


def test_tradeoff_kernels_and_cache():
    _check("tradeoff")


def test_calibration_kernels_and_cache():
    _check("calibration")


def test_energy_detection_kernels():
    _check("energy_detection")


# ------------------------------------------------------------------------------- the fakes (in the subprocess)
def _tap(tag: str, log: list):
    """Identity whose backward pass logs `tag` when it runs (an input gradient taken through this point)."""
    import jax

    @jax.custom_vjp
    def tap(x):
        return x

    def bwd(_, g):
        jax.debug.callback(lambda: log.append(tag))
        return (g,)

    tap.defvjp(lambda x: (x, None), bwd)
    return tap


class Fake:
    """A linear classifier posing as a ``checkpoints.Classifier``: ``flat(x) @ variables["w"] + bias``."""

    def __init__(self, role: str, conv_impl: str, bias, variables, log: list, twin=None):
        self.role, self.bias, self.variables, self.log, self.twin = role, bias, variables, log, twin
        self.model = types.SimpleNamespace(conv_impl=conv_impl)
        self.card = {"name": f"fake_{role}", "architecture": {}, "hyperparameters": {}}
        self._tap = _tap(f"{role}-grad", log)

    def apply(self, variables, x, **_):
        return self._tap(x).reshape(x.shape[0], -1) @ variables["w"] + self.bias

    def predict(self, x, batch_size=500, *, mesh=None):
        import jax.numpy as jnp
        import numpy as np

        assert self.role == "eval", "a reported prediction came from the attack model"
        self.log.append("predict")
        return np.asarray(self.apply(self.variables, jnp.asarray(x, jnp.float32)))

    def for_use(self, use, conv_impl="auto"):
        return self.twin


def _fakes(attack_kernels: str = ATTACK_KERNELS, n: int = 8, shape=(8, 8, 3)):
    """(eval model, attack model, x, y, log): `n` images of `shape` in [0, 1], labels = the evaluation model's
    predictions (its clean accuracy is 1; the attack model predicts class 0, never a label)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x = np.asarray(jax.random.uniform(k1, (n, *shape)), np.float32)
    w = jax.random.normal(k2, (int(np.prod(shape)), 10)).at[:, 0].set(-1.0)  # class 0 never wins on [0, 1] images
    variables = {"w": w}
    log = []
    ma = Fake("attack", attack_kernels, jnp.zeros(10).at[0].set(1e4), variables, log)
    m = Fake("eval", "custom_vjp", jnp.zeros(10), variables, log, twin=ma)
    y = np.asarray(jnp.argmax(x.reshape(n, -1) @ w, -1), np.int32)
    assert not (y == 0).any()
    return m, ma, x, y, log


def _spy_runs(log: list) -> None:
    """Log ``run <desc>`` before and ``end`` after every ``runner.run_attack`` (also as imported by evaluate)."""
    from robust_jax import evaluate, runner

    def wrap(f):
        def run(attack, *args, desc="attack", **kw):
            log.append(f"run {desc}")
            try:
                return f(attack, *args, desc=desc, **kw)
            finally:
                log.append("end")
        return run

    runner.run_attack, evaluate.run_attack = wrap(runner.run_attack), wrap(evaluate.run_attack)


def _grads_per_run(log: list) -> tuple[list, set]:
    """([(desc, {gradient tags})] per run in order, {gradient tags outside every run})."""
    runs, outside, current = [], set(), None
    for e in log:
        if e.startswith("run "):
            current = (e[4:], set())
        elif e == "end":
            runs.append(current)
            current = None
        elif e.endswith("-grad"):
            (current[1] if current is not None else outside).add(e)
    return runs, outside


def _flags(**values) -> None:
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    for k, v in values.items():
        setattr(flags.FLAGS, k, v)


# ---------------------------------------------------------------------------------------------------- checks
def check_robustness():
    import jax

    from experiments import robustness
    from robust_jax import evaluate

    m, ma, x, y, log = _fakes()
    _spy_runs(log)
    cfg = evaluate.AttackConfig(eps=0.3, pgd_steps=2, cw_steps=2, cw_binary_search_steps=1, batch_size=8)
    rows = robustness.attack_rows(m, ma, ["fgsm", "pgd", "cw_l2", "jsma"], x, y, key=jax.random.PRNGKey(0),
                                  cfg=cfg, x_holdout=None)
    runs, outside = _grads_per_run(log)
    assert [d for d, _ in runs] == ["fgsm", "pgd", "cw_l2", "jsma"], runs
    assert [g for _, g in runs] == [{"attack-grad"}, {"attack-grad"}, {"eval-grad"}, {"eval-grad"}], runs
    assert outside == {"attack-grad"}  # the gradient-masking diagnostics look at what the attacks differentiate
    assert all(r["accuracy"] == 1.0 for r in rows)  # the evaluation model's clean accuracy (the attack model's: 0)
    assert [r["conv_impl"] for r in rows] == [ATTACK_KERNELS, ATTACK_KERNELS, "custom_vjp", "custom_vjp"]
    from experiments import cli

    assert cli.attacked_kernels("blackbox", m, ma) is None
    assert cli.kernels(m, ma) == {"eval": "custom_vjp", "attack": ATTACK_KERNELS}


def check_uncertainty_robustness():
    import jax

    from experiments import uncertainty_robustness as ur
    from robust_jax import evaluate

    _flags(protocols=["single_pass", "adaptive"], mc_samples=2, eot_samples=2)
    m, ma, x, y, log = _fakes()
    _spy_runs(log)
    defence = ur.make_defence("none", m, "auto")
    assert defence.model is m and defence.attack_model is ma
    s = types.SimpleNamespace(dataset="mnist", attacks=["fgsm", "cw_l2"], eps=0.3, n=len(x), n_slow=len(x),
                              sweep=[0.0, 0.1, 0.3], cfg=evaluate.AttackConfig(eps=0.3, cw_steps=2,
                                                                               cw_binary_search_steps=1, batch_size=8))
    study = types.SimpleNamespace(rows=[], sweeps={}, scores={}, correct={}, warnings={}, conv={})
    ur.attack_defence(defence, 0, s, x, y, None, jax.random.PRNGKey(0), study)
    runs, outside = _grads_per_run(log)
    # single pass: FGSM, CW-L2, then the FGSM eps sweep ("attack"); the deterministic network's adaptive rows repeat
    assert [(d, g) for d, g in runs] == [("fgsm", {"attack-grad"}), ("cw_l2", {"eval-grad"}),
                                         ("attack", {"attack-grad"})], runs
    assert outside <= {"attack-grad"}
    assert {r["conv_impl"] for r in study.rows if r["attack"] == "fgsm"} == {ATTACK_KERNELS}
    assert {r["conv_impl"] for r in study.rows if r["attack"] == "cw_l2"} == {"custom_vjp"}
    # every accuracy is the defended prediction's through the evaluation model (through the attack model: 0)
    assert all(r["accuracy"] == 1.0 for r in study.rows)
    assert study.sweeps["none (single_pass)"][0] == 1.0
    assert len(study.scores["none"]["clean"]["predictive_entropy"]) == len(x)


def check_tradeoff():
    from experiments import cli, tradeoff

    m, ma, x, y, log = _fakes()
    _spy_runs(log)
    kw = dict(families=["noise"], budgets=[8 / 255, 2 / 255], pgd_steps=2, k=2, grid=True, seed=0, batch_size=8)
    evals = tradeoff.evaluate_model(m, ma, x, y, {}, **kw)
    runs, outside = _grads_per_run(log)
    assert not outside
    pgd = [g for d, g in runs if d.startswith("pgd")]
    assert pgd == [{"attack-grad"}], runs  # both budgets in one call, through the attack model
    assert all(not g for d, g in runs if not d.startswith("pgd")), runs  # the spatial searches: forward passes only
    assert {d.split()[0] for d, _ in runs} >= {"pgd", "noise", "attack", "grid"}
    keys = [tradeoff.pgd_key(2, e) for e in kw["budgets"]]
    assert all(evals[k]["conv_impl"] == ATTACK_KERNELS for k in keys)
    # every accuracy is the evaluation model's (through the attack model each one would be 0)
    assert evals["clean"] == 1.0 and evals["noise_worst_of_2"]["accuracy"] > 0
    assert evals["rotation_translation_grid"]["mean_accuracy"] > 0 and max(evals["noise_severities"]["accuracy"]) > 0

    # the cache: an entry with the current kernels is reused, one with other kernels (or none recorded, i.e.
    # custom_vjp) is recomputed
    log.clear()
    again = tradeoff.evaluate_model(m, ma, x, y, json.loads(json.dumps(evals)), **kw)
    assert again == evals and not any(e.startswith("run ") for e in log)
    stale = json.loads(json.dumps(evals))
    stale[keys[0]] = {"accuracy": -1.0, "eps": 8 / 255, "steps": 2}  # written before the kernels were recorded
    stale[keys[1]]["accuracy"] = -2.0  # the current kernels: kept as it is
    log.clear()
    out = tradeoff.evaluate_model(m, ma, x, y, stale, **kw)
    assert [e for e in log if e.startswith("run ")] == ["run pgd 8/255"], log
    assert out[keys[0]]["accuracy"] >= 0 and out[keys[0]]["conv_impl"] == ATTACK_KERNELS
    assert out[keys[1]]["accuracy"] == -2.0
    assert {k: v for k, v in out.items() if not k.startswith("pgd")} == {k: v for k, v in evals.items()
                                                                          if not k.startswith("pgd")}
    assert tradeoff.missing_pgd(stale | {keys[1]: {**stale[keys[1]], "conv_impl": "xla"}}, kw["budgets"], 2,
                                ATTACK_KERNELS) == [2 / 255]
    # with custom_vjp attack kernels, entries without a record are current
    m2, ma2, x2, y2, log2 = _fakes("custom_vjp")
    legacy = {k: ({kk: vv for kk, vv in v.items() if kk != "conv_impl"} if k.startswith("pgd") else v)
              for k, v in evals.items()}
    _spy_runs(log2)
    assert tradeoff.evaluate_model(m2, ma2, x2, y2, json.loads(json.dumps(legacy)), **kw) == legacy
    assert not any(e.startswith("run ") for e in log2)

    # the committed caches: entirely current for --conv_impl=custom_vjp (and only for it)
    folder = ROOT / "results" / "tradeoff" / "cifar10"
    if (folder / "results.json").is_file():
        settings = json.loads((folder / "results.json").read_text())["settings"]
        budgets = [settings["eps"], *settings["curve_eps"]]
        record = {k: v for k, v in settings.items() if k != "curve_eps"}
        files = sorted((folder / "evals").glob("*.json"))
        assert files
        for f in files:
            cached = json.loads(f.read_text())
            assert cached["settings"] == record, f
            assert tradeoff.missing_pgd(cached["evals"], budgets, settings["pgd_steps"], "custom_vjp") == [], f
            assert tradeoff.missing_pgd(cached["evals"], budgets, settings["pgd_steps"], "onednn_bf16") == budgets
    assert cli.attack_kernels_of({"accuracy": 0.5}) == "custom_vjp"


def check_calibration():
    from experiments import calibration as cal

    m, ma, x, y, log = _fakes()
    _spy_runs(log)
    perts = ["clean", "pgd_2", "noise_0.1", "rotation"]
    saved = []
    kw = dict(seed=0, num_bins=5, batch_size=8)
    temp, rows = cal.calibrate(m, ma, x, y, x, y, {}, perts, save=saved.append, **kw)
    runs, outside = _grads_per_run(log)
    assert runs == [("pgd_2", {"attack-grad"})] and not outside, (runs, outside)
    assert rows["clean"]["accuracy"] == 1.0  # the evaluation model's logits (the attack model's: accuracy 0)
    assert rows["pgd_2"]["conv_impl"] == ATTACK_KERNELS
    assert not any("conv_impl" in rows[p] for p in ("clean", "noise_0.1", "rotation"))
    assert len(saved) == len(perts) and saved[-1]["rows"] == rows and saved[-1]["temperature"] == temp

    # the cache: current rows are reused; a PGD row with other kernels (none recorded: custom_vjp) is recomputed
    log.clear()
    cached = json.loads(json.dumps({"temperature": temp, "rows": rows}))
    assert cal.calibrate(m, ma, x, y, x, y, cached, perts, save=saved.append, **kw) == (temp, rows)
    assert not any(e.startswith("run ") for e in log) and len(saved) == len(perts)
    cached["rows"]["pgd_2"] = {k: v for k, v in rows["pgd_2"].items() if k != "conv_impl"} | {"ece": -1.0}
    cached["rows"]["rotation"]["ece"] = -2.0
    _, again = cal.calibrate(m, ma, x, y, x, y, cached, perts, save=saved.append, **kw)
    assert [e for e in log if e.startswith("run ")] == ["run pgd_2"]
    assert again["pgd_2"]["ece"] >= 0 and again["pgd_2"]["conv_impl"] == ATTACK_KERNELS
    assert again["rotation"]["ece"] == -2.0
    assert cal.stale({"pgd_2": {}}, "pgd_2", "custom_vjp") is False and cal.stale({}, "clean", "custom_vjp") is True
    assert cal.stale({"pgd_2": {"conv_impl": "xla"}}, "pgd_2", "custom_vjp") is True
    assert cal.stale({"rotation": {}}, "rotation", "onednn_bf16") is False  # no attack: any kernels

    # the committed caches: entirely current for --conv_impl=custom_vjp (their PGD rows stale for other kernels)
    files = sorted((ROOT / "results" / "calibration" / "cifar10" / "evals").glob("*.json"))
    for f in files:
        cached = json.loads(f.read_text())["rows"]
        assert not [p for p in cal.PERTURBATIONS if cal.stale(cached, p, "custom_vjp")], f
        assert [p for p in cal.PERTURBATIONS if cal.stale(cached, p, "onednn_bf16")] == ["pgd_2", "pgd_8"], f


def check_energy_detection():
    import jax
    import numpy as np

    from experiments import energy_detection as ed

    _flags(batch_size=8, le_steps=2)
    m, ma, x, y, log = _fakes()
    _spy_runs(log)
    s = types.SimpleNamespace(eps=8 / 255, big_eps=16 / 255, step_size=2 / 255, curve_steps=[0, 1, 2],
                              det_steps=[1, 2], fixed=2, lams=[1.0])
    logits, _ = ed.attack_logits(m, ma, s, x, y, x, y, jax.random.PRNGKey(0))
    runs, outside = _grads_per_run(log)
    assert len(runs) == 5 and all(g == {"attack-grad"} for _, g in runs) and not outside, runs
    # the logits reported are the evaluation model's (the attack model's all say class 0)
    assert np.array_equal(np.asarray(logits["test"][0]).argmax(-1), y)
    assert (np.asarray(logits["le"][1.0]).argmax(-1) != 0).all()


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)
    check = sys.argv[1]
    {"robustness": check_robustness, "uncertainty_robustness": check_uncertainty_robustness,
     "tradeoff": check_tradeoff, "calibration": check_calibration,
     "energy_detection": check_energy_detection}[check]()
    print(f"{check}: ok")
