"""2-D convolution through oneDNN, called from JAX via XLA FFI (CPU only; prototype).

``conv(x, w, strides, padding, compute_dtype=jnp.bfloat16)``: NHWC activations, HWIO weights, f32 in and out; the
inputs are cast to ``compute_dtype`` (bf16 or f32) inside, oneDNN accumulates in f32. A ``jax.custom_vjp`` whose
backward calls oneDNN's backward-data and backward-weights primitives.

``conv_general_dilated``: a drop-in for ``lax.conv_general_dilated`` (Flax ``nn.Conv(conv_general_dilated=...)``)
that takes the oneDNN path for what it supports (NHWC/HWIO, no dilation, no groups) and falls back to lax otherwise.

The C++ side (onednn_conv.cc) is compiled with g++ on first use into a cache directory, against JAX's FFI headers
and a oneDNN found in ``sys.prefix`` (the PyPI wheels ``onednn-cpu-gomp`` + ``onednn-devel-cpu-gomp``) or the system.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_SRC = Path(__file__).with_name("onednn_conv.cc")
_TARGETS = ("onednn_conv_fwd", "onednn_conv_bwd_data", "onednn_conv_bwd_weights")


def _onednn_prefix() -> Path:
    """A prefix holding include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so (env ONEDNN_ROOT first)."""
    candidates = [os.environ.get("ONEDNN_ROOT"), sys.prefix, "/usr/local", "/usr"]
    for c in candidates:
        if c and (Path(c) / "include/oneapi/dnnl/dnnl.hpp").exists():
            lib = Path(c) / "lib"
            if (lib / "libdnnl.so").exists() or list(lib.glob("*/libdnnl.so")):
                return Path(c)
    raise RuntimeError("oneDNN headers/library not found: pip install onednn-cpu-gomp onednn-devel-cpu-gomp")


def _cache_dir() -> Path:
    base = os.environ.get("ROBUST_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "robust_jax")
    d = Path(base) / "onednn_conv"
    d.mkdir(parents=True, exist_ok=True)
    return d


def build(verbose: bool = False) -> Path:
    """Compile the FFI library if needed; return its path. Keyed by source, jax version and oneDNN prefix."""
    prefix = _onednn_prefix()
    libdirs = [prefix / "lib"] + [p.parent for p in (prefix / "lib").glob("*/libdnnl.so")]
    key = hashlib.sha256(
        _SRC.read_bytes() + jax.__version__.encode() + str(prefix).encode() + jax.ffi.include_dir().encode()
    ).hexdigest()[:16]
    out = _cache_dir() / f"libonednn_conv_{key}.so"
    if out.exists():
        return out
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = ["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-Wno-return-type",
           f"-I{jax.ffi.include_dir()}", f"-I{prefix / 'include'}", str(_SRC), "-o", str(tmp)]
    for d in libdirs:
        cmd += [f"-L{d}", f"-Wl,-rpath,{d}"]
    cmd += ["-ldnnl"]
    if verbose:
        print(" ".join(cmd))
    subprocess.run(cmd, check=True, capture_output=not verbose)
    os.replace(tmp, out)  # atomic: concurrent builders are harmless
    return out


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    for name in _TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return lib


def available() -> bool:
    """True if the library builds and loads here (CPU backend)."""
    try:
        _lib()
        return jax.default_backend() == "cpu"
    except Exception:  # noqa: BLE001
        return False


_ISA = {0x1: "sse41", 0x3: "avx", 0x7: "avx2", 0xF: "avx2_vnni", 0x27: "avx512_core", 0x67: "avx512_core_vnni",
        0xE7: "avx512_core_bf16", 0x1E7: "avx512_core_fp16", 0xFEF: "avx512_core_amx", 0x1FEF: "avx512_core_amx_fp16"}


def info() -> dict:
    lib = _lib()
    ma, mi, pa = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    runtime = lib.onednn_conv_version(ctypes.byref(ma), ctypes.byref(mi), ctypes.byref(pa))
    isa = lib.onednn_conv_isa()
    return {"version": f"{ma.value}.{mi.value}.{pa.value}", "cpu_runtime": {1: "seq", 2: "omp", 4: "tbb",
            8: "threadpool"}.get(runtime, runtime), "isa": _ISA.get(isa, hex(isa))}


def native_bf16() -> bool:
    """True if oneDNN runs bf16 natively here (AVX512-BF16 or AMX); without it bf16 is emulated and ~2.5x slower
    than f32 (measured on Ice Lake), so callers should use compute_dtype=float32 or XLA."""
    return info()["isa"] in ("avx512_core_bf16", "avx512_core_fp16", "avx512_core_amx", "avx512_core_amx_fp16")


def impl_name(kind: str, x_shape, w_shape, strides=(1, 1), padding=((1, 1), (1, 1)), compute_dtype=jnp.bfloat16):
    """oneDNN implementation chosen for one conv (kind: fwd, bwd_data, bwd_weights), e.g. 'brg:avx512_core_amx'."""
    lib = _lib()
    pads = _pads(x_shape, w_shape, strides, padding)
    y_shape = _out_shape(x_shape, w_shape, strides, pads)
    arr = lambda v: (ctypes.c_int64 * len(v))(*v)  # noqa: E731
    buf = ctypes.create_string_buffer(512)
    bf16 = int(jnp.dtype(compute_dtype) == jnp.bfloat16)
    k = {"fwd": 0, "bwd_data": 1, "bwd_weights": 2}[kind]
    rc = lib.onednn_conv_impl(k, arr(x_shape), arr(y_shape), arr(w_shape), bf16, 0,
                              arr([*strides, pads[0][0], pads[0][1], pads[1][0], pads[1][1]]), buf, 512)
    if rc:
        raise RuntimeError(buf.value.decode())
    return buf.value.decode()


def set_serialize(on: bool) -> None:
    """Run one oneDNN call at a time (default) or let XLA's threads run them concurrently."""
    _lib().onednn_conv_set_serialize(int(bool(on)))


