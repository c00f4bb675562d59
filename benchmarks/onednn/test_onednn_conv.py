"""onednn_conv vs lax.conv_general_dilated (f32, HIGHEST): values and both gradients; vmap; Flax nn.Conv drop-in.

pytest -q test_onednn_conv.py   (skips if g++ / oneDNN are missing; prints max relative errors with -s)
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onednn_conv as oc
import pytest
from jax import lax

pytestmark = pytest.mark.skipif(not oc.available(), reason="oneDNN FFI library not available")

SHAPES = [  # (x NHWC, w HWIO, strides, padding)
    ((8, 32, 32, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1))),
    ((8, 32, 32, 64), (3, 3, 64, 128), (2, 2), ((1, 1), (1, 1))),
    ((8, 32, 32, 64), (1, 1, 64, 128), (2, 2), ((0, 0), (0, 0))),
    ((8, 32, 32, 3), (3, 3, 3, 64), (1, 1), ((1, 1), (1, 1))),
    ((4, 64, 64, 3), (7, 7, 3, 64), (2, 2), ((3, 3), (3, 3))),
    ((4, 15, 17, 16), (3, 3, 16, 24), (2, 1), ((0, 2), (1, 0))),  # asymmetric, odd sizes
    ((4, 16, 16, 16), (3, 3, 16, 32), (1, 1), "SAME"),
    ((4, 16, 16, 16), (3, 3, 16, 32), (2, 2), "SAME"),
    ((4, 16, 16, 16), (3, 3, 16, 32), (1, 1), "VALID"),
]
TOL = {"bfloat16": 2e-2, "float32": 1e-4}  # max |error| / max |reference|


def _ref(s, p):
    return lambda x, w: lax.conv_general_dilated(x, w, s, p, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                 precision=lax.Precision.HIGHEST)


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("cdt", ["bfloat16", "float32"])
@pytest.mark.parametrize("xs,ws,s,p", SHAPES)
def test_matches_lax(xs, ws, s, p, cdt):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, xs)
    w = jax.random.normal(kw, ws) / np.sqrt(np.prod(ws[:3]))
    ref, new = _ref(s, p), (lambda x, w: oc.conv(x, w, s, p, compute_dtype=cdt))
    y0, y1 = ref(x, w), jax.jit(new)(x, w)
    assert y0.shape == y1.shape and y1.dtype == jnp.float32
    g = jax.random.normal(kg, y0.shape)
    gx0, gw0 = jax.grad(lambda x, w: jnp.sum(ref(x, w) * g), (0, 1))(x, w)
    gx1, gw1 = jax.jit(jax.grad(lambda x, w: jnp.sum(new(x, w) * g), (0, 1)))(x, w)
    errs = (_rel(y1, y0), _rel(gx1, gx0), _rel(gw1, gw0))
    print(f"{cdt} x{xs} w{ws} s{s} p{p}: max rel err y {errs[0]:.2e} dx {errs[1]:.2e} dw {errs[2]:.2e}")
    assert max(errs) < TOL[cdt], errs


def test_vmap():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 8, 8, 16))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 16, 8)) * 0.1
    f = lambda x, w: oc.conv(x, w, (1, 1), "SAME", jnp.float32)  # noqa: E731
    r = _ref((1, 1), "SAME")
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(x, w), jax.vmap(r)(x, w), atol=1e-4)
    ga = jax.jit(jax.vmap(jax.grad(lambda x, w: f(x, w).sum(), (0, 1))))(x, w)
    gb = jax.vmap(jax.grad(lambda x, w: r(x, w).sum(), (0, 1)))(x, w)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(a, b, atol=1e-3)


def test_flax_drop_in_and_fallback():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
    cg = oc.make_conv_general_dilated(jnp.float32)
    for kw in ({"strides": (2, 2)}, {"kernel_dilation": (2, 2)}, {"feature_group_count": 2}):  # last two: fallback
        a, b = nn.Conv(6 if "feature_group_count" not in kw else 4, (3, 3), **kw), None
        b = nn.Conv(a.features, (3, 3), conv_general_dilated=cg, **kw)
        v = a.init(jax.random.PRNGKey(1), x)
        np.testing.assert_allclose(jax.jit(b.apply)(v, x), a.apply(v, x), atol=1e-4)
