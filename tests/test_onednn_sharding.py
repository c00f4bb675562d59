"""oneDNN convolutions batch-sharded over 2 forced host devices (robust_jax.onednn's partitioning rule) equal the
1-device results: one conv's forward and both gradients, under Shardy and GSPMD, the compiled HLO splitting the batch
without gathering activations; a small model's PGD, predictions and data-parallel training.

The measurements run in two subprocesses (onednn_sharding_script.py conv / model), because the device count must
be fixed before JAX initialises; skipped when oneDNN is unavailable.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from data_parallel import assert_same_training

from robust_jax import onednn

pytestmark = pytest.mark.skipif(not onednn.available(), reason=f"oneDNN unavailable: {onednn.unavailable_reason()}")
PARTITIONERS = ["default", "other"]  # Shardy (JAX's default), then GSPMD


def _run(part):
    script = Path(__file__).with_name("onednn_sharding_script.py")
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    proc = subprocess.run([sys.executable, str(script), part], capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2
    return out


@pytest.fixture(scope="module")
def conv_report():
    out = _run("conv")
    assert out["shardy"]  # JAX's default; "other" is GSPMD
    return out


@pytest.fixture(scope="module")
def model_report():
    return _run("model")


@pytest.mark.parametrize("part", PARTITIONERS)
def test_forward_splits_the_batch_without_gathering(conv_report, part):
    r = conv_report[part]["fwd"]
    assert r["max_abs_diff"] <= 1e-6, r
    assert r["out_spec"] == "P('data',)"
    assert r["all_gather"] == 0 and r["all_reduce"] == 0, r
    assert r["onednn_calls"] == ["onednn_conv_fwd:f32[4,8,8,4]"]  # each device convolves its 4 of the 8 rows


@pytest.mark.parametrize("part", PARTITIONERS)
def test_gradients_sharded_equal_single_device(conv_report, part):
    """dx sharded like x; dw from each device's rows, summed by one all-reduce (psum) and replicated."""
    r = conv_report[part]["grads"]
    assert r["dx_max_abs_diff"] <= 1e-6, r
    assert r["dw_max_rel_diff"] <= 1e-5, r  # f32 sums in another order
    assert r["dx_spec"] == "P('data',)" and r["dw_replicated"]
    assert r["all_gather"] == 0 and r["all_reduce"] == 1, r
    assert r["onednn_calls"] == ["onednn_conv_bwd_data:f32[4,8,8,3]", "onednn_conv_bwd_weights:f32[3,3,3,4]"]


@pytest.mark.parametrize("part", PARTITIONERS)
def test_non_batch_sharding_falls_back_to_replicating(conv_report, part):
    r = conv_report[part]["fallback"]
    assert r["max_abs_diff"] <= 1e-6, r
    assert r["all_gather"] >= 1 and r["onednn_calls"] == ["onednn_conv_fwd:f32[8,8,8,4]"], r


@pytest.mark.parametrize("part", PARTITIONERS)
def test_vmap_inside_sharded_function_is_one_call_per_kind(conv_report, part):
    r = conv_report[part]["vmap"]
    assert r["max_rel_diff"] <= 1e-5, r
    assert r["all_gather"] == 0, r
    # the vmapped axis (3) is a leading dim of one call; dy and w are unbatched there, so bwd_data is not vmapped
    assert r["onednn_calls"] == ["onednn_conv_bwd_data:f32[4,8,8,3]", "onednn_conv_bwd_weights:f32[3,3,3,3,4]",
                                 "onednn_conv_fwd:f32[3,4,8,8,4]"]


@pytest.mark.parametrize("part", PARTITIONERS)
def test_bf16_compute_sharded_equals_single_device(conv_report, part):
    assert conv_report[part]["bf16"]["max_rel_diff"] <= 1e-5, conv_report[part]["bf16"]


def test_pgd_sharded_equals_single_device(model_report):
    r = model_report["pgd"]
    assert r["shape_equal"] and r["max_abs_diff"] <= 1e-6, r
    assert r["max_perturbation"] > 0.05  # the attack moved the inputs
    assert r["all_gather"] == 0, r
    assert r["onednn_calls"] and all(":f32[6," in c for c in r["onednn_calls"]), r  # 12 rows, 6 per device


def test_predictions_sharded_equal_single_device(model_report):
    assert model_report["predict"]["max_abs_diff"] <= 1e-6


def test_data_parallel_training_matches_single_device(model_report):
    assert_same_training(model_report["train"])
