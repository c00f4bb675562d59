"""Sharded (4 forced host devices) and single-device runs agree: attacks, predictions, data-parallel training."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from data_parallel import assert_same_training


@pytest.fixture(scope="module")
def report():
    script = Path(__file__).with_name("multidevice_script.py")
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_four_devices_really_used(report):
    assert report["devices"] == 4
    assert report["shards"] == 4


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_sharded_attack_equals_single_device(report, attack):
    r = report[attack]
    assert r["shape_equal"]
    assert r["max_abs_diff"] <= 1e-6, r


def test_sharded_predictions_equal(report):
    assert report["predict"]["n"] == 24
    assert report["predict"]["max_abs_diff"] <= 1e-5


def test_data_parallel_training_matches_single_device(report):
    assert_same_training(report["train"])
