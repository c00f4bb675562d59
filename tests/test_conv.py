"""robust_jax.conv: the custom-VJP convolution equals lax.conv_general_dilated in value and gradients.

XLA:CPU compiles are the cost here, so each test compiles once: the parametrised cases share one jitted call.
"""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from robust_jax import attacks, conv, models

DN = ("NHWC", "HWIO", "NHWC")
TOL = {"rtol": 1e-4, "atol": 1e-4}
FORMS = {"default": conv.conv_general_dilated, "dilated": conv.make_conv_general_dilated("dilated")}


def _inputs(n, h, w, cin, k, cout, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, h, w, cin)), jnp.float32)
    kh, kw = (k, k) if isinstance(k, int) else k
    wt = jnp.asarray(rng.normal(size=(kh, kw, cin, cout)) / np.sqrt(kh * kw * cin), jnp.float32)
    return x, wt


def _value_and_vjp(fn, x, w, strides, padding, c):
    """(output, d<out, c>/dx, d<out, c>/dw) for the cotangent c (traceable)."""
    out, vjp = jax.vjp(lambda x, w: fn(x, w, strides, padding, dimension_numbers=DN), x, w)
    return (out, *vjp(c))


def _case_grads(cases, fns, seeds=None):
    """{(case index, fn name): (output, dx, dw)} for every case and fn, computed in one jitted call."""
    args = []
    for i, (h, w, k, strides, padding) in enumerate(cases):
        seed = i if seeds is None else seeds[i]
        x, wt = _inputs(2, h, w, 3, k, 4, seed=seed)
        shape = jax.eval_shape(lambda x=x, wt=wt, s=strides, p=padding: lax.conv_general_dilated(
            x, wt, s, p, dimension_numbers=DN)).shape
        args.append((x, wt, jnp.asarray(np.random.default_rng(100 + seed).normal(size=shape), jnp.float32)))

    @jax.jit
    def run(args):
        return {(i, name): _value_and_vjp(f, x, wt, case[3], case[4], c)
                for i, (case, (x, wt, c)) in enumerate(zip(cases, args)) for name, f in fns.items()}

    return run(args)


# (h, w, k, strides, padding): the models' convolutions plus asymmetric padding and strides that drop input rows
CASES = [
    (8, 8, 3, (1, 1), ((1, 1), (1, 1))),  # ResNet 3x3
    (8, 8, 3, (2, 2), ((1, 1), (1, 1))),  # ResNet strided 3x3, even input: last row dropped
    (7, 9, 3, (2, 2), "SAME"),  # odd sizes, SAME
    (8, 8, 1, (2, 2), "VALID"),  # ResNet shortcut 1x1 stride 2
    (6, 6, 1, (1, 1), "VALID"),  # AllConvNet classifier 1x1
    (10, 10, 3, (1, 1), "VALID"),  # BasicCNN
    (12, 11, 7, (2, 2), ((3, 3), (3, 3))),  # ImageNet stem 7x7 stride 2
    (9, 8, 3, (1, 2), ((0, 2), (2, 0))),  # asymmetric padding, mixed strides
    (9, 9, (3, 2), (3, 2), ((2, 0), (1, 1))),  # non-square kernel, stride 3 > kernel in one dim
    (8, 8, 2, (2, 2), "SAME"),  # even kernel, SAME (asymmetric pads)
    (5, 7, 5, (3, 3), ((4, 0), (1, 3))),  # padding up to k-1 on one side only, stride 3
]


ALT_CASES = [1, 7, 8, 10]  # the dilated formulation differs from the default only with strides


@pytest.fixture(scope="module")
def case_grads():
    out = _case_grads(CASES, {"xla": lax.conv_general_dilated, "default": FORMS["default"]})
    alt = _case_grads([CASES[i] for i in ALT_CASES], {"dilated": FORMS["dilated"]}, seeds=ALT_CASES)
    out.update({(ALT_CASES[i], name): v for (i, name), v in alt.items()})
    return out


@pytest.mark.parametrize("case,form", [(i, "default") for i in range(len(CASES))]
                         + [(i, f) for i in ALT_CASES for f in sorted(FORMS) if f != "default"],
                         ids=lambda v: f"{'x'.join(map(str, CASES[v][:2]))}-k{CASES[v][2]}-s{CASES[v][3]}-{CASES[v][4]}"
                         if isinstance(v, int) else v)
