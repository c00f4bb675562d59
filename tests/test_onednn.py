"""Opt-in oneDNN convolutions (robust_jax.onednn): values and both gradients vs lax, bf16 error bounds, Flax models,
fallbacks, jit/vmap, the thread setting, and checkpoints trained with a oneDNN conv_impl loading without it.

Tests that run oneDNN skip when ``onednn.available()`` is false (no g++ / oneDNN, or not a CPU backend); the first
one builds the FFI library (~5 s of g++, cached in $ROBUST_JAX_CACHE).
"""

import functools
import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from robust_jax import checkpoints, models, onednn

needs_onednn = pytest.mark.skipif(not onednn.available(), reason=f"oneDNN unavailable: {onednn.unavailable_reason()}")
DN = ("NHWC", "HWIO", "NHWC")

SHAPES = [  # (x NHWC, w HWIO, strides, padding): every kind of conv in robust_jax.models, plus odd cases
    ((2, 8, 8, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1))),
    ((2, 8, 8, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1))),
    ((2, 8, 8, 16), (1, 1, 16, 32), (2, 2), ((0, 0), (0, 0))),
    ((2, 16, 16, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),
    ((2, 15, 17, 8), (3, 3, 8, 12), (2, 1), ((0, 2), (1, 0))),  # asymmetric padding, odd sizes, stride drops rows
    ((2, 9, 9, 8), (3, 3, 8, 8), (2, 2), "SAME"),
    ((2, 9, 9, 8), (3, 3, 8, 8), (1, 1), "VALID"),
]
BIG_SHAPES = [  # ResNet-10/64 CIFAR layers
    ((8, 32, 32, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1))),
    ((8, 32, 32, 64), (3, 3, 64, 128), (2, 2), ((1, 1), (1, 1))),
    ((8, 16, 16, 128), (1, 1, 128, 256), (2, 2), ((0, 0), (0, 0))),
    ((8, 32, 32, 3), (3, 3, 3, 64), (1, 1), ((1, 1), (1, 1))),
    ((8, 4, 4, 512), (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1))),
]


def _data(xs, ws, s, p):  # numpy RNG: jax.random would compile once per shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal(xs, np.float32)
    w = (rng.standard_normal(ws) / np.sqrt(np.prod(ws[:3]))).astype(np.float32)
    g = rng.standard_normal(onednn._out_shape(xs, ws, s, onednn._pads(xs, ws, s, p)), np.float32)
    return jnp.asarray(x), jnp.asarray(w), jnp.asarray(g)


def _value_and_grads(f, x, w, g):
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(g))


def _lax(s, p):
    return lambda x, w: lax.conv_general_dilated(x, w, s, p, dimension_numbers=DN, precision=lax.Precision.HIGHEST)


def _rel_l2(a, b):  # in numpy: eager jnp ops would compile once per shape
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


def _amax(a):
    return float(np.max(np.abs(np.asarray(a))))


def _bf16_round(a):
    return a.astype(jnp.bfloat16).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _references(x, w, g, s, p):
    """lax in f32 on the exact operands, and on the operands rounded to bf16 (what oneDNN bf16 multiplies)."""
    exact = _value_and_grads(_lax(s, p), x, w, g)
    rounded = _value_and_grads(_lax(s, p), _bf16_round(x), _bf16_round(w), _bf16_round(g))
    return exact, rounded


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _onednn(x, w, g, s, p, cdt):
    return _value_and_grads(lambda a, b: onednn.conv(a, b, s, p, cdt), x, w, g)


