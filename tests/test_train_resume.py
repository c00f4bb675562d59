"""Preemption-safe training: stop (signal, stop_after_steps, SIGKILL) and resume reproduce an uninterrupted run.

Fast tests train in-process on generated MNIST-shaped data; the slow one kills real `experiments.train`
subprocesses on real MNIST at random steps, including during a checkpoint save.
"""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from toy import toy_mnist, toy_train_config

from robust_jax import training

TIMING = ("seconds", "images_per_s")  # the only metrics.jsonl fields a resumed run may change


X, Y = toy_mnist(192)  # 6 steps per epoch at batch 32, 12 in all
_config = functools.partial(toy_train_config, schedule="onecycle", checkpoint_every_steps=4)


def _train(workdir, x=X, config=None, **kw):
    lines = []
    result = training.train(config or _config(), workdir, progress=False, train_data=(x, Y),
                            val_data=(X[:64], Y[:64]), log=lines.append, **kw)
    return result, lines


def _metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _assert_same_run(result, workdir, reference):
    reference, reference_dir = reference
    assert result["step"] == reference["step"] and not result["stopped_early"]
    leaves = lambda r: jax.tree.leaves(jax.device_get(r["state"]))
    for a, b in zip(leaves(result), leaves(reference), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _untimed(_metrics(workdir)) == _untimed(_metrics(reference_dir))  # bit-identical losses and accuracies
    assert result["val"] == reference["val"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result, lines = _train(workdir)
    assert lines[0] == f"no checkpoint in {workdir}, starting fresh"
    assert len(_metrics(workdir)) == 2
    return result, workdir


class _SignalOnRead:
    """Training images that send `sig` to this process on their `at`-th batch read (0-based): the data access of
    step `at + 1`, so the signal arrives at a known step, in the middle of the loop."""

    def __init__(self, x, at, sig):
        self.x, self.at, self.sig, self.reads = x, at, sig, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, idx):
        if self.reads == self.at:
            os.kill(os.getpid(), self.sig)
        self.reads += 1
        return self.x[idx]


def test_signal_checkpoints_the_current_step_and_resume_matches_an_uninterrupted_run(tmp_path, reference):
    sig = signal.SIGINT  # SIGTERM takes the same path: tested on a real process (slow test below)
    before = signal.getsignal(sig)
    stopped, lines = _train(tmp_path, x=_SignalOnRead(X, at=2, sig=sig))
    name = signal.Signals(sig).name
    assert stopped["stopped_early"] and stopped["interrupted"] == name and stopped["step"] == 3
    assert lines[-1].startswith(f"stopped by {name} at step 3/12: checkpoint saved in {tmp_path / 'checkpoints'}")
    assert signal.getsignal(sig) is before  # the handlers are the caller's again
    assert training._step_dirs(tmp_path / "checkpoints")[-1] == 3  # saved at the step, not at the last period (4)
    assert not (tmp_path / "metrics.jsonl").exists()
    # another checkpoint period (the default) may differ on resume: it changes no result
    resumed, lines = _train(tmp_path, config=_config(checkpoint_every_steps=None))
    assert lines[0].startswith("note: checkpoint_every_steps is null in this run (4 in config.json)")
    assert lines[1] == f"resumed from step 3 in {tmp_path} (3/12 steps done)"
    _assert_same_run(resumed, tmp_path, reference)
    # the resumed epoch counts the seconds before the interruption, and says so in the total
    assert _metrics(tmp_path)[0]["seconds"] >= stopped["train_seconds"] > 0
    assert json.loads((tmp_path / "config.json").read_text())["checkpoint_every_steps"] == 4  # never rewritten


def test_stop_at_epoch_end_and_an_unfinished_save_resume_exactly(tmp_path, reference):
    stopped, lines = _train(tmp_path, stop_after_steps=6)  # the last step of epoch 1: its line is not written yet
    assert stopped["interrupted"] == "stop_after_steps" and stopped["step"] == 6
    assert not (tmp_path / "metrics.jsonl").exists()
    ckdir = tmp_path / "checkpoints"
    # what SIGKILL during the save of step 8 leaves: orbax's temporary folder, partly written
    unfinished = ckdir / f"8{ocp.path.step.TMP_DIR_SUFFIX}"
    shutil.copytree(ckdir / "6", unfinished)
    shutil.rmtree(unfinished / "state")
    # and a damaged newest checkpoint (disk trouble): the resume falls back to the one before
    shutil.copytree(ckdir / "6", ckdir / "7")
    shutil.rmtree(ckdir / "7" / "state")
    resumed, lines = _train(tmp_path)
    assert lines[0].startswith(f"ignoring 1 unfinished checkpoint save(s) in {ckdir}")
    assert lines[1].startswith(f"checkpoint at step 7 in {ckdir} is unreadable")
    assert lines[2] == f"resumed from step 6 in {tmp_path} (6/12 steps done)"
    assert lines[3].startswith("epoch 1/2 (step 6): train loss")  # written by the resumed run, from the checkpoint
    _assert_same_run(resumed, tmp_path, reference)
    assert not unfinished.exists() and training._step_dirs(ckdir) == [8, 12]


def test_resume_with_another_config_is_refused_with_the_diff(tmp_path):
    recorded = json.dumps(_config().to_json(), indent=2) + "\n"
    (tmp_path / "config.json").write_text(recorded)
    changed = _config(lr=0.01, optimizer="sgd", architecture={"name": "BasicCNN", "dropout_rate": 0.2})
    with pytest.raises(training.ConfigMismatchError) as e:
        _train(tmp_path, config=changed)
    assert str(e.value).splitlines()[1:4] == [
        "  architecture.dropout_rate: 0.1 in config.json, 0.2 requested",
        "  lr: 0.003 in config.json, 0.01 requested",
        '  optimizer: "adam" in config.json, "sgd" requested']
    assert (tmp_path / "config.json").read_text() == recorded and sorted(os.listdir(tmp_path)) == ["config.json"]


def test_checkpoints_without_a_config_are_refused(tmp_path):
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    with pytest.raises(training.ConfigMismatchError, match="config.json is missing"):
        _train(tmp_path)


def test_config_diff_reads_older_configs_and_nested_fields():
    old = _config().to_json()
    del old["max_eval_examples"]  # a field added since: counts as its default
    assert training.config_diff(old, _config()) == []
    assert training.config_diff(old, _config(max_eval_examples=10, seed=4)) == [
        ("max_eval_examples", None, 10), ("seed", 3, 4)]
    assert training.config_diff({**old, "removed_field": 1}, _config()) == [("removed_field", 1, "<absent>")]


@pytest.mark.parametrize("field, value, message", [
    ("dataset", "svhn", "dataset: unknown dataset 'svhn'; choose from mnist, fashion_mnist, cifar10, imagenette"),
    ("optimizer", "lamb", "optimizer: unknown optimizer 'lamb'; choose from adam, sgd"),
    ("augment", "flip_crop+blur", "augment: unknown augment 'blur'; choose from none, flip_crop, rotate"),
    ("adversary", "cw", "adversary: unknown adversary 'cw'"),
    ("schedule", "step", "schedule: unknown schedule 'step'"),
    ("conv_impl", "cudnn", "conv_impl: unknown conv_impl 'cudnn'"),
    ("epochs", 0, "epochs: must be at least 1, got 0"),
    ("lr", 0.0, "lr: must be above 0"),
    ("batch_size", "32", "batch_size: expected int, got '32'"),
    ("architecture", {"name": "NoNet"}, "architecture: {'name': 'NoNet'} does not build a model"),
])
def test_invalid_config_is_refused_before_any_file_is_written(tmp_path, field, value, message):
    with pytest.raises(training.ConfigError) as e:
        _config(**{field: value})
    assert e.value.field == field and str(e.value).startswith(message)
    config = _config()
    setattr(config, field, value)  # changed after construction: train() validates again, first
    with pytest.raises(training.ConfigError):
        _train(tmp_path / "run", config=config)
    assert not (tmp_path / "run").exists()


def test_default_checkpoint_interval_saves_within_every_epoch():
    assert training.checkpoint_interval(None, 429) == 108  # MNIST at batch 128: the old default (500) saved none
    assert training.checkpoint_interval(None, 3) == 1 and training.checkpoint_interval(None, 10**5) == 500
    assert training.checkpoint_interval(7, 429) == 7
    for spe in range(1, 2000, 37):
        assert training.checkpoint_interval(None, spe) <= spe


def test_first_signal_is_recorded_second_aborts():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as e:
        with training._StopOnSignals() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signal == "SIGTERM"
            os.kill(os.getpid(), signal.SIGINT)
    assert e.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGTERM) is before


