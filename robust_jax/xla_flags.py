"""The library's default ``XLA_FLAGS`` for CPU, applied explicitly by command-line entry points.

:func:`xla_defaults` adds ``--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce`` to ``XLA_FLAGS`` unless
it already chooses a CPU fusion type. On x86 CPUs this leaves convolutions to XLA's multi-threaded Eigen path instead
of single-threaded YNNPACK, which is much faster for the models here (measurements in ``benchmarks/README.md``).
XLA reads the variable when JAX initialises its backend (the first ``jax.devices()``, array or jitted call), so call
it before that; importing ``jax`` or ``robust_jax`` first is fine. Importing ``robust_jax`` never changes
``XLA_FLAGS`` itself. Set ``ROBUST_JAX_XLA_DEFAULTS=0`` to make :func:`xla_defaults` a no-op.
"""

from __future__ import annotations

import os

CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"


def xla_defaults() -> str:
    """Add :data:`CPU_FLAG` to ``os.environ["XLA_FLAGS"]`` unless ``XLA_FLAGS`` already sets
    ``xla_cpu_experimental_ynn_fusion_type`` or ``ROBUST_JAX_XLA_DEFAULTS=0``; returns the resulting ``XLA_FLAGS``."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("ROBUST_JAX_XLA_DEFAULTS", "1") != "0" and "xla_cpu_experimental_ynn_fusion_type" not in flags:
        flags = (flags + " " + CPU_FLAG).strip()
        os.environ["XLA_FLAGS"] = flags
    return flags