def _check(xs, ws, s, p, bf16: bool):
    """f32: equal to lax up to summation order (a few ulp of the largest term).

    bf16: oneDNN rounds x, w (forward, backward-data) and dy (both backward passes) to bf16 and multiplies them
    exactly with f32 accumulation. (a) Against lax in f32 on the bf16-rounded operands the only difference is the
    summation order, so the tolerance is f32-tight: a wrong kernel, a missed cast or bf16 accumulation fails it.
    (b) Against exact f32 lax the relative L2 error comes from rounding two operands with unit roundoff 2^-9
    (RMS relative error ~2^-9/sqrt(3) each), ~1.6e-3 expected for these random operands; bound 8e-3, and at least
    1e-4 so that a silently-f32 run fails too."""
    x, w, g = _data(xs, ws, s, p)
    exact, rounded = jax.device_get(_references(x, w, g, s, p))
    new = jax.device_get(_onednn(x, w, g, s, p, jnp.dtype(jnp.float32)))
    for name, a, b in zip(("y", "dx", "dw"), new, exact):
        assert a.shape == b.shape and a.dtype == jnp.float32, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * _amax(b), err_msg=name)
    if not bf16:
        return
    new = jax.device_get(_onednn(x, w, g, s, p, jnp.dtype(jnp.bfloat16)))
    for name, a, r, e in zip(("y", "dx", "dw"), new, rounded, exact):
        assert a.shape == e.shape and a.dtype == jnp.float32, name
        assert _rel_l2(a, r) < 1e-5, (name, _rel_l2(a, r))
        assert 1e-4 < _rel_l2(a, e) < 8e-3, (name, _rel_l2(a, e))


@needs_onednn
@pytest.mark.parametrize("xs,ws,s,p", SHAPES)
def test_values_and_gradients_match_lax(xs, ws, s, p):
    _check(xs, ws, s, p, bf16=onednn.native_bf16())


@pytest.mark.slow
@needs_onednn
@pytest.mark.parametrize("xs,ws,s,p", BIG_SHAPES)
def test_resnet10_64_layers(xs, ws, s, p):
    _check(xs, ws, s, p, bf16=onednn.native_bf16())


@needs_onednn
def test_vmap_and_jit():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 8, 8, 8))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 8, 4)) * 0.1
    cg = models.resolve_conv("onednn")
    f = lambda x, w: cg(x, w, (1, 1), "SAME", dimension_numbers=DN)  # noqa: E731
    r = _lax((1, 1), "SAME")
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(x, w), jax.jit(jax.vmap(r))(x, w), rtol=1e-5, atol=1e-5)
    ga = jax.jit(jax.vmap(jax.grad(lambda x, w: f(x, w).sum(), (0, 1))))(x, w)
    gb = jax.jit(jax.vmap(jax.grad(lambda x, w: r(x, w).sum(), (0, 1))))(x, w)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


VMAP_AXES = {"x": (0, None), "w": (None, 0), "x+w": (0, 0)}


