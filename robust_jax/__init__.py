"""robust_jax: uncertainty-aware networks under adversarial and transformation attacks, in JAX/Flax.

On import, if ``XLA_FLAGS`` does not already choose the CPU fusion type, this adds
``--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce``: on x86 CPUs it leaves convolutions to XLA's
multi-threaded Eigen path instead of single-threaded YNNPACK (measured ~2x faster ResNet-10/64 training on 2 cores,
benchmarks/README.md). It only affects the CPU backend and only if set before JAX initialises its backend.
Set ``ROBUST_JAX_XLA_DEFAULTS=0`` to leave ``XLA_FLAGS`` untouched.
"""

import os as _os

_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"
if _os.environ.get("ROBUST_JAX_XLA_DEFAULTS", "1") != "0":
    _flags = _os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in _flags:
        _os.environ["XLA_FLAGS"] = (_flags + " " + _CPU_FLAG).strip()

__version__ = "0.1.0"
