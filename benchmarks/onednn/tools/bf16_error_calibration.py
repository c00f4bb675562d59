"""Is the model-level bf16 input-gradient error inherent to bf16? Compare oneDNN bf16 and an XLA conv that casts
its operands to bf16 (f32 accumulation) against XLA f32, on ResNet-10/64 at init (eval mode)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_model import fwd_input_grad  # noqa: E402
from jax import lax  # noqa: E402

from robust_jax import models  # noqa: E402
from robust_jax import onednn as oc  # noqa: E402


def xla_bf16(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
             feature_group_count=1, batch_group_count=1, precision=None, preferred_element_type=None):
    return lax.conv_general_dilated(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), window_strides, padding,
                                    lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                                    batch_group_count, preferred_element_type=jnp.float32)


rng = np.random.default_rng(0)
x = jnp.asarray(rng.integers(0, 256, (32, 32, 32, 3)), jnp.float32) / 255
y = jnp.asarray(rng.integers(0, 10, 32))
grads = {}
convs = [("xla_f32", "xla"), ("xla_bf16_operands", xla_bf16),
         ("onednn_bf16", oc.make_conv_general_dilated(jnp.bfloat16))]
for name, conv in convs:
    m = models.ResNet10(width=64, conv_impl=conv)
    v = m.init(jax.random.PRNGKey(0), x[:1])
    grads[name] = fwd_input_grad(m)(v, x, y)
ref = grads["xla_f32"]
for k, g in grads.items():
    print(f"{k:18s} max_rel {float(jnp.max(jnp.abs(g - ref)) / jnp.max(jnp.abs(ref))):.3g}  "
          f"l2_rel {float(jnp.linalg.norm(g - ref) / jnp.linalg.norm(ref)):.3g}  "
          f"sign_agree {float(jnp.mean(jnp.sign(g) == jnp.sign(ref))):.4f}")