def _vmap_data(axes, b=4):
    """B vmapped elements: x (B, 2, 9, 9, 8) and w (B, 3, 3, 8, 12), or one of them unbatched."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((b, 2, 9, 9, 8), np.float32)
    w = (rng.standard_normal((b, 3, 3, 8, 12)) / np.sqrt(72)).astype(np.float32)
    return jnp.asarray(x if axes[0] == 0 else x[0]), jnp.asarray(w if axes[1] == 0 else w[0])


def _elem(a, ax, i):
    return a if ax is None else a[i]


@needs_onednn
@pytest.mark.parametrize("cdt", ["float32", "bfloat16"])
@pytest.mark.parametrize("batched", list(VMAP_AXES))
def test_vmap_matches_loop(batched, cdt):
    """vmap over x, w or both (stride 2, asymmetric padding): values, the gradients of a loss summed over the vmapped
    axis (grad of vmap) and per-element gradients (vmap of grad) equal a Python loop over the elements, to f32
    summation order (the same kernel runs per element, merged or not); with bf16 compute they are also within the
    bf16 bound of exact f32 lax (see _check). The oneDNN call count shows the batching: one forward call for all
    elements when only x is batched, one per element when the weights are."""
    if cdt == "bfloat16" and not onednn.native_bf16():
        pytest.skip("no native bf16")
    axes = VMAP_AXES[batched]
    s, p = (2, 2), ((1, 0), (0, 1))
    x, w = _vmap_data(axes)
    f = lambda x, w: onednn.conv(x, w, s, p, jnp.dtype(cdt))  # noqa: E731
    loss = lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
    loop = lambda fn, x, w: [fn(_elem(x, axes[0], i), _elem(w, axes[1], i)) for i in range(4)]  # noqa: E731

    n0 = onednn.exec_count()
    y = jax.jit(jax.vmap(f, axes))(x, w).block_until_ready()
    assert onednn.exec_count() - n0 == (1 if batched == "x" else 4)
    y_loop = np.stack(jax.device_get(jax.jit(lambda x, w: loop(f, x, w))(x, w)))
    np.testing.assert_allclose(y, y_loop, rtol=1e-6, atol=1e-6 * _amax(y_loop))

    g = jax.jit(jax.grad(lambda x, w: jnp.sum(jax.vmap(loss, axes)(x, w)), (0, 1)))(x, w)
    g_loop = jax.jit(jax.grad(lambda x, w: sum(loop(loss, x, w)), (0, 1)))(x, w)
    pe = jax.jit(jax.vmap(jax.grad(loss, (0, 1)), axes))(x, w)
    pe_loop = jax.jit(lambda x, w: loop(jax.grad(loss, (0, 1)), x, w))(x, w)
    for name, a, b in [("dx", g[0], g_loop[0]), ("dw", g[1], g_loop[1]),
                       ("per-element dx", pe[0], np.stack([e[0] for e in pe_loop])),
                       ("per-element dw", pe[1], np.stack([e[1] for e in pe_loop]))]:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * _amax(b), err_msg=name)
    if cdt == "bfloat16":  # and still bf16-accurate against exact f32 lax, per element
        ref = jax.vmap(_lax(s, p), axes)(x, w)
        assert 1e-4 < _rel_l2(y, ref) < 8e-3


@needs_onednn
def test_vmap_over_x_is_one_custom_call():
    """vmap over x only (an eps sweep, MC-dropout samples after a dropout layer): the compiled HLO has one forward and
    one backward-data custom call per conv and no loop, the operands carry the vmapped axis (weights with a size-1
    leading dim), and oneDNN runs once per conv; the unused weight gradients of an input-gradient are dropped."""
    x, w = _vmap_data(VMAP_AXES["x"], b=5)
    f = lambda x, w: onednn.conv(x, w, (1, 1), "SAME", jnp.bfloat16 if onednn.native_bf16() else jnp.float32)  # noqa: E731
    gx = jax.jit(jax.vmap(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2)), (0, None)))
    hlo = gx.lower(x, w).compile().as_text()
    assert hlo.count('custom_call_target="onednn_conv_fwd"') == 1
    assert hlo.count('custom_call_target="onednn_conv_bwd_data"') == 1
    assert "onednn_conv_bwd_weights" not in hlo and " while(" not in hlo
    stablehlo = gx.lower(x, w).as_text()
    assert "tensor<5x2x9x9x8x" in stablehlo and "tensor<1x3x3x8x12x" in stablehlo
    n0 = onednn.exec_count()
    jax.block_until_ready(gx(x, w))
    assert onednn.exec_count() - n0 == 2


@needs_onednn
def test_nested_vmap_ensemble_of_eps_sweeps():
    """An ensemble vmap (weights batched) around an input vmap (x batched): one oneDNN call per ensemble member,
    the inner axis merged into the batch; equal to the loop over both axes."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((4, 2, 8, 8, 8), np.float32))
    w = jnp.asarray((rng.standard_normal((3, 3, 3, 8, 6)) * 0.1).astype(np.float32))
    f = lambda x, w: onednn.conv(x, w, (1, 1), "SAME")  # noqa: E731
    nested = jax.jit(jax.vmap(jax.vmap(f, (0, None)), (None, 0)))
    n0 = onednn.exec_count()
    y = nested(x, w).block_until_ready()
    assert onednn.exec_count() - n0 == 3 and y.shape == (3, 4, 2, 8, 8, 6)
    ref = np.stack([np.stack([np.asarray(f(x[j], w[i])) for j in range(4)]) for i in range(3)])
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6 * _amax(ref))


