"""Opt-in 2-D convolutions through oneDNN on CPU, called from JAX through XLA FFI.

Models use it with ``conv_impl="onednn"`` (f32) or ``conv_impl="onednn_bf16"`` (bf16 compute: activations and
weights are cast to bf16 inside each convolution, oneDNN accumulates in f32, the outputs and both gradients are f32,
so the parameters and the optimizer stay f32), resolved by :func:`robust_jax.models.resolve_conv`, or with
``conv_impl="auto"``, which picks ``onednn_bf16`` for attack gradients and training on CPUs with fast bf16 units
(:func:`robust_jax.models.choose_conv_impl`). It pays off on
CPUs with native bf16 (AVX512-BF16 or AMX) that run it faster than f32; without native bf16 oneDNN emulates bf16
more slowly than f32, so ``onednn_bf16`` then runs f32, and even native bf16 is not faster on every host. Time
``python -m benchmarks.train_step --conv_impls=custom_vjp,onednn,onednn_bf16`` on your host before choosing; the
measurements per host (speed, and accuracy of bf16-trained models) are in ``benchmarks/README.md`` and
``benchmarks/onednn/REPORT.md``.

Requirements: ``pip install 'robust_jax[onednn]'`` (the PyPI wheels ``onednn-cpu-gomp`` + ``onednn-devel-cpu-gomp``,
oneDNN 3.x with GNU OpenMP; **not** PyPI ``onednn``, a SYCL build), g++ with C++17 and libgomp. The C++ side
(``onednn_conv.cc``, shipped as package data) is compiled with g++ on first use into
``$ROBUST_JAX_CACHE/onednn_conv/`` (default ``~/.cache/robust_jax``), named by a hash of the source, the jax
version, the FFI headers and the oneDNN prefix, and written atomically (concurrent builders are harmless).

Fallback: :func:`make_conv_general_dilated` returns a ``lax.conv_general_dilated`` drop-in that uses the library's
custom-VJP convolution (:mod:`robust_jax.conv`, which itself falls back to ``lax``) with a one-time warning when
the default backend is not CPU, oneDNN or g++ is missing, the build fails, ``ROBUST_JAX_ONEDNN=0`` is set, or the
convolution is not one it covers (anything but 2-D NHWC/HWIO f32, no dilation, no groups, padding smaller than the
kernel, or a configuration oneDNN rejects).

Threads (``$ROBUST_JAX_ONEDNN_THREADS``, default 0; :func:`set_threads`): each oneDNN call starts an OpenMP team on
the XLA thread that calls it. ``0`` means OpenMP's own default (``OMP_NUM_THREADS`` or all cores), the fastest on a
quiet machine; when other jobs share the cores, the team oversubscribes them (bf16 backward-weights suffers most,
``benchmarks/README.md``), so set ``ROBUST_JAX_ONEDNN_THREADS=1`` (or fewer threads than free cores) there. The
count is applied per calling thread on the C++ side (``omp_set_num_threads`` before every primitive creation and
execution), so it takes effect whenever it is set, even after libgomp is loaded.

``jax.vmap`` (MC-dropout samples, eps sweeps, ensembles' stacked parameters; nested vmaps too): each FFI call is
batched inside its one custom call (``vmap_method="expand_dims"``: the handler receives the vmapped axes as extra
leading dims, size 1 where unbatched). Forward and backward-data with unbatched weights merge the vmapped axes
into the convolution's batch: one oneDNN call for all elements, no copies. Batched weights (an ensemble) run one
oneDNN call per weight element, in a loop inside the custom call on pointer offsets (inner vmapped axes over which
the weights are unbatched, e.g. an eps sweep inside an ensemble vmap, are still merged). Backward-weights is a
result per element, so it loops too; e.g. ``jax.grad`` of a loss summed over a vmap with shared weights computes
the per-element weight gradients and sums them (unused weight gradients, as in attacks, are dropped by XLA).
:func:`exec_count` counts the oneDNN calls.

Several devices (data parallelism, :mod:`robust_jax.sharding`): under ``jax.jit`` with operands sharded over a
mesh, each FFI call is partitioned by a rule (``jax.experimental.custom_partitioning``; Shardy, JAX's default, and
GSPMD): forward and backward-data keep the batch (N, and the vmapped leading dims) sharded as the activation operand
is, with the weights replicated, so each device convolves its own rows with no gather; backward-weights computes
each device's partial weight gradient from its rows and sums them (one all-reduce over N's mesh axes), replicated.
Any other sharding (spatial or channel dims, weights sharded, a batch dim that does not divide evenly) is replicated
first (all-gathered), which is correct but does not split the work. With one device the FFI call is lowered as is.
On one host, the devices' calls still run one oneDNN call at a time by default (``set_serialize``), each with its
OpenMP team.

Limitations: no forward-mode autodiff (a ``jax.custom_vjp``); only first-order gradients (the backward is an FFI
call, not differentiable again). Each call runs on the XLA thread that reaches it, one oneDNN call at a time
(``set_serialize``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import jax
import jax.experimental.custom_partitioning
import jax.numpy as jnp
import numpy as np
from jax import lax

from robust_jax import conv as conv_lib

_SRC = Path(__file__).with_name("onednn_conv.cc")
_TARGETS = ("onednn_conv_fwd", "onednn_conv_bwd_data", "onednn_conv_bwd_weights")
_CFLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-Wno-return-type")
_ISA = {0x1: "sse41", 0x3: "avx", 0x7: "avx2", 0xF: "avx2_vnni", 0x27: "avx512_core", 0x67: "avx512_core_vnni",
        0xE7: "avx512_core_bf16", 0x1E7: "avx512_core_fp16", 0xFEF: "avx512_core_amx", 0x1FEF: "avx512_core_amx_fp16"}
_NATIVE_BF16_ISAS = ("avx512_core_bf16", "avx512_core_fp16", "avx512_core_amx", "avx512_core_amx_fp16")
DEFAULT_THREADS = 0  # OpenMP's default: all cores (see the module docstring for a shared machine)


# ------------------------------------------------------------------------------------------------------ build
def _onednn_prefix() -> Path:
    """A prefix holding include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so ($ONEDNN_ROOT first, then sys.prefix)."""
    for c in (os.environ.get("ONEDNN_ROOT"), sys.prefix, "/usr/local", "/usr"):
        if c and (Path(c) / "include/oneapi/dnnl/dnnl.hpp").exists():
            lib = Path(c) / "lib"
            if (lib / "libdnnl.so").exists() or list(lib.glob("*/libdnnl.so")):
                return Path(c)
    raise RuntimeError("oneDNN headers/library not found: pip install 'robust_jax[onednn]' "
                       "(onednn-cpu-gomp + onednn-devel-cpu-gomp), or set ONEDNN_ROOT")


def cache_dir() -> Path:
    base = os.environ.get("ROBUST_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "robust_jax")
    return Path(base).expanduser() / "onednn_conv"


def build(verbose: bool = False) -> Path:
    """Compile the FFI library if it is not cached yet; return its path."""
    prefix = _onednn_prefix()
    libdirs = [prefix / "lib"] + [p.parent for p in (prefix / "lib").glob("*/libdnnl.so")]
    include = jax.ffi.include_dir()
    key = hashlib.sha256(b"\0".join([_SRC.read_bytes(), jax.__version__.encode(), str(prefix).encode(),
                                     include.encode(), " ".join(_CFLAGS).encode()])).hexdigest()[:16]
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"libonednn_conv_{key}.so"
    if out.exists():
        return out
    tmp = d / f".libonednn_conv_{key}.{os.getpid()}.{threading.get_ident()}.tmp"
    cmd = ["g++", *_CFLAGS, f"-I{include}", f"-I{prefix / 'include'}", str(_SRC), "-o", str(tmp)]
    for ld in libdirs:
        cmd += [f"-L{ld}", f"-Wl,-rpath,{ld}"]
    cmd += ["-ldnnl"]
    if verbose:
        print(" ".join(cmd))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"g++ failed building {_SRC.name} ({r.returncode}):\n{r.stderr[-4000:]}")
        os.replace(tmp, out)  # atomic rename: a concurrent builder's identical file is simply replaced
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _env_threads() -> int:
    v = os.environ.get("ROBUST_JAX_ONEDNN_THREADS", "")
    if not v.strip():
        return DEFAULT_THREADS
    try:
        n = int(v)
        if n < 0:
            raise ValueError
        return n
    except ValueError:
        _warn_once(f"ROBUST_JAX_ONEDNN_THREADS={v!r} is not a non-negative integer; using {DEFAULT_THREADS}")
        return DEFAULT_THREADS


@functools.cache
def _lib() -> ctypes.CDLL:
    path = build()
    lib = ctypes.CDLL(str(path))
    lib.path = str(path)
    for name in _TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    lib.onednn_conv_set_threads(_env_threads())
    return lib


# --------------------------------------------------------------------------------------------------- queries
_WARNED: set[str] = set()


def _warn_once(msg: str, key: str | None = None) -> None:
    """Warn once per `key` (default: the message) per process."""
    key = msg if key is None else key
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _disabled() -> bool:
    return os.environ.get("ROBUST_JAX_ONEDNN", "1").strip().lower() in ("0", "false", "no", "off")


def unavailable_reason() -> str | None:
    """None if oneDNN convolutions can run here, else why not (builds the library on first call)."""
    if _disabled():
        return "disabled by ROBUST_JAX_ONEDNN=0"
    if jax.default_backend() != "cpu":
        return f"the default backend is {jax.default_backend()!r}, not cpu"
    try:
        _lib()
    except Exception as e:  # noqa: BLE001 - any build/load failure means: not available
        return f"{type(e).__name__}: {e}"
    return None


def available() -> bool:
    """True if the library builds and loads here and the default backend is CPU."""
    return unavailable_reason() is None


def info() -> dict:
    """oneDNN version, CPU runtime, effective ISA, configured threads per call (0: OpenMP default), library path."""
    lib = _lib()
    isa = _isa()
    ma, mi, pa = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    runtime = lib.onednn_conv_version(ctypes.byref(ma), ctypes.byref(mi), ctypes.byref(pa))
    return {"version": f"{ma.value}.{mi.value}.{pa.value}",
            "cpu_runtime": {1: "seq", 2: "omp", 4: "tbb", 8: "threadpool"}.get(runtime, runtime),
            "isa": isa, "native_bf16": isa in _NATIVE_BF16_ISAS, "threads": threads(), "library": lib.path}


@functools.cache
def _isa() -> str:
    isa = _lib().onednn_conv_isa()
    return _ISA.get(isa, hex(isa))


@functools.cache
def cpu_facts() -> dict:
    """``{"vendor": ..., "flags": frozenset(...)}`` of this host's CPU from /proc/cpuinfo (empty when unreadable):
    what :func:`robust_jax.models.choose_conv_impl` needs, read without building or loading oneDNN."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return {"vendor": "", "flags": frozenset()}
    field = lambda k: next((ln.split(":", 1)[1].strip() for ln in text.splitlines()  # noqa: E731
                            if ln.split(":", 1)[0].strip() == k), "")
    return {"vendor": field("vendor_id"), "flags": frozenset(field("flags").split())}