def test_value_and_gradients_match_autodiff(case_grads, case, form):
    ref, got = case_grads[(case, "xla")], case_grads[(case, form)]
    assert conv._supported(jnp.zeros((2, *CASES[case][:2], 3)), jnp.zeros((*np.broadcast_to(CASES[case][2], 2), 3, 4)),
                           CASES[case][3], CASES[case][4], None, None, DN, 1, 1, None) is not None
    np.testing.assert_array_equal(got[0], ref[0])  # the forward is lax.conv_general_dilated itself
    for a, b in zip(got[1:], ref[1:]):
        np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.slow
def test_gradients_match_autodiff_exhaustive():
    """Kernel sizes 1..5 x strides 1..3 x padding styles on small odd/even inputs, all formulations."""
    pads = ["SAME", "VALID", ((1, 1), (1, 1)), ((0, 1), (2, 0)), ((2, 1), (0, 1))]
    grid = itertools.product([5, 6, 8], [6, 7], [1, 2, 3, 5], [1, 2, 3], pads)
    cases = [(h, w, k, (s, s), p) for h, w, k, s, p in grid
             if isinstance(p, str) or all(v < k for pair in p for v in pair)]  # padding >= kernel: lax fallback
    fns = {"xla": lax.conv_general_dilated, **FORMS}
    for start in range(0, len(cases), 40):
        chunk = cases[start:start + 40]
        res = _case_grads(chunk, fns)
        for i, case in enumerate(chunk):
            for name in fns:
                for a, b in zip(res[(i, name)], res[(i, "xla")]):
                    np.testing.assert_allclose(a, b, **TOL, err_msg=f"{case} {name}")


def test_fallbacks_equal_lax():
    """Grouped, dilated, NCHW and padding >= kernel go to lax.conv_general_dilated: same values and gradients."""
    x, wt = _inputs(2, 8, 8, 4, 3, 4)
    configs = [
        ({"feature_group_count": 2}, wt[:, :, :2], "SAME"),
        ({"rhs_dilation": (2, 2)}, wt, "SAME"),
        ({"lhs_dilation": (2, 1)}, wt, ((1, 1), (1, 1))),
        ({}, wt, ((3, 3), (0, 0))),
    ]
    for kw, rhs, padding in configs:
        assert conv._supported(x, rhs, (1, 1), padding, kw.get("lhs_dilation"), kw.get("rhs_dilation"),
                               lax.conv_dimension_numbers(x.shape, rhs.shape, DN), kw.get("feature_group_count", 1),
                               1, None) is None

    @jax.jit
    def run(x, wt):
        out = []
        for kw, rhs, padding in configs:
            rhs = rhs if rhs.shape == wt.shape else wt[:, :, :2]
            f = lambda fn, x, w: jnp.sum(jnp.sin(fn(x, w, (1, 1), padding, dimension_numbers=DN, **kw)))
            out.append([jax.grad(functools.partial(f, fn), (0, 1))(x, rhs)
                        for fn in (conv.conv_general_dilated, lax.conv_general_dilated)])
        return out

    for got, ref in run(x, wt):
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)
    xc, wc = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(wt, (3, 2, 0, 1))
    assert conv._supported(xc, wc, (1, 1), "SAME", None, None, None, 1, 1, None) is None  # NCHW: lax


def test_flax_conv_passes_its_arguments():
    """nn.Conv's call (padding list, ConvDimensionNumbers, dilations of ones) takes the custom-VJP path."""
    seen = []

    def spy(lhs, rhs, *args, **kwargs):
        seen.append(conv._supported(lhs, rhs, *args[:2], kwargs.get("lhs_dilation"), kwargs.get("rhs_dilation"),
                                    kwargs.get("dimension_numbers"), kwargs.get("feature_group_count", 1),
                                    kwargs.get("batch_group_count", 1), kwargs.get("preferred_element_type")))
        return conv.conv_general_dilated(lhs, rhs, *args, **kwargs)

    x = jnp.ones((1, 8, 8, 3))
    for kw in ({"padding": "SAME"}, {"padding": ((1, 1), (1, 1)), "strides": (2, 2)}, {"padding": "VALID"}):
        jax.eval_shape(nn.Conv(4, (3, 3), conv_general_dilated=spy, **kw).init, jax.random.PRNGKey(0), x)
    assert len(seen) == 3 and all(p is not None for p in seen)