def _pads(x_shape, w_shape, strides, padding):
    if isinstance(padding, str):
        return tuple(tuple(p) for p in lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _out_shape(x_shape, w_shape, strides, pads):
    n, h, w, _ = x_shape
    kh, kw, _, o = w_shape
    oh = (h + pads[0][0] + pads[0][1] - kh) // strides[0] + 1
    ow = (w + pads[1][0] + pads[1][1] - kw) // strides[1] + 1
    return (n, oh, ow, o)


def _attrs(strides, pads):
    return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]), pad_t=np.int64(pads[0][0]),
                pad_b=np.int64(pads[0][1]), pad_l=np.int64(pads[1][0]), pad_r=np.int64(pads[1][1]))


def _call(target, out_shape, a, b, strides, pads):
    _lib()
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method="sequential")(
        a, b, **_attrs(strides, pads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, pads, cdt):
    return _call("onednn_conv_fwd", _out_shape(x.shape, w.shape, strides, pads), x.astype(cdt), w.astype(cdt),
                 strides, pads)


def _conv_fwd(x, w, strides, pads, cdt):
    xc, wc = x.astype(cdt), w.astype(cdt)
    y = _call("onednn_conv_fwd", _out_shape(x.shape, w.shape, strides, pads), xc, wc, strides, pads)
    return y, (xc, wc)


def _conv_bwd(strides, pads, cdt, res, dy):
    xc, wc = res
    dyc = dy.astype(cdt)
    dx = _call("onednn_conv_bwd_data", xc.shape, dyc, wc, strides, pads)
    dw = _call("onednn_conv_bwd_weights", wc.shape, xc, dyc, strides, pads)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(x, w, strides=(1, 1), padding="SAME", compute_dtype=jnp.bfloat16):
    """NHWC x HWIO -> NHWC convolution through oneDNN; f32 out (the inputs' dtype is kept for the result)."""
    strides = tuple(int(s) for s in strides)
    pads = _pads(x.shape, w.shape, strides, padding)
    y = _conv(x, w, strides, pads, jnp.dtype(compute_dtype))
    return y.astype(x.dtype) if x.dtype != jnp.float32 else y


def make_conv_general_dilated(compute_dtype=jnp.bfloat16):
    """A ``lax.conv_general_dilated`` look-alike for Flax ``nn.Conv(conv_general_dilated=...)``."""

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                             preferred_element_type=None):
        nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
        dn = dimension_numbers
        if dn is not None and not isinstance(dn, lax.ConvDimensionNumbers):
            dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dn)
        ok = (lhs.ndim == 4 and dn == nhwc and feature_group_count == 1 and batch_group_count == 1
              and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
              and (padding not in ("CIRCULAR", "REFLECT", "CAUSAL")))
        if not ok:
            return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, batch_group_count, precision,
                                            preferred_element_type)
        return conv(lhs, rhs, window_strides, padding, compute_dtype)

    return conv_general_dilated