def native_bf16() -> bool:
    """True if oneDNN runs bf16 natively here (AVX512-BF16 or AMX). Without it bf16 is emulated and 2-2.7x slower
    than f32 (measured on Ice Lake), so ``onednn_bf16`` falls back to f32."""
    return _isa() in _NATIVE_BF16_ISAS


def exec_count() -> int:
    """oneDNN convolution primitives run since the library was loaded (one per conv, or per element of a vmap whose
    weights are batched; for tests and benchmarks)."""
    _lib().onednn_conv_exec_count.restype = ctypes.c_int64
    return int(_lib().onednn_conv_exec_count())


def threads() -> int:
    """OpenMP threads per oneDNN call (0: OpenMP's default)."""
    return int(_lib().onednn_conv_get_threads())


def set_threads(n: int) -> None:
    """OpenMP threads per oneDNN call from now on (0: OpenMP's default); overrides $ROBUST_JAX_ONEDNN_THREADS."""
    if int(n) < 0:
        raise ValueError(f"threads must be >= 0, got {n}")
    _lib().onednn_conv_set_threads(int(n))


def set_serialize(on: bool) -> None:
    """Run one oneDNN call at a time (default) or let XLA's threads run independent calls concurrently."""
    _lib().onednn_conv_set_serialize(int(bool(on)))


