"""AutoAttack over a dataset on the host: the staged protocol, data-parallel, resumable.

    from robust_jax import autoattack_eval
    res = autoattack_eval.evaluate(autoattack_eval.defence_builder("none", classifier, 20), classifier.variables,
                                   x, y, key=jax.random.PRNGKey(0), norm="linf", eps=8 / 255, state="run/state.npz")

The host-side counterpart of :func:`robust_jax.attacks.autoattack` (which runs every attack of the protocol on every
point of one batch, inside one compiled function): here each attack runs only on the points still robust after the
ones before it — the fooled points are dropped between attacks and the rest attacked in chunks of at most
`batch_size` examples, each chunk split over every device of `mesh` (:func:`robust_jax.runner.run_attack`). On an
adversarially trained network, where most points survive APGD-CE but only a third of them survive everything, this
is what makes a full run affordable. Used by ``python -m experiments.autoattack`` and by the sweep's ``autoattack``
cells (:mod:`robust_jax.sweep`).

**Determinism**: example *i* draws its randomness from ``fold_in(fold_in(key, attack), i)`` with *i* its entry of
`indices` (default: its position in `x`), so the result depends neither on the chunking, nor on `batch_size`, nor on
the device count, nor on resuming (up to the floating-point effect of the batch shape on the network's arithmetic).

**Resumption**: with `state` (a path), the per-attack robust masks, the adversarial examples found so far and the
timings are written atomically after every chunk; a call with the same configuration continues where a killed one
stopped (another configuration raises). In a multi-process run process 0 alone writes it and its contents are
broadcast to every process when read, so the state directory need not be shared.

**Multi-process**: with a `mesh` over the devices of several processes (``sharding.global_mesh()`` after
``jax.distributed.initialize``), every process calls :func:`evaluate` with the same (full) `x` and `y`; each chunk
is assembled from every process's rows of it and the results are gathered to every process, so all processes keep
the same robust masks and agree on the next chunk.
"""

from __future__ import annotations

import functools
import io
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from robust_jax import runner, sharding
from robust_jax.attacks._core import EOT, is_success, predict
from robust_jax.attacks.autoattack import checks, passes, protocol, run_protocol_attack, square_flag
from robust_jax.attacks.diagnostics import is_stochastic
from robust_jax.evaluate import Defence
from robust_jax.models import logits_of


# ------------------------------------------------------------------------------------------------------ state
def _save_state(path: Path, arrays: dict, meta: dict) -> None:
    """Write the state atomically (a temporary file in the same directory, then os.replace); process 0 only."""
    if not sharding.is_main_process():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    np.savez(tmp, meta=np.asarray(json.dumps(meta)), **arrays)
    os.replace(tmp, path)


def _load_state(path: Path):
    """(arrays, meta) from `path`, or None; process 0 reads it and broadcasts the bytes to every process."""
    main = sharding.is_main_process()
    blob = path.read_bytes() if main and path.is_file() else b""
    if jax.process_count() > 1:
        size = int(sharding.broadcast_from_main(np.asarray(len(blob), np.int64)))
        if size:
            local = np.frombuffer(blob, np.uint8) if main else np.zeros(size, np.uint8)
            blob = sharding.broadcast_from_main(local).tobytes()
        else:
            blob = b""
    if not blob:
        return None
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "meta"}
        meta = json.loads(str(z["meta"]))
    return arrays, meta


# ---------------------------------------------------------------------------------------------------- models
def defence_builder(kind: str, model, eot_samples: int):
    """``variables -> logits_fn`` that AutoAttack attacks: the network itself for ``kind="none"``, else the
    randomised defence (:class:`robust_jax.evaluate.Defence`: ``epistemic`` MC-dropout or ``aleatoric`` logit
    draws) as an :class:`~robust_jax.attacks.EOT` over `eot_samples` samples (its ``adaptive`` protocol). `model`
    is a loaded :class:`robust_jax.checkpoints.Classifier` (or anything with ``.apply``)."""
    if kind == "none":
        return lambda v: functools.partial(model.apply, v)
    return Defence(kind, model, eot_samples=eot_samples).attacked("adaptive")


_ATTACK_FNS: dict = {}


