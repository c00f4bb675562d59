"""robust_jax: uncertainty-aware networks under adversarial and transformation attacks, in JAX/Flax.

Importing the package has no side effects. Command-line entry points call :func:`xla_defaults` first, which sets
the library's default CPU ``XLA_FLAGS`` (see :mod:`robust_jax.xla_flags`).
"""

from robust_jax.xla_flags import xla_defaults

__all__ = ["xla_defaults"]
__version__ = "0.1.0"