@needs_onednn
@pytest.mark.parametrize("impl", ["onednn", "onednn_bf16"])
def test_model_vmap_over_inputs(impl):
    """A model vmapped over a stack of input batches (as pgd's array-valued eps does): input gradients equal the
    per-batch loop, with one forward and one backward-data custom call per conv layer."""
    if impl == "onednn_bf16" and not onednn.native_bf16():
        pytest.skip("no native bf16")
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.random((3, 4, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 4))
    m = models.BasicCNN(conv_impl=impl)
    v = m.init(jax.random.PRNGKey(0), xs[0])
    grad = jax.grad(lambda x: _ce(m.apply(v, x), y))
    vg = jax.jit(jax.vmap(grad))
    hlo = vg.lower(xs).compile().as_text()
    assert hlo.count('custom_call_target="onednn_conv_fwd"') == 2 and " while(" not in hlo
    assert hlo.count('custom_call_target="onednn_conv_bwd_data"') == 2
    ref = np.stack([np.asarray(jax.jit(grad)(x)) for x in xs])
    np.testing.assert_allclose(vg(xs), ref, rtol=1e-5, atol=1e-5 * _amax(ref))


def _model_check(ref, impl, shape):
    """Outputs and parameter / input gradients in train mode (BatchNorm batch statistics, dropout off)."""
    if impl == "onednn_bf16" and not onednn.native_bf16():
        pytest.skip("no native bf16")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((4, *shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 4))
    m = ref.clone(conv_impl=impl)
    v = ref.init(jax.random.PRNGKey(0), x)

    def loss(model, params, x):
        out, _ = model.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.PRNGKey(1)})
        return _ce(out, y), out

    outs = {}
    for name, model in (("ref", ref), ("new", m)):
        f = jax.jit(jax.value_and_grad(lambda p, x, model=model: loss(model, p, x), (0, 1), has_aux=True))
        (_, out), grads = f(v["params"], x)
        outs[name] = jax.device_get((out, grads[0], grads[1]))
        if name == "new":
            assert "onednn_conv_fwd" in f.lower(v["params"], x).as_text()
    (o0, gp0, gx0), (o1, gp1, gx1) = outs["ref"], outs["new"]
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(gp1))  # f32 master weights and gradients
    if impl == "onednn":
        np.testing.assert_allclose(o1, o0, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(gx1, gx0, rtol=1e-3, atol=1e-5 * _amax(gx0))
        for a, b in zip(jax.tree.leaves(gp1), jax.tree.leaves(gp0)):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * _amax(b))
    else:  # bf16 rounding per conv layer (~2e-3 relative each, see _check), BatchNorm etc. in f32
        flat = lambda t: np.concatenate([a.ravel() for a in jax.tree.leaves(t)])  # noqa: E731
        assert 1e-4 < _rel_l2(o1, o0) < 0.03
        assert _rel_l2(gx1, gx0) < 0.1
        assert _rel_l2(flat(gp1), flat(gp0)) < 0.05


@needs_onednn
@pytest.mark.parametrize("impl", ["onednn", "onednn_bf16"])
def test_model_matches_custom_vjp(impl):
    _model_check(models.BasicCNN(), impl, (28, 28, 1))


@pytest.mark.slow
@needs_onednn
@pytest.mark.parametrize("impl", ["onednn", "onednn_bf16"])
def test_resnet10_matches_custom_vjp(impl):
    _model_check(models.ResNet10(width=8), impl, (16, 16, 3))