def _attack_fn(logits_builder, name, params, key, norm, eps):
    """``attack(variables, x, packed, _) -> (x_adv, fooled)`` for ``runner.run_attack``; ``packed`` holds (label,
    index) rows, the index giving each example its key. One function object per configuration, so that repeated
    evaluations in a process (other checkpoints of one architecture, another call) reuse the compiled attack."""
    cache_key = (id(logits_builder), name, json.dumps(params, sort_keys=True), norm, float(eps),
                 tuple(np.asarray(key).ravel().tolist()))
    hit = _ATTACK_FNS.get(cache_key)
    if hit is not None and hit[0] is logits_builder:
        return hit[1]

    def attack(v, xb, yb, _key):
        f = logits_builder(v)
        labels, idx = yb[:, 0], yb[:, 1]
        xa = run_protocol_attack(name, params, f, xb, labels, key=key, norm=norm, eps=eps, indices=idx)
        return xa, is_success(logits_of(f(xa)), labels)

    _ATTACK_FNS[cache_key] = (logits_builder, attack)
    return attack


def _chunk(left: int, batch_size: int, devices: int) -> int:
    """Balanced chunks of at most `batch_size` (rounded up to 8 per device): little padding in the last one."""
    per = -(-left // -(-left // batch_size)) if left > 0 else 1
    return min(max(batch_size, 8 * devices), -(-per // (8 * devices)) * 8 * devices)


# ------------------------------------------------------------------------------------------------------ run
def evaluate(logits_builder, variables, x, y, *, key, norm: str, eps: float, version: str = "standard",
             attacks_to_run=None, options=None, batch_size: int = 250, state=None, config: dict | None = None,
             indices=None, mesh=None, progress: bool = True) -> dict:
    """AutoAttack over all of (x, y), dropping fooled points between attacks.

    ``logits_builder(variables) -> logits_fn`` (called under jit with traced variables; an :class:`EOT` for
    ``version="rand"``, whose samples are recorded as ``eot_samples``; see :func:`defence_builder`); `variables`
    as host or single-device arrays. `indices` (default ``arange(len(x))``): each example's dataset position, its
    key. `state`: a file to save the state to after every chunk and to resume from (it must have been written with
    the same `config`). `mesh`: the devices (default every local device; a multi-process mesh: see the module
    docstring).

    Returns the configuration (`config` plus norm, eps, version, attacks, params, num_examples, eot_samples) and
    ``clean_accuracy``, ``robust_accuracy`` (after each attack, in run order, and ``"clean"``),
    ``final_robust_accuracy``, ``seconds`` per stage, ``passes`` (forward / backward per attacked image: upper
    bounds, a point is computed to the end of its chunk; ``images_computed`` includes chunk padding), ``flags``
    (the reference's warnings, plus perturbations beyond eps and points whose status changes when re-evaluated),
    ``max_perturbation``, ``devices``; and, as numpy, ``x_adv`` and ``robust`` (per-attack robust masks and
    ``"clean"``)."""
    m = mesh or sharding.mesh()
    spec = protocol(version, attacks_to_run, options)
    names = [a for a, _ in spec]
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
    n = len(x)
    indices = np.arange(n, dtype=np.int32) if indices is None else np.asarray(indices, np.int32)
    if indices.shape != (n,):
        raise ValueError(f"indices must have shape ({n},), got {indices.shape}")
    config = {**(config or {}), "norm": norm, "eps": eps, "version": version, "attacks": names,
              "params": dict(spec), "num_examples": n}
    model = logits_builder(variables)  # a randomised defence is an EOT: its samples per step and per prediction
    eot_samples = model.num_samples if isinstance(model, EOT) else None
    config["eot_samples"] = eot_samples
    config = json.loads(json.dumps(config))
    path = Path(state) if state is not None else None
    saved = _load_state(path) if path is not None else None
    if saved is not None and saved[1]["config"] != config:
        diff = sorted(k for k in set(config) | set(saved[1]["config"]) if config.get(k) != saved[1]["config"].get(k))
        raise ValueError(f"{path} holds a run with a different configuration (differs in {diff}); use "
                         f"--fresh or another --out_dir")
    ndev = sharding.num_devices(m)
    pred = jax.jit(lambda v, xb: predict(logits_builder(v), xb))
    replicated = sharding.replicate(variables, m)
    predict_all = lambda xs: sharding.run_sharded(lambda xb: pred(replicated, xb), xs, batch_size=batch_size, m=m)

    if saved is None:
        t0 = time.time()
        sample = slice(0, min(n, batch_size))
        flags_ = checks(model, x[sample], y[sample], version=version, attacks=names,
                        n_target_classes=max([p.get("n_target_classes", 0) for _, p in spec] + [0]))
        if isinstance(model, EOT) and not is_stochastic(jax.jit(model.fn), x[sample]):
            flags_.append("the randomised defence's samples do not differ (a model without dropout?): EOT averages "
                          "identical passes")
        clean = np.asarray(predict_all(x)) == y
        arrays = {"x_adv": x.copy(), "robust": clean.copy(), "clean": clean}
        meta = {"config": config, "flags": flags_, "clean_seconds": time.time() - t0,
                "n_classes": int(logits_of(model(jnp.asarray(x[:1]))).shape[-1]),
                "attacks": {a: {"position": 0, "done": False, "seconds": 0.0, "attacked": 0, "computed": 0}
                            for a in names}}
        if path is not None:
            _save_state(path, arrays, meta)
    else:
        arrays, meta = saved
        if progress:
            done = [a for a in names if meta["attacks"][a]["done"]]
            print(f"autoattack: resuming from {path} (done: {done or 'none'})")

    for name, params in spec:
        st = meta["attacks"][name]
        if st["done"]:
            continue
        if f"before/{name}" not in arrays:
            arrays[f"before/{name}"] = arrays["robust"].copy()
        todo = np.flatnonzero(arrays[f"before/{name}"])
        chunk = _chunk(len(todo) - st["position"], batch_size, ndev)
        attack = _attack_fn(logits_builder, name, params, key, norm, eps)
        with tqdm(total=len(todo), initial=st["position"], desc=name, unit="img", disable=not progress,
                  dynamic_ncols=True) as bar:
            while st["position"] < len(todo):
                t0 = time.time()
                idx = todo[st["position"]: st["position"] + chunk]
                packed = np.stack([y[idx], indices[idx]], axis=1)
                xa, fooled = runner.run_attack(attack, variables, x[idx], packed, key=key, batch_size=chunk,
                                               progress=False, desc=name, mesh=m)
                hit = idx[fooled]
                arrays["x_adv"][hit] = xa[fooled]
                arrays["robust"][hit] = False
                st["position"] += len(idx)
                st["attacked"] += len(idx)
                st["computed"] += -(-len(idx) // chunk) * chunk
                st["seconds"] += time.time() - t0
                if path is not None:
                    _save_state(path, arrays, meta)
                bar.update(len(idx))
                bar.set_postfix(robust=f"{arrays['robust'].mean():.2%}")
        st["done"] = True
        arrays[f"after/{name}"] = arrays["robust"].copy()
        if path is not None:
            _save_state(path, arrays, meta)

    # final consistency: predictions on the returned points and their distances
    final_pred = np.asarray(predict_all(arrays["x_adv"]))
    delta = (arrays["x_adv"] - x).reshape(n, -1)
    dist = np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta.astype(np.float64) ** 2).sum(1))
    acc = {"clean": float(arrays["clean"].mean())}
    acc.update({a: float(arrays[f"after/{a}"].mean()) for a in names})
    flags_ = list(meta["flags"])
    sq = square_flag(acc)
    if sq:
        flags_.append(sq)
    if float(dist.max(initial=0.0)) > eps * (1 + 1e-5) + 1e-7:
        flags_.append(f"perturbation {dist.max():.6g} exceeds eps {eps:.6g}")
    if np.any((final_pred == y) != arrays["robust"]):
        flags_.append(f"{int(np.sum((final_pred == y) != arrays['robust']))} points change their robust status when "
                      f"re-evaluated (non-deterministic model?)")
    if options:
        flags_.append(f"non-standard parameters (--options {json.dumps(options)}): not AutoAttack's numbers")
    per_pass = {}
    for a, p in spec:
        per = passes(a, p, meta["n_classes"], eot_samples or 1)
        st = meta["attacks"][a]
        per_pass[a] = {"per_image": per, "images_attacked": st["attacked"], "images_computed": st["computed"],
                       "forward": per["forward"] * st["attacked"], "backward": per["backward"] * st["attacked"]}
    seconds = {"clean_and_checks": meta["clean_seconds"], **{a: meta["attacks"][a]["seconds"] for a in names}}
    return {**config, "clean_accuracy": acc["clean"], "robust_accuracy": acc,
            "final_robust_accuracy": float(arrays["robust"].mean()), "seconds": seconds,
            "total_seconds": float(sum(seconds.values())), "passes": per_pass, "flags": flags_,
            "max_perturbation": float(dist.max(initial=0.0)), "devices": ndev,
            "x_adv": arrays["x_adv"], "robust": {k: arrays[f"after/{k}"] for k in names} | {"clean": arrays["clean"]}}
