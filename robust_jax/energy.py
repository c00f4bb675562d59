"""The classifier read as an energy model — the ONE place the sign convention of "energy" is defined.

Convention (Grathwohl et al. 2020, "Your classifier is secretly an energy based model"; Liu et al. 2020,
"Energy-based out-of-distribution detection")::

    energy(x) = -T · logsumexp(logits(x) / T)

Low energy = high density = "in-distribution". The second deck calls the softmax *denominator*
(``sum_j exp(z_j)``, i.e. ``exp(logsumexp)``) "the energy" and shows it *rising* with PGD strength; in our
convention that is energy *falling*: PGD pushes the wrong class's logit up, so logsumexp grows and energy drops
(pinned by ``tests/test_energy.py`` on the trained ``cifar10_resnet10``). LE-PGD ascends
``CE − λ·logsumexp = CE + λ·energy``, so it keeps energy high (like clean data) while fooling the classifier.

The detector's score is ``−energy`` (= T·logsumexp): larger means "more likely adversarial" for PGD examples.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.special import logsumexp


def energy(logits, temperature: float = 1.0):
    """Free energy of the logits: ``−T · logsumexp(logits / T)`` over the last axis. Stable for huge logits."""
    t = jnp.asarray(temperature, jnp.float32)
    return -t * logsumexp(jnp.asarray(logits, jnp.float32) / t, axis=-1)


def score(logits, temperature: float = 1.0):
    """Detector score ``−energy``: higher = more suspicious of a PGD-style attack."""
    return -energy(logits, temperature)