def _ce(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


@needs_onednn
@pytest.mark.parametrize("kw", [{"kernel_dilation": (2, 2)}, {"feature_group_count": 2}, {"padding": "CIRCULAR"}])
def test_unsupported_config_falls_back_to_lax(kw):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
    a = nn.Conv(4, (3, 3), **kw)
    b = nn.Conv(4, (3, 3), conv_general_dilated=models.resolve_conv("onednn"), **kw)
    v = a.init(jax.random.PRNGKey(1), x)
    onednn._WARNED.clear()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = jax.jit(b.apply)(v, x)
    np.testing.assert_allclose(out, a.apply(v, x), rtol=1e-5, atol=1e-5)
    if "padding" not in kw:  # CIRCULAR is padded by Flax, then an ordinary VALID conv that oneDNN runs
        assert any("unsupported convolution" in str(r.message) for r in rec)
        assert "onednn_conv" not in jax.jit(b.apply).lower(v, x).as_text()


def test_forced_unavailable_falls_back(monkeypatch):
    """ROBUST_JAX_ONEDNN=0 (as on a machine without oneDNN or g++): the model warns once and equals custom_vjp."""
    monkeypatch.setenv("ROBUST_JAX_ONEDNN", "0")
    assert not onednn.available() and "ROBUST_JAX_ONEDNN" in onednn.unavailable_reason()
    x = jnp.asarray(np.random.default_rng(0).random((2, 28, 28, 1)), jnp.float32)
    ref = models.BasicCNN()
    v = ref.init(jax.random.PRNGKey(0), x)
    onednn._WARNED.clear()
    for impl in ("onednn", "onednn_bf16"):
        m = ref.clone(conv_impl=impl)
        with pytest.warns(RuntimeWarning, match="oneDNN unavailable"):
            out = jax.jit(m.apply)(v, x)
        assert "onednn_conv" not in jax.jit(m.apply).lower(v, x).as_text()
        np.testing.assert_allclose(out, jax.jit(ref.apply)(v, x), rtol=1e-6, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the second trace is silent
        jax.jit(lambda v, x: m.apply(v, x) + 1)(v, x)


@needs_onednn
def test_bf16_without_native_support_runs_f32(monkeypatch):
    monkeypatch.setattr(onednn, "native_bf16", lambda: False)
    x, w, _ = _data(*SHAPES[1])
    onednn._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="no native bf16"):
        cg = models.resolve_conv("onednn_bf16")
        a = jax.jit(lambda x, w: cg(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=DN))(x, w)
    np.testing.assert_array_equal(a, onednn.conv(x, w, (2, 2), ((1, 1), (1, 1))))


def test_non_float32_operands_fall_back():
    x = jnp.ones((1, 4, 4, 2), jnp.bfloat16)
    w = jnp.ones((3, 3, 2, 2), jnp.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = models.resolve_conv("onednn")(x, w, (1, 1), "SAME", dimension_numbers=DN)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN))


def test_impls_and_resolve():
    assert set(models.CONV_IMPLS) == {"custom_vjp", "xla", "onednn", "onednn_bf16", "auto"}
    assert models.resolve_conv("onednn") is onednn.make_conv_general_dilated(jnp.float32)
    assert models.resolve_conv("onednn_bf16") is onednn.make_conv_general_dilated(jnp.bfloat16)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        onednn.make_conv_general_dilated(jnp.float16)


def test_thread_setting(monkeypatch):
    monkeypatch.setenv("ROBUST_JAX_ONEDNN_THREADS", "3")
    assert onednn._env_threads() == 3
    monkeypatch.setenv("ROBUST_JAX_ONEDNN_THREADS", "")
    assert onednn._env_threads() == onednn.DEFAULT_THREADS == 0
    monkeypatch.setenv("ROBUST_JAX_ONEDNN_THREADS", "many")
    with pytest.warns(RuntimeWarning, match="ROBUST_JAX_ONEDNN_THREADS"):
        assert onednn._env_threads() == 0
    if not onednn.available():
        return
    before = onednn.threads()
    try:
        for n in (2, 1):
            onednn.set_threads(n)
            assert onednn.threads() == n == onednn.info()["threads"]
            assert onednn._lib().onednn_conv_max_threads() == n  # applied to the calling thread's OpenMP ICV
    finally:
        onednn.set_threads(before)
    with pytest.raises(ValueError):
        onednn.set_threads(-1)


@needs_onednn
def test_info():
    i = onednn.info()
    assert i["version"].startswith("3.") and i["cpu_runtime"] == "omp" and i["isa"]
    assert onednn.native_bf16() == i["native_bf16"]
    assert "onednn_conv" in i["library"]