def test_unknown_impl():
    with pytest.raises(ValueError, match="conv_impl"):
        models.resolve_conv("cudnn")
    with pytest.raises(ValueError, match="formulation"):
        conv.make_conv_general_dilated(dx="fft")
    with pytest.raises(ValueError, match="conv_impl"):
        jax.eval_shape(models.BasicCNN(conv_impl="cudnn").init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))


# ------------------------------------------------------------------------------------ transformations
def test_grad_of_grad_matches():
    x, wt = _inputs(2, 6, 6, 2, 3, 3)

    def outer(fn):
        inner = lambda x, w: jnp.sum(jnp.tanh(fn(x, w, (2, 2), "SAME", dimension_numbers=DN)) ** 2)
        return jax.grad(lambda x, w: jnp.sum(jax.grad(inner, (0, 1))(x, w)[0] ** 2), (0, 1))

    got, ref = jax.jit(lambda x, w: (outer(conv.conv_general_dilated)(x, w), outer(lax.conv_general_dilated)(x, w)))(
        x, wt)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, **TOL)


def test_forward_mode_unsupported_use_xla():
    x, wt = _inputs(1, 5, 5, 2, 3, 2)
    f = lambda fn: (lambda x: fn(x, wt, (1, 1), "SAME", dimension_numbers=DN))
    jax.eval_shape(lambda x: jax.jvp(f(lax.conv_general_dilated), (x,), (x,)), x)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(f(conv.conv_general_dilated), (x,), (x,))


class _TinyNet(nn.Module):
    conv_impl: str = "custom_vjp"
    rate: float = 0.0

    @nn.compact
    def __call__(self, x, mc_dropout: bool = False):
        Conv = functools.partial(nn.Conv, conv_general_dilated=models.resolve_conv(self.conv_impl))
        h = nn.relu(Conv(4, (3, 3), padding=((1, 1), (1, 1)))(x))
        h = nn.Dropout(self.rate, deterministic=not mc_dropout)(h)
        h = nn.relu(Conv(6, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))(h))
        h = h + Conv(6, (1, 1), strides=(2, 2), use_bias=False)(x)
        return nn.Dense(3)(h.mean((1, 2)))


