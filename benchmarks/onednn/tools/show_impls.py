"""Which oneDNN kernel each ResNet-10/64 CIFAR convolution gets (f32 and bf16); look for ``*_amx`` on an AMX host."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
from shapes import resnet10_cifar_shapes  # noqa: E402

from robust_jax import onednn as oc  # noqa: E402

print(oc.info())
for name, x, w, s, p in resnet10_cifar_shapes():
    row = []
    for cdt in (jnp.float32, jnp.bfloat16):
        row.append(" | ".join(oc.impl_name(k, x, w, s, p, cdt) for k in ("fwd", "bwd_data", "bwd_weights")))
    print(f"{name:24s} f32: {row[0]}\n{'':24s} bf16: {row[1]}")
