"""Sweep configs as code: each module defines ``SWEEP = robust_jax.sweep.Sweep(...)``; run one with
``python -m experiments.sweep --config=<module name>``."""
