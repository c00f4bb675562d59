"""A convolution with an explicit VJP whose gradient convolutions are ordinary channels-last forward convolutions.

Why: JAX's transpose rule for ``lax.conv_general_dilated`` emits the input-gradient convolution with the kernel's
input/output channels swapped in its dimension numbers (and the weight gradient with batch and feature swapped).
XLA:CPU rewrites such non-canonical convolutions into canonical NHWC/HWIO form with a pass that only visits the
entry computation, so inside a ``while`` body (``lax.fori_loop`` / ``lax.scan``, e.g. a rolled PGD loop) they stay
non-canonical and take a slow path. Here the backward pass builds the flipped, channel-swapped kernel and the
transposed operands explicitly, so every convolution XLA sees is an ordinary ``NHWC x HWIO -> NHWC`` forward
convolution wherever it sits. The measurements behind this design (the slow path's cost, each formulation below
against its alternatives) are in ``benchmarks/README.md`` ("The custom-VJP convolution: design measurements").

:func:`conv_general_dilated` is a drop-in for ``jax.lax.conv_general_dilated`` with the same signature, for Flax's
``nn.Conv(..., conv_general_dilated=conv_general_dilated)``. The custom VJP covers channels-last convolutions
(``NHWC``/``HWIO`` in 2-D; any number of spatial dimensions) with ``feature_group_count == batch_group_count == 1``,
no lhs/rhs dilation, non-negative padding smaller than the kernel, floating dtypes and
``preferred_element_type=None``: that is every convolution in ``robust_jax.models`` (3x3 stride 1/2, 1x1 stride
1/2, 7x7 stride 2; explicit, ``SAME`` or ``VALID`` padding). Anything else falls back to
``lax.conv_general_dilated`` unchanged. The forward value is ``lax.conv_general_dilated`` itself, bit for bit.

Backward pass, for forward stride ``s``, kernel size ``k``, padding ``(lo, hi)``, input size ``H``, output ``O``:

- input gradient, stride 1: the cotangent convolved (stride 1) with the kernel flipped in space and with in/out
  channels swapped, padding ``(k-1-lo, H+lo-(O-1)s-1)`` (asymmetric padding and strides that drop trailing input
  rows are handled). Stride > 1 (``dx="phase"``, the default): the input positions split into ``s`` phases per
  spatial dim; phase ``r`` only sees the kernel taps ``r, r+s, ...``, so each phase is a small stride-1
  convolution of the cotangent with that sub-kernel, and the phases are interleaved. This does the forward's
  FLOPs, where the dilated form (``dx="dilated"``: the cotangent dilated by ``s``, as JAX's own rule does)
  multiplies ``s^d - 1`` zeros out of every ``s^d`` products.
- weight gradient: the correlation of input and cotangent as a forward convolution with the batch as the
  contracted feature dimension: ``x`` as ``(Cin, H, W, N)``, the cotangent as an ``(O_h, O_w, N, Cout)`` kernel
  dilated by ``s``, giving ``(Cin, k_h, k_w, Cout)``. For 1x1 kernels: one matrix product of the strided input
  and the cotangent. (Larger kernels keep the convolution form rather than one matrix product per kernel tap.)

Both gradients equal JAX's autodiff gradients up to float32 summation order (tests/test_conv.py). The backward
pass is built from differentiable ``lax`` ops, so reverse-over-reverse (``jax.grad`` of ``jax.grad``) works;
forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) does not, as for any ``jax.custom_vjp`` function —
use ``conv_impl="xla"`` in the models for that.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


# --------------------------------------------------------------------------------------------------- helpers
def _channels_last_dn(nd: int) -> lax.ConvDimensionNumbers:
    spatial = tuple(range(1, nd - 1))
    return lax.ConvDimensionNumbers((0, nd - 1) + spatial, (nd - 1, nd - 2) + tuple(range(nd - 2)),
                                    (0, nd - 1) + spatial)


def _all_ones(v) -> bool:
    return v is None or all(int(d) == 1 for d in v)


def _supported(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
               feature_group_count, batch_group_count, preferred_element_type):
    """Static padding pairs if the custom VJP covers this convolution, else None."""
    nd = getattr(lhs, "ndim", None)
    if nd is None or nd < 3 or getattr(rhs, "ndim", None) != nd or dimension_numbers is None:
        return None
    if feature_group_count != 1 or batch_group_count != 1 or preferred_element_type is not None:
        return None
    if not (_all_ones(lhs_dilation) and _all_ones(rhs_dilation)):
        return None
    if lhs.dtype != rhs.dtype or not jnp.issubdtype(lhs.dtype, jnp.floating):
        return None
    try:
        dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    except (TypeError, ValueError):
        return None
    if dn != _channels_last_dn(nd) or lhs.shape[-1] != rhs.shape[-2]:
        return None
    in_sp, k_sp = tuple(lhs.shape[1:-1]), tuple(rhs.shape[:-2])
    strides = tuple(int(s) for s in window_strides)
    if len(strides) != nd - 2 or any(s < 1 for s in strides):
        return None
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(in_sp, k_sp, strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if len(pads) != nd - 2:
        return None
    for (lo, hi), h, k in zip(pads, in_sp, k_sp):
        # degenerate cases (negative padding, padding >= kernel, empty output) stay with XLA
        if lo < 0 or hi < 0 or lo >= k or hi >= k or h + lo + hi < k:
            return None
    return strides, pads


def _dx_pads(h, k, s, lo, o):
    """Padding of the (dilated by s) cotangent for the stride-1 input-gradient convolution."""
    return k - 1 - lo, h + lo - (o - 1) * s - 1


# ------------------------------------------------------------------------------------------- backward pieces
def _input_grad_dilated(g, w, strides, pads, in_sp, precision):
    nd = g.ndim
    n_sp = nd - 2
    k_sp = w.shape[:-2]
    o_sp = g.shape[1:-1]
    w_t = jnp.swapaxes(jnp.flip(w, axis=tuple(range(n_sp))), -1, -2)  # (k..., Cout, Cin), flipped in space
    dx_pads = [_dx_pads(h, k, s, lo, o) for h, k, s, (lo, _), o in zip(in_sp, k_sp, strides, pads, o_sp)]
    return lax.conv_general_dilated(g, w_t, (1,) * n_sp, dx_pads, lhs_dilation=strides,
                                    dimension_numbers=_channels_last_dn(nd), precision=precision)


def _phase_plan(h, k, s, lo, o):
    """Per phase q (input positions i ≡ q mod s): kernel taps, cotangent crop/padding and output count.

    Input position i receives g[o'] w[a] for o'·s + a = i + lo. With j = i + lo and rho = j mod s, the taps are
    a = rho + s·t (t < T) and o' = floor(j/s) − t: a stride-1 correlation of g with the flipped sub-kernel.
    """
    plans = []
    for q in range(s):
        count = -(-(h - q) // s) if h > q else 0
        rho = (q + lo) % s
        taps = list(range(rho, k, s))
        m0 = (q + lo - rho) // s  # floor(j/s) for the first position of the phase
        t = len(taps)
        pad_lo, pad_hi = t - 1 - m0, count - o + m0
        plans.append({"q": q, "count": count, "taps": taps, "pad": (pad_lo, pad_hi)})
    return plans


def _input_grad_phase(g, w, strides, pads, in_sp, precision):
    nd = g.ndim
    n_sp = nd - 2
    k_sp = w.shape[:-2]
    o_sp = g.shape[1:-1]
    n, cin = g.shape[0], w.shape[-2]
    plans = [_phase_plan(h, k, s, lo, o) for h, k, s, (lo, _), o in zip(in_sp, k_sp, strides, pads, o_sp)]
    per_dim = [-(-h // s) for h, s in zip(in_sp, strides)]  # positions per phase after padding to equal length
    w_t = jnp.swapaxes(w, -1, -2)  # (k..., Cout, Cin)
    blocks = np.empty(strides, dtype=object)
    for combo in itertools.product(*plans):
        shape = (n, *per_dim, cin)
        if any(not p["taps"] or p["count"] == 0 for p in combo):
            blocks[tuple(p["q"] for p in combo)] = jnp.zeros(shape, g.dtype)
            continue
        sub = jnp.flip(w_t[np.ix_(*[np.asarray(p["taps"]) for p in combo])], axis=tuple(range(n_sp)))
        # negative padding = cropping the cotangent; do it explicitly so the conv stays a plain one
        gi = g
        conv_pads = []
        for d, p in enumerate(combo):
            lo_p, hi_p = p["pad"]
            start, stop = max(-lo_p, 0), g.shape[1 + d] - max(-hi_p, 0)
            if start or stop != g.shape[1 + d]:
                gi = lax.slice_in_dim(gi, start, stop, axis=1 + d)
            conv_pads.append((max(lo_p, 0), max(hi_p, 0)))
        out = lax.conv_general_dilated(gi, sub, (1,) * n_sp, conv_pads, dimension_numbers=_channels_last_dn(nd),
                                       precision=precision)
        fill = [(0, 0)] + [(0, m - p["count"]) for m, p in zip(per_dim, combo)] + [(0, 0)]
        if any(f[1] for f in fill):
            out = jnp.pad(out, fill)
        blocks[tuple(p["q"] for p in combo)] = out
    # interleave: position i = q + s·idx  ->  stack phases as (N, idx_1, q_1, idx_2, q_2, ..., C)
    stacked = jnp.stack([blocks[idx] for idx in np.ndindex(*strides)], axis=0)
    stacked = stacked.reshape(*strides, n, *per_dim, cin)
    perm = [n_sp]
    for d in range(n_sp):
        perm += [n_sp + 1 + d, d]
    perm.append(2 * n_sp + 1)
    full = jnp.transpose(stacked, perm).reshape(n, *[m * s for m, s in zip(per_dim, strides)], cin)
    return full[(slice(None),) + tuple(slice(0, h) for h in in_sp) + (slice(None),)]


def _input_grad(g, w, strides, pads, in_sp, precision, mode):
    if mode == "phase" and any(s > 1 for s in strides):
        return _input_grad_phase(g, w, strides, pads, in_sp, precision)
    return _input_grad_dilated(g, w, strides, pads, in_sp, precision)


def _weight_grad(x, g, strides, pads, k_sp, precision):
    nd = x.ndim
    n_sp = nd - 2
    o_sp = g.shape[1:-1]
    if all(k == 1 for k in k_sp):  # 1x1 kernel (no padding): one matrix product of the strided input and g
        xs = lax.slice(x, (0,) * nd, (x.shape[0], *[(o - 1) * s + 1 for o, s in zip(o_sp, strides)], x.shape[-1]),
                       (1, *strides, 1))
        axes = tuple(range(nd - 1))
        dw = lax.dot_general(xs, g, ((axes, axes), ((), ())), precision=precision)
        return dw.reshape(*k_sp, *dw.shape)
    conv_pads = []
    for d, (h, k, s, (lo, _), o) in enumerate(zip(x.shape[1:-1], k_sp, strides, pads, o_sp)):
        hi = k + (o - 1) * s - h - lo  # < 0 when the forward dropped trailing input rows
        if hi < 0:
            x = lax.slice_in_dim(x, 0, h + hi, axis=1 + d)
            hi = 0
        conv_pads.append((lo, hi))
    xt = jnp.transpose(x, (nd - 1, *range(1, nd - 1), 0))  # (Cin, H.., N)
    gt = jnp.transpose(g, (*range(1, nd - 1), 0, nd - 1))  # (O.., N, Cout)
    dwt = lax.conv_general_dilated(xt, gt, (1,) * n_sp, conv_pads, rhs_dilation=strides,
                                   dimension_numbers=_channels_last_dn(nd), precision=precision)  # (Cin, k.., Cout)
    return jnp.transpose(dwt, (*range(1, nd - 1), 0, nd - 1))


# ------------------------------------------------------------------------------------------------ custom VJP
@functools.cache
def _custom_conv(strides, pads, precision, dx_mode):
    """The custom-VJP convolution for one static configuration (cached: one ``custom_vjp`` object per config)."""

    def forward(x, w):
        return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_channels_last_dn(x.ndim),
                                        precision=precision)

    @jax.custom_vjp
    def conv(x, w):
        return forward(x, w)

    def fwd(x, w):
        return forward(x, w), (x, w)

    def bwd(res, g):
        x, w = res
        dx = _input_grad(g, w, strides, pads, x.shape[1:-1], precision, dx_mode)
        dw = _weight_grad(x, g, strides, pads, w.shape[:-2], precision)
        return dx.astype(x.dtype), dw.astype(w.dtype)

    conv.defvjp(fwd, bwd)
    return conv


def _hashable_precision(precision):
    if isinstance(precision, list):
        return tuple(precision)
    return precision


def make_conv_general_dilated(dx: str = "phase"):
    """A ``lax.conv_general_dilated`` drop-in with the custom VJP; `dx` picks the input-gradient formulation for
    strides > 1 (``"phase"`` or ``"dilated"``; see the module docstring). For benchmarks and tests."""
    if dx not in ("phase", "dilated"):
        raise ValueError(f"unknown formulation dx={dx!r}; use 'phase' or 'dilated'")

    def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                             precision=None, preferred_element_type=None):
        plan = _supported(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                          feature_group_count, batch_group_count, preferred_element_type)
        if plan is None:
            return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                            feature_group_count=feature_group_count,
                                            batch_group_count=batch_group_count, precision=precision,
                                            preferred_element_type=preferred_element_type)
        strides, pads = plan
        return _custom_conv(strides, pads, _hashable_precision(precision), dx)(lhs, rhs)

    conv_general_dilated.__name__ = f"conv_general_dilated_custom_vjp_{dx}"
    return conv_general_dilated


conv_general_dilated = make_conv_general_dilated()
conv_general_dilated.__doc__ = """Drop-in for ``jax.lax.conv_general_dilated`` whose VJP is made of ordinary
channels-last forward convolutions (fast inside XLA:CPU while-loops; see the module docstring). Unsupported
configurations call ``lax.conv_general_dilated`` directly."""