# --------------------------------------------------------------------------------- real processes, real kills
_ARGS = ["--dataset=mnist", "--max_train_examples=320", "--batch_size=32", "--epochs=3", "--max_eval_examples=100",
         "--max_test_examples=100", "--checkpoint_every_steps=3", "--keep_checkpoints=3"]  # 10 steps per epoch


def _start(workdir):
    return subprocess.Popen([sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *_ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})


def _wait_for(predicate, proc, timeout=300):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            return False
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.001)
    return True


def _kill_after_step(workdir, step, sig, rng):
    """Start a run, wait until it has checkpointed `step` or later, then send `sig` after a random delay."""
    proc = _start(workdir)
    ckdir = workdir / "checkpoints"
    if _wait_for(lambda: any(s >= step for s in training._step_dirs(ckdir)), proc):
        time.sleep(rng.uniform(0, 0.2))
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _final_state(workdir):
    ckdir = workdir / "checkpoints"
    return ocp.PyTreeCheckpointer().restore((ckdir / str(training._step_dirs(ckdir)[-1]) / "state").absolute())


@pytest.mark.slow
def test_killed_training_processes_resume_to_the_uninterrupted_result(tmp_path, real_data):
    real_data("mnist")
    seed = int(time.time())
    rng = np.random.default_rng(seed)
    print(f"kill schedule seed {seed}")
    ref_dir, run = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = _start(ref_dir)  # alongside the first killed run
    # 1. SIGKILL at a random step
    rc, out, err = _kill_after_step(run, int(rng.integers(3, 12)), signal.SIGKILL, rng)
    assert rc == -signal.SIGKILL, err[-2000:]
    # 2. SIGTERM at a random later step: a checkpoint at the current step, one line, no traceback
    first = training._step_dirs(run / "checkpoints")[-1]
    rc, out, err = _kill_after_step(run, int(rng.integers(first + 1, max(first + 2, 19))), signal.SIGTERM, rng)
    assert rc == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert f"resumed from step {first} in {run}" in out
    stop = [line for line in out.splitlines() if line.startswith("stopped by SIGTERM at step ")]
    assert len(stop) == 1 and "to resume, rerun: python -m experiments.train" in stop[0], out
    assert training._step_dirs(run / "checkpoints")[-1] == int(stop[0].split()[5].split("/")[0])
    # 3. SIGKILL during a checkpoint save (orbax's temporary folder exists)
    proc = _start(run)
    ckdir = run / "checkpoints"
    saving = lambda: any(ocp.path.step.TMP_DIR_SUFFIX in p for p in os.listdir(ckdir))
    hit = _wait_for(saving, proc)
    if hit:
        proc.kill()
    proc.communicate(timeout=300)
    hit = hit and saving()  # the save may have finished between the check and the kill
    # 4. resume to the end
    proc = _start(run)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert not hit or "ignoring 1 unfinished checkpoint save(s)" in out, out
    ref_out, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err[-3000:]

    for a, b in zip(jax.tree.leaves(_final_state(run)), jax.tree.leaves(_final_state(ref_dir)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _untimed(_metrics(run)) == _untimed(_metrics(ref_dir)) and len(_metrics(run)) == 3
    final, ref_final = (json.loads((d / "final.json").read_text()) for d in (run, ref_dir))
    assert {k: v for k, v in final.items() if k != "train_seconds"} == {
        k: v for k, v in ref_final.items() if k != "train_seconds"}
    # the interrupted run's seconds: at least the time of the steps, at most what its four processes took
    assert 0.2 * ref_final["train_seconds"] < final["train_seconds"] < 4 * ref_final["train_seconds"] + 30
    print(f"killed during a save: {hit}; train_seconds {final['train_seconds']:.1f} (interrupted) vs "
          f"{ref_final['train_seconds']:.1f}")