def _random_variables(model, x, seed=0):
    """Variables of `model` drawn with numpy (compiling a jax.random init costs seconds on XLA:CPU)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        a = rng.normal(size=leaf.shape) * (0.5 if leaf.ndim < 2 else 1 / np.sqrt(np.prod(leaf.shape[:-1])))
        if jax.tree_util.keystr(path).endswith("['var']"):
            a = np.abs(a) + 0.5  # BatchNorm running variance
        return jnp.asarray(a, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(model.init, jax.random.PRNGKey(0), x))


def _tiny(rate=0.0):
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 8, 8, 2)), jnp.float32)
    y = jnp.array([0, 1, 2, 0])
    v = _random_variables(_TinyNet("xla", rate), x)
    return _TinyNet("custom_vjp", rate), _TinyNet("xla", rate), v, x, y


@pytest.mark.parametrize("rate", [0.0, pytest.param(0.3, marks=pytest.mark.slow)])
def test_vmap_over_params_and_dropout_keys(rate):
    """Ensembles (vmap over stacked params) and MC-dropout (vmap over keys): same gradients as autodiff."""
    mc, mx, v, x, y = _tiny(rate=rate)
    keys = jax.random.split(jax.random.PRNGKey(2), 2)

    def grads(m, stacked, x):
        def total(s, x):
            one = lambda v, k: jnp.sum(jax.nn.log_softmax(m.apply(v, x, mc_dropout=True, rngs={"dropout": k}))[:, 0])
            return jnp.sum(jax.vmap(one)(s, keys))

        return jax.grad(total, (0, 1))(stacked, x)

    @jax.jit
    def run(v, x):
        stacked = jax.tree.map(lambda a: jnp.stack([a, -a]), v)
        return grads(mc, stacked, x), grads(mx, stacked, x)

    got, ref = run(v, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, **TOL)


def test_pgd_fori_equals_unroll_with_custom_conv():
    mc, mx, v, x, y = _tiny()
    pgd = lambda m, loop, v, x, y: attacks.pgd(functools.partial(m.apply, v), x, y, key=jax.random.PRNGKey(3),
                                               eps=0.1, step_size=0.03, steps=2, loop=loop)
    unrolled, rolled = jax.jit(lambda v, x, y: (pgd(mc, "unroll", v, x, y), pgd(mc, "fori", v, x, y)))(v, x, y)
    assert float(jnp.abs(unrolled - x).max()) > 0.05  # the attack moved
    np.testing.assert_allclose(rolled, unrolled, atol=1e-6)


def _check_model(cfg, shape):
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, *shape)), jnp.float32)
    mc = models.create({**cfg, "conv_impl": "custom_vjp"})
    mx = models.create({**cfg, "conv_impl": "xla"})
    v = _random_variables(mx, x)
    assert jax.tree.structure(v) == jax.tree.structure(jax.eval_shape(mc.init, jax.random.PRNGKey(0), x))
    loss = lambda m: lambda v, x: jnp.sum(jax.nn.log_softmax(models.logits_of(m.apply(v, x)))[:, 1])
    got, ref = jax.jit(lambda v, x: (jax.grad(loss(mc), (0, 1))(v, x), jax.grad(loss(mx), (0, 1))(v, x)))(v, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, **TOL)


def test_model_same_params_and_gradients():
    assert models.BasicCNN().conv_impl == "custom_vjp"
    _check_model({"name": "BasicCNN"}, (10, 10, 1))


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [{"name": "ResNet10", "width": 4}, {"name": "ResNet10", "width": 4, "stem": "imagenet"},
                                 {"name": "AllConvNet", "width": 4, "hetero": True}])
def test_models_same_params_and_gradients(cfg):
    _check_model(cfg, (16, 16, 3))


@pytest.mark.slow  # ~5 s of compiling; tests/test_checkpoints.py checks the card accuracy with the default conv
def test_checkpoint_predictions_unchanged(need_checkpoint, real_data):
    """A committed checkpoint gives the same logits and input gradients with either convolution."""
    from robust_jax import data

    m = need_checkpoint("cifar10_resnet10")
    real_data("cifar10")
    x, y = data.load("cifar10", "test[:64]")
    x = data.to_float(x)
    mx = models.create({**m.card["architecture"], "conv_impl": "xla"})
    assert m.model.conv_impl == "custom_vjp"

    def value_and_grad(model, v, x):
        f = lambda x: jnp.sum(jax.nn.log_softmax(model.apply(v, x))[jnp.arange(len(y)), y])
        return model.apply(v, x), jax.grad(f)(x)

    (lc, gc), (lx, gx) = jax.jit(lambda v, x: (value_and_grad(m.model, v, x), value_and_grad(mx, v, x)))(
        m.variables, x)
    np.testing.assert_allclose(lc, lx, atol=1e-5, rtol=0)
    np.testing.assert_allclose(gc, gx, atol=1e-5, rtol=1e-4)
    assert float(np.mean(np.argmax(lc, -1) == y)) > 0.8


def test_models_accept_a_conv_callable():
    """``conv_impl`` may be any lax.conv_general_dilated-compatible callable (how benchmarks/onednn plugs in)."""
    calls = []

    def recording_conv(*args, **kwargs):
        calls.append(args[1].shape)
        return jax.lax.conv_general_dilated(*args, **kwargs)

    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3))
    ref = models.ResNet10(width=4, conv_impl="xla")
    v = ref.init(jax.random.PRNGKey(1), x)
    out = models.ResNet10(width=4, conv_impl=recording_conv).apply(v, x)
    np.testing.assert_array_equal(out, ref.apply(v, x))
    assert len(calls) == sum(1 for p in jax.tree_util.tree_leaves_with_path(v["params"]) if "kernel" in str(p[0])
                             and p[1].ndim == 4)