# ----------------------------------------------------------------------------------------------- shapes, FFI
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


def impl_name(kind: str, x_shape, w_shape, strides=(1, 1), padding=((1, 1), (1, 1)), compute_dtype=jnp.float32):
    """oneDNN implementation chosen for one conv (kind: fwd, bwd_data, bwd_weights), e.g. ``brgconv:avx512_core``.
    Raises RuntimeError if oneDNN rejects the configuration."""
    lib = _lib()
    strides = tuple(int(s) for s in strides)
    pads = _pads(x_shape, w_shape, strides, padding)
    y_shape = _out_shape(x_shape, w_shape, strides, pads)
    arr = lambda v: (ctypes.c_int64 * len(v))(*[int(e) for e in v])  # noqa: E731
    buf = ctypes.create_string_buffer(512)
    bf16 = int(jnp.dtype(compute_dtype) == jnp.bfloat16)
    k = {"fwd": 0, "bwd_data": 1, "bwd_weights": 2}[kind]
    rc = lib.onednn_conv_impl(k, arr(x_shape), arr(y_shape), arr(w_shape), bf16, 0,
                              arr([*strides, pads[0][0], pads[0][1], pads[1][0], pads[1][1]]), buf, 512)
    if rc:
        raise RuntimeError(buf.value.decode())
    return buf.value.decode()


