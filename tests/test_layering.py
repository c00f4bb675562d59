"""The library's layering (import-linter contracts in pyproject.toml) holds, and importing it has no side effects."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_kept():
    pytest.importorskip("importlinter", reason="import-linter not installed (pip install -e '.[test]')")
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    proc = subprocess.run([sys.executable, "-c", code, "--no-cache"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize("xla_flags", [None, "--xla_force_host_platform_device_count=1"])
def test_import_leaves_xla_flags_alone(xla_flags):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "ROBUST_JAX_XLA_DEFAULTS")}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    code = ("import json, os; import robust_jax, robust_jax.training, robust_jax.checkpoints, robust_jax.evaluate; "
            "print(json.dumps(os.environ.get('XLA_FLAGS')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == xla_flags


def test_xla_defaults_sets_flag_once_and_respects_opt_out(monkeypatch):
    import robust_jax
    from robust_jax import xla_flags

    monkeypatch.delenv("ROBUST_JAX_XLA_DEFAULTS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert robust_jax.xla_defaults() == f"--xla_force_host_platform_device_count=2 {xla_flags.CPU_FLAG}"
    assert robust_jax.xla_defaults() == os.environ["XLA_FLAGS"]  # idempotent
    assert os.environ["XLA_FLAGS"].count("ynn_fusion_type") == 1
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=all")  # the user's choice wins
    assert robust_jax.xla_defaults() == "--xla_cpu_experimental_ynn_fusion_type=all"
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv("ROBUST_JAX_XLA_DEFAULTS", "0")
    robust_jax.xla_defaults()
    assert "XLA_FLAGS" not in os.environ
