"""Thin experiment scripts composing the robust_jax library (one per study). Run as ``python -m experiments.X``."""