@functools.cache
def _rejected(x_shape, w_shape, strides, pads, bf16: bool) -> str | None:
    """None if oneDNN creates all three primitives for this configuration, else its error (checked at trace time,
    so a configuration oneDNN rejects falls back instead of failing when the compiled function runs)."""
    try:
        for kind in ("fwd", "bwd_data", "bwd_weights"):
            impl_name(kind, x_shape, w_shape, strides, pads, jnp.bfloat16 if bf16 else jnp.float32)
    except RuntimeError as e:
        return str(e)
    return None


def _attrs(strides, pads):
    return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]), pad_t=np.int64(pads[0][0]),
                pad_b=np.int64(pads[0][1]), pad_l=np.int64(pads[1][0]), pad_r=np.int64(pads[1][1]))


# expand_dims: under jax.vmap the handler gets every operand with one more leading dim (size 1 if unbatched) and
# batches itself (onednn_conv.cc, Run). "sequential" (a scan, one FFI call per element; the behaviour before the
# batching rule) is kept selectable for before/after benchmarks only (benchmarks/vmap_eps.py); read at trace time.
_VMAP_METHOD = "expand_dims"

# The two operands and the result of each FFI call, by their 4 core dims (NHWC activations, HWIO weights). A vmapped
# call has the same L leading dims before them on all three (size 1 on an unbatched operand).
_LABELS = {"fwd": ("n h w c", "kh kw c o", "n oh ow o"),
           "bwd_data": ("n oh ow o", "kh kw c o", "n h w c"),
           "bwd_weights": ("n h w c", "n oh ow o", "kh kw c o")}


def _ffi(kind, out_dims, strides, pads, a, b):
    """One FFI call on operands in the expand_dims layout (L leading dims each, 1 where unbatched). The result has
    the leading dims' sizes, then (fwd, bwd_data) the first operand's N and `out_dims` (H, W, C), or (bwd_weights)
    `out_dims` (KH, KW, C, O): shapes that hold for any slice of the batch, as a partition computes on."""
    _lib()
    lead = tuple(max(p, q) for p, q in zip(a.shape[:-4], b.shape[:-4], strict=True))
    core = tuple(out_dims) if kind == "bwd_weights" else (a.shape[-4], *out_dims)
    return jax.ffi.ffi_call(f"onednn_conv_{kind}", jax.ShapeDtypeStruct(lead + core, jnp.float32))(
        a, b, **_attrs(strides, pads))


# ------------------------------------------------------------------------------ partitioning over devices (SPMD)
# Under jax.jit with operands sharded over several devices, XLA cannot split a custom call by itself. The calls are
# wrapped in jax.experimental.custom_partitioning with a data-parallel rule (:func:`_partition`); the rule is used
# only when the computation spans more than one device (otherwise the FFI call is lowered as it is).
def _spec(sharding, ndim: int) -> tuple:
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def _axes(entry) -> tuple:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _layout(kind, mesh, a_shape, b_shape, a_sharding):
    """(a spec, b spec, result spec, mesh axes to sum the result over) of the data-parallel partitioning.

    The sharding of the first operand (x for fwd and bwd_weights, dy for bwd_data) on its batch-like dims (the
    leading vmapped dims where it is batched, and N) is kept when each such dim divides evenly over its mesh axes;
    everything else is replicated (the partitioner all-gathers it): spatial and channel dims, the weights (bar
    leading dims batched like the first operand's), and any sharding that is not a NamedSharding. fwd / bwd_data:
    the result is sharded like the first operand. bwd_weights: x and dy are sharded alike, each device computes the
    partial dw of its rows, summed over N's mesh axes (psum) into a result replicated on those axes."""
    nd = len(a_shape)
    k = nd - 4
    src = _spec(a_sharding, nd) if isinstance(a_sharding, jax.sharding.NamedSharding) else (None,) * nd

    def keep(i):
        size = int(np.prod([mesh.shape[ax] for ax in _axes(src[i])]))
        return src[i] if src[i] is not None and a_shape[i] > 1 and a_shape[i] % size == 0 else None

    lead = tuple(keep(i) for i in range(k))
    n = keep(k)
    b_lead = tuple(lead[i] if b_shape[i] > 1 else None for i in range(k))
    a_spec = (*lead, n, None, None, None)
    if kind == "bwd_weights":
        return a_spec, (*b_lead, n, None, None, None), (*lead, None, None, None, None), _axes(n)
    return a_spec, (*b_lead, None, None, None, None), a_spec, ()