def test_checkpoint_trained_with_onednn_loads_with_default(tmp_path, monkeypatch):
    """conv_impl is a training hyper-parameter: a card recording it (even inside the architecture, as a hand-written
    card might) loads with the default conv_impl, so evaluation never needs oneDNN; conv_impl= overrides."""
    import orbax.checkpoint as ocp

    from robust_jax import training

    monkeypatch.setenv("ROBUST_JAX_CHECKPOINTS", str(tmp_path))
    monkeypatch.setenv("ROBUST_JAX_ONEDNN", "0")
    cfg = training.TrainConfig(dataset="mnist", architecture={"name": "BasicCNN"}, conv_impl="onednn_bf16")
    assert cfg.to_json()["conv_impl"] == "onednn_bf16"
    with pytest.raises(ValueError, match="TrainConfig\\(conv_impl"):  # not silently overridden by the field
        training.TrainConfig(architecture={"name": "BasicCNN", "conv_impl": "xla"})
    model = models.create(cfg.architecture)
    variables = model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
                           jnp.zeros((1, 28, 28, 1)))
    path = tmp_path / "tiny"
    path.mkdir()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((path / "variables").absolute(), jax.tree.map(np.asarray, variables))
    card = {"name": "tiny", "architecture": {**cfg.architecture, "conv_impl": "onednn_bf16"}, "dataset": "mnist",
            "hyperparameters": {"conv_impl": "onednn_bf16"}}
    (path / "card.json").write_text(json.dumps(card))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no oneDNN fallback warning: it is not used at all
        m = checkpoints.load("tiny")
        x = np.zeros((2, 28, 28, 1), np.float32)
        np.testing.assert_allclose(m(x), model.apply(variables, x), rtol=1e-5, atol=1e-6)
    assert m.model.conv_impl == "custom_vjp" and m.card["hyperparameters"]["conv_impl"] == "onednn_bf16"
    assert checkpoints.load("tiny", conv_impl="xla").model.conv_impl == "xla"
    # "auto" resolved per use (oneDNN is off here: attacks get the f32 default), recorded as the concrete choice
    assert checkpoints.load("tiny", conv_impl="auto", use="forward_mode").model.conv_impl == "xla"
    assert checkpoints.load("tiny", conv_impl="auto", use="attack").model.conv_impl == "custom_vjp"
    assert checkpoints.load("tiny", use="forward_mode").model.conv_impl == "xla"  # a declared use means "auto"
    assert m.for_use("forward_mode").model.conv_impl == "xla" and m.for_use("attack").card is m.card
    with pytest.raises(ValueError, match="unknown use"):  # the caller's error, not a corrupt checkpoint
        checkpoints.load("tiny", use="inference")