def _partition(kind, out_dims, strides, pads, mesh, arg_shapes, result_shape):
    """custom_partitioning's ``partition``: (mesh, per-device function, result sharding, operand shardings) of
    :func:`_layout`; the partitioner reshards operands to them and the per-device function runs on the shards."""
    a, b = arg_shapes
    if mesh.empty:  # shardings not decodable to a mesh (no NamedSharding): replicate everything on their devices
        known = [s.sharding for s in arg_shapes if s.sharding is not None]
        devices = sorted(known[0].device_set, key=lambda d: d.id) if known else jax.devices()
        mesh = jax.sharding.Mesh(np.asarray(devices), ("onednn_devices",))
    a_spec, b_spec, r_spec, reduce = _layout(kind, mesh, a.shape, b.shape, a.sharding)
    named = lambda spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))  # noqa: E731

    def lower(a, b):
        out = _ffi(kind, out_dims, strides, pads, a, b)
        return lax.psum(out, reduce) if reduce else out

    return mesh, lower, named(r_spec), (named(a_spec), named(b_spec))


def _infer(kind, out_dims, strides, pads, mesh, arg_shapes, result_shape):
    """The result's sharding from the operands' (GSPMD propagation; Shardy uses :func:`_sharding_rule`)."""
    return _partition(kind, out_dims, strides, pads, mesh, arg_shapes, result_shape)[2]


def _sharding_rule(kind, out_dims, strides, pads, mesh, operand_types, result_types):
    """Shardy's rule (an einsum-like string): the batch-like dims (N and the vmapped leading dims, a factor of its
    own where an operand is unbatched there, size 1) may be sharded, N is a reduction factor of bwd_weights, and
    every other dim must be replicated. :func:`_partition` decides the final layout."""
    shapes = [tuple(t.shape) for t in (*operand_types, *result_types)]  # MLIR ranked tensor types
    labels = [lab.split() for lab in _LABELS[kind]]
    k = len(shapes[0]) - 4
    values = [[f"l{i}" if s[i] == shapes[2][i] else f"u{t}_{i}" for i in range(k)] + labels[t]
              for t, s in enumerate(shapes)]
    rule = ", ".join(" ".join(v) for v in values[:2]) + " -> " + " ".join(values[2])
    order = list(dict.fromkeys(f for v in values for f in v))  # factor indices: order of first appearance
    batch = {f for f in order if f.startswith("l")} | {"n"}
    reduction = ("n",) if kind == "bwd_weights" else ()
    replicate = tuple(f for f in order if f not in batch)
    return rule, {"reduction_factors": reduction, "need_replication_factors": replicate}


def _partitioned(kind, out_dims, strides, pads, a, b):
    return _ffi(kind, out_dims, strides, pads, a, b)


_partitioned = jax.experimental.custom_partitioning.custom_partitioning(_partitioned, static_argnums=(0, 1, 2, 3))
_partitioned.def_partition(_partition, infer_sharding_from_operands=_infer, sharding_rule=_sharding_rule)


@functools.cache
def _op(kind, out_dims, strides, pads):
    """The partitioned FFI call ``(a, b) -> result`` with its vmap rule (custom_partitioning has none): the vmapped
    axis becomes a leading dim of one partitioned call (expand_dims layout; nested vmaps add one each), or a scan
    of calls when ``_VMAP_METHOD == "sequential"``."""

    @jax.custom_batching.custom_vmap
    def op(a, b):
        return _partitioned(kind, out_dims, strides, pads, a, b)

    @op.def_vmap
    def rule(axis_size, in_batched, a, b):
        if _VMAP_METHOD == "sequential":
            def one(sliced):
                it = iter(sliced)
                return op(*(next(it) if bt else v for v, bt in zip((a, b), in_batched)))
            return lax.map(one, tuple(v for v, bt in zip((a, b), in_batched) if bt)), True
        a, b = (v if bt else v[None] for v, bt in zip((a, b), in_batched))
        return op(a, b), True

    return op


def _call(kind, out_shape, a, b, strides, pads):
    """`kind`'s FFI call with the result shape `out_shape` (rank 4)."""
    out_dims = out_shape if kind == "bwd_weights" else out_shape[1:]
    return _op(kind, tuple(int(d) for d in out_dims), strides, pads)(a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, pads, cdt):
    return _conv_fwd(x, w, strides, pads, cdt)[0]  # residuals unused outside autodiff: XLA drops them


def _conv_fwd(x, w, strides, pads, cdt):
    xc, wc = x.astype(cdt), w.astype(cdt)
    y = _call("fwd", _out_shape(x.shape, w.shape, strides, pads), xc, wc, strides, pads)
    return y, (xc, wc)  # residuals in the compute dtype (half the memory for bf16)


def _conv_bwd(strides, pads, cdt, res, dy):
    xc, wc = res
    dyc = dy.astype(cdt)
    dx = _call("bwd_data", xc.shape, dyc, wc, strides, pads)
    dw = _call("bwd_weights", wc.shape, xc, dyc, strides, pads)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(x, w, strides=(1, 1), padding="SAME", compute_dtype=jnp.float32):
    """NHWC x HWIO -> NHWC convolution through oneDNN, no fallback (f32 in and out; inputs cast to
    `compute_dtype` inside, f32 accumulation). Requires :func:`available`."""
    strides = tuple(int(s) for s in strides)
    pads = _pads(x.shape, w.shape, strides, padding)
    return _conv(x, w, strides, pads, jnp.dtype(compute_dtype))


# ---------------------------------------------------------------------------------------- drop-in with fallback
def _plan(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
          batch_group_count, preferred_element_type):
    """(strides, pads) if oneDNN covers this convolution, else (None, reason)."""
    if getattr(lhs, "ndim", None) != 4:
        return None, "only 2-D (rank-4) convolutions"
    if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return None, f"only float32 operands (got {lhs.dtype}, {rhs.dtype})"
    plan = conv_lib._supported(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                               feature_group_count, batch_group_count, preferred_element_type)
    if plan is None:
        return None, ("only NHWC/HWIO without dilation or groups, padding smaller than the kernel and "
                      "preferred_element_type=None")
    return plan, None


@functools.cache
def make_conv_general_dilated(dtype=jnp.float32):
    """A ``lax.conv_general_dilated`` drop-in (Flax ``nn.Conv(conv_general_dilated=...)``) computing in `dtype`
    (float32 or bfloat16) through oneDNN, with the fallbacks of the module docstring. Cached per dtype."""
    cdt = jnp.dtype(dtype)
    if cdt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"compute dtype must be float32 or bfloat16, got {cdt}")
    impl = "onednn_bf16" if cdt == jnp.bfloat16 else "onednn"

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                             preferred_element_type=None):
        args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                feature_group_count, batch_group_count, precision, preferred_element_type)
        reason = unavailable_reason()
        if reason is not None:
            _warn_once(f"conv_impl={impl!r}: oneDNN unavailable ({reason}); using the custom_vjp convolution",
                       key=f"{impl}:unavailable:{reason}")
            return conv_lib.conv_general_dilated(*args)
        plan, why = _plan(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                          feature_group_count, batch_group_count, preferred_element_type)
        use = cdt
        if plan is not None and use == jnp.bfloat16 and not native_bf16():
            _warn_once(f"conv_impl={impl!r}: no native bf16 on this CPU (oneDNN ISA {_isa()}); "
                       "emulated bf16 is slower than f32, so oneDNN runs in float32")
            use = jnp.dtype(jnp.float32)
        if plan is not None:
            why = _rejected(tuple(lhs.shape), tuple(rhs.shape), *plan, use == jnp.bfloat16)
            if why is not None:
                why = f"oneDNN rejected it: {why}"
        if why is not None:
            _warn_once(f"conv_impl={impl!r}: unsupported convolution (x {tuple(lhs.shape)}, w {tuple(rhs.shape)}): "
                       f"{why}; using the custom_vjp convolution for it", key=f"{impl}:unsupported:{why}")
            return conv_lib.conv_general_dilated(*args)
        return _conv(lhs, rhs, *plan, use)

    conv_general_dilated.__name__ = f"conv_general_dilated_{impl}"
    return conv_general_dilated


__all__ = ["available", "build", "cache_dir", "conv", "cpu_facts", "exec_count", "impl_name", "info",
           "make_conv_general_dilated", "native_bf16", "set_serialize", "set_threads", "threads", "unavailable_reason"]