# ------------------------------------------------------------------------------------------------ conv_impl="auto"
ZEN4 = ("AuthenticAMD", {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})
SAPPHIRE_RAPIDS = ("GenuineIntel", {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
EMERALD_RAPIDS_NO_AMX = ("GenuineIntel", {"avx2", "avx512f", "avx512_bf16", "avx512_fp16"})
ICE_LAKE = ("GenuineIntel", {"avx2", "avx512f", "avx512_vnni"})
AUTO_TABLE = [  # (use, backend, (vendor, flags), oneDNN available, devices) -> choice
    ("attack", "cpu", ZEN4, True, 1, "onednn_bf16"),
    ("train", "cpu", ZEN4, True, 1, "onednn_bf16"),
    ("eval", "cpu", ZEN4, True, 1, "custom_vjp"),  # reported numbers stay on the f32 kernels
    ("attack", "cpu", SAPPHIRE_RAPIDS, True, 1, "onednn_bf16"),
    ("train", "cpu", SAPPHIRE_RAPIDS, True, 1, "onednn_bf16"),
    ("attack", "cpu", EMERALD_RAPIDS_NO_AMX, True, 1, "custom_vjp"),  # bf16 at half the f32 rate there
    ("train", "cpu", ICE_LAKE, True, 1, "custom_vjp"),  # no bf16 units: oneDNN would emulate bf16
    ("attack", "cpu", ZEN4, False, 1, "custom_vjp"),  # no oneDNN / g++, or ROBUST_JAX_ONEDNN=0
    ("attack", "cpu", ZEN4, True, 2, "onednn_bf16"),  # the FFI calls are partitioned over a batch-sharded mesh
    ("train", "cpu", SAPPHIRE_RAPIDS, True, 8, "onednn_bf16"),
    ("attack", "cpu", ICE_LAKE, True, 4, "custom_vjp"),  # several devices change nothing: still no bf16 units
    ("higher_order", "cpu", ZEN4, True, 2, "custom_vjp"),
    ("attack", "gpu", SAPPHIRE_RAPIDS, True, 1, "custom_vjp"),
    ("train", "tpu", ZEN4, True, 1, "custom_vjp"),
    ("higher_order", "cpu", ZEN4, True, 1, "custom_vjp"),  # oneDNN's backward is not differentiable
    ("forward_mode", "cpu", ZEN4, True, 1, "xla"),  # the only one with jax.jvp
    ("forward_mode", "gpu", ICE_LAKE, False, 1, "xla"),
    ("eval", "gpu", ICE_LAKE, False, 1, "custom_vjp"),
]


@pytest.mark.parametrize("use,backend,cpu,avail,devices,expected", AUTO_TABLE)
def test_choose_conv_impl(use, backend, cpu, avail, devices, expected):
    got = models.choose_conv_impl(use, backend=backend, cpu_vendor=cpu[0], cpu_flags=cpu[1], onednn_available=avail,
                                  device_count=devices)
    assert got == expected
    with pytest.raises(ValueError, match="unknown use"):
        models.choose_conv_impl("inference", backend=backend)


@pytest.mark.parametrize("cpu", [ZEN4, SAPPHIRE_RAPIDS, EMERALD_RAPIDS_NO_AMX, ICE_LAKE, ("", set())])
def test_auto_choice_can_do_what_the_use_needs(cpu):
    """Whatever the host, the choice supports the use: forward mode only with "xla", second-order gradients never
    with oneDNN, and every choice is a concrete conv_impl."""
    for use in models.CONV_USES:
        for backend in ("cpu", "gpu", "tpu"):
            for avail in (True, False):
                impl = models.choose_conv_impl(use, backend=backend, cpu_vendor=cpu[0], cpu_flags=cpu[1],
                                               onednn_available=avail)
                assert impl in models.CONV_IMPLS and impl != "auto"
                if use == "forward_mode":
                    assert impl == "xla"
                if use in ("higher_order", "eval") or backend != "cpu" or not avail:
                    assert not impl.startswith("onednn")


def test_host_conv_impl_uses_host_facts(monkeypatch):
    """host_conv_impl feeds this host's facts to the pure mapping, and checks oneDNN only when it would choose it."""
    def no_build():
        raise AssertionError("oneDNN checked although the mapping did not choose it")

    monkeypatch.setattr(onednn, "cpu_facts", lambda: {"vendor": ICE_LAKE[0], "flags": frozenset(ICE_LAKE[1])})
    monkeypatch.setattr(onednn, "available", no_build)
    assert models.host_conv_impl("attack") == "custom_vjp" == models.resolve_conv_impl("auto", "train")
    assert models.resolve_conv_impl("auto", "forward_mode") == "xla"
    monkeypatch.setattr(onednn, "cpu_facts", lambda: {"vendor": ZEN4[0], "flags": frozenset(ZEN4[1])})
    monkeypatch.setattr(onednn, "available", lambda: False)
    assert models.host_conv_impl("attack") == "custom_vjp"
    monkeypatch.setattr(onednn, "available", lambda: True)
    monkeypatch.setattr(onednn, "native_bf16", lambda: True)
    assert models.host_conv_impl("attack") == "onednn_bf16" == models.host_conv_impl("train")
    assert models.host_conv_impl("eval") == "custom_vjp"
    monkeypatch.setattr(onednn, "native_bf16", lambda: False)  # oneDNN's ISA capped (ONEDNN_MAX_CPU_ISA)
    assert models.host_conv_impl("attack") == "custom_vjp"
    assert models.resolve_conv_impl("onednn", "eval") == "onednn"  # explicit names are kept
    with pytest.raises(ValueError, match="unknown conv_impl"):
        models.resolve_conv_impl("fast", "eval")
    with pytest.raises(ValueError, match="unknown use"):
        models.resolve_conv_impl("auto", "inference")


def test_auto_resolved_in_models_and_records_the_choice(monkeypatch):
    monkeypatch.setattr(models, "host_conv_impl", lambda use: {"attack": "onednn_bf16", "train": "onednn_bf16",
                                                               "forward_mode": "xla"}.get(use, "custom_vjp"))
    arch = {"name": "BasicCNN", "conv_impl": "auto"}
    assert models.create(arch).conv_impl == "custom_vjp"  # use="eval" by default
    assert models.create(arch, use="attack").conv_impl == "onednn_bf16"
    assert models.create(arch, use="forward_mode").conv_impl == "xla"
    assert models.create({"name": "BasicCNN"}).conv_impl == "custom_vjp"  # no conv_impl, eval: the f32 default
    assert models.create({"name": "BasicCNN"}, use="attack").conv_impl == "onednn_bf16"  # a declared use: "auto"
    assert models.create({"name": "BasicCNN", "conv_impl": "xla"}, use="attack").conv_impl == "xla"  # as named
    with pytest.raises(ValueError, match="unknown use"):
        models.create({"name": "BasicCNN"}, use="inference")
    assert models.resolve_conv("auto") is models.resolve_conv("custom_vjp")  # a module built with "auto" directly
    from robust_jax import training

    assert training.TrainConfig(architecture={"name": "BasicCNN"}, conv_impl="auto").conv_impl == "auto"


@needs_onednn
@pytest.mark.parametrize("use", ["eval", "attack", "train", "higher_order", "forward_mode"])
def test_auto_on_this_host_does_what_the_use_needs(use):
    """On this host, the model built for each use runs that use's transformation."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((2, 28, 28, 1)), jnp.float32)
    y = jnp.asarray([1, 2])
    m = models.create({"name": "BasicCNN", "conv_impl": "auto"}, use=use)
    v = models.BasicCNN().init(jax.random.PRNGKey(0), x)
    loss = lambda p, x: _ce(m.apply({**v, "params": p}, x), y)  # noqa: E731
    if use == "eval":
        out = jax.jit(m.apply)(v, x)
    elif use == "attack":
        out = jax.jit(jax.grad(loss, 1))(v["params"], x)
    elif use == "train":
        out = jax.jit(jax.grad(loss))(v["params"], x)
    elif use == "higher_order":  # an input-gradient penalty's parameter gradient
        out = jax.jit(jax.grad(lambda p: jnp.sum(jax.grad(loss, 1)(p, x) ** 2)))(v["params"])
    else:
        out = jax.jvp(lambda x: m.apply(v, x), (x,), (jnp.ones_like(x),))[1]
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(jax.device_get(out)))


@pytest.mark.slow
@needs_onednn
@pytest.mark.parametrize("checkpoint,eps", [("cifar10_resnet10", 1 / 255), ("cifar10_resnet10_pgd", 8 / 255)])
def test_pgd_with_bf16_gradients_within_sampling_error(checkpoint, eps):
    """What "auto" changes for attacks, bounded: PGD-10 (random start, same keys) on the first 400 CIFAR-10 test
    images with bf16 oneDNN gradients vs f32 custom_vjp gradients, success judged by the f32 model over the images
    it classifies correctly. The success rates differ by less than 2 standard errors of a difference of two
    proportions (eps chosen so the rates are mid-range, where they are most sensitive), and bf16 flips the outcome
    on fewer than 3% of the images (measured: 1 of 455 at 1/255, 0 of 369 on the PGD-trained net at 8/255)."""
    from robust_jax import attacks, data

    if not onednn.native_bf16():
        pytest.skip("no native bf16")
    m = checkpoints.load(checkpoint)
    x, y = data.load("cifar10", "test[:400]")
    x = data.to_float(x)
    predict = jax.jit(m.apply)
    success = {}
    for impl in ("custom_vjp", "onednn_bf16"):
        mm = m.model.clone(conv_impl=impl)
        pgd = jax.jit(lambda v, x, y, k, mm=mm: attacks.pgd(lambda z: mm.apply(v, z), x, y, key=k, eps=eps,
                                                           step_size=eps / 4, steps=10))
        adv = np.concatenate([np.asarray(pgd(m.variables, x[i:i + 200], y[i:i + 200], jax.random.PRNGKey(i)))
                              for i in range(0, len(x), 200)])
        success[impl] = np.asarray(predict(m.variables, adv).argmax(-1)) != y
    correct = np.asarray(predict(m.variables, x).argmax(-1)) == y
    n = int(correct.sum())
    s32, s16 = success["custom_vjp"][correct], success["onednn_bf16"][correct]
    p = (s32.mean() + s16.mean()) / 2
    assert 0.2 < p < 0.8, p  # mid-range: a sensitive comparison
    assert abs(s16.mean() - s32.mean()) < 2 * np.sqrt(2 * p * (1 - p) / n), (s32.mean(), s16.mean(), n)
    assert np.sum(s32 != s16) < 0.03 * n, np.sum(s32 != s16)
