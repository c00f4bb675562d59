// XLA FFI handlers for 2-D convolution through oneDNN (CPU).
//
// Layouts (row-major, as JAX passes them): activations NHWC, weights HWIO.
// Inputs f32 or bf16 (both inputs of one call share a dtype); outputs f32 or bf16.
// Attributes (int64): stride_h, stride_w, pad_t, pad_b, pad_l, pad_r.
//
//   onednn_conv_fwd         (x[N,H,W,C],   w[KH,KW,C,O])  -> y[N,OH,OW,O]
//   onednn_conv_bwd_data    (dy[N,OH,OW,O], w[KH,KW,C,O]) -> dx[N,H,W,C]
//   onednn_conv_bwd_weights (x[N,H,W,C],   dy[N,OH,OW,O]) -> dw[KH,KW,C,O]
//
// jax.vmap (vmap_method="expand_dims" on the Python side): every operand and the result then carry the same number
// of extra leading dims, the vmapped size where batched and 1 where not. Forward and backward-data with unbatched
// weights merge those dims into the batch (one oneDNN call); batched weights and backward-weights (a result per
// element) run one oneDNN call per element, on pointer offsets inside the one custom call (see Run).
//
// Primitives are created once per (kind, shapes, dtypes, attributes) and kept in a process-wide map.
// Weights: oneDNN picks its preferred (blocked) weights layout ("any"); HWIO weights are reordered into it per
// call (and diff-weights reordered back), unless ONEDNN_FFI_PLAIN_WEIGHTS=1 asks for HWIO directly.
// Scratchpads are user-managed and thread-local, so concurrent calls from XLA's threads are safe.
//
// OpenMP threads: oneDNN (GNU OpenMP build) starts an OpenMP team on whichever XLA thread calls it, sized by that
// thread's omp_get_max_threads(). onednn_conv_set_threads(n) (called from Python with $ROBUST_JAX_ONEDNN_THREADS,
// default 0) makes every handler call omp_set_num_threads(n) on its own calling thread before creating or running
// a primitive; n = 0 keeps the OpenMP default (OMP_NUM_THREADS or all cores). The thread count is part of the
// primitive cache key, since oneDNN sizes its work split when a primitive is created.

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

dnnl::stream& Stream() {
  thread_local dnnl::stream s(Engine());
  return s;
}

// Thread-local growable buffers (scratchpad, reordered weights).
struct Buffers {
  std::vector<char> scratch, wei;
  void* get(std::vector<char>& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
  }
};
Buffers& Bufs() {
  thread_local Buffers b;
  return b;
}

bool PlainWeights() {
  static const bool plain = [] {
    const char* e = std::getenv("ONEDNN_FFI_PLAIN_WEIGHTS");
    return e && e[0] == '1';
  }();
  return plain;
}

// Serialize executions (one oneDNN call at a time): XLA may run independent custom calls (e.g. a layer's
// backward-data and backward-weights) concurrently on its own threads, each starting a full OpenMP team, which
// oversubscribes the cores. Default on; ONEDNN_FFI_SERIALIZE=0 or onednn_conv_set_serialize(0) turns it off.
std::atomic<bool> serialize{[] {
  const char* e = std::getenv("ONEDNN_FFI_SERIALIZE");
  return !(e && e[0] == '0');
}()};
std::mutex exec_mu;

std::atomic<int> num_threads{0};  // 0: leave OpenMP's default

// Applies the requested thread count to the calling thread (OpenMP ICVs are per thread); returns the count used.
int ApplyThreads() {
  const int t = num_threads.load(std::memory_order_relaxed);
  if (t > 0 && omp_get_max_threads() != t) omp_set_num_threads(t);
  return omp_get_max_threads();
}

struct ConvParams {
  int kind;  // 0 fwd, 1 bwd data, 2 bwd weights
  int64_t n, c, h, w, o, oh, ow, kh, kw;
  int64_t sh, sw, pt, pb, pl, pr;
  memory::data_type in_dt, out_dt;
  bool plain;
  int nthr;

  std::string Key() const {
    std::ostringstream k;
    k << kind << ':' << n << ',' << c << ',' << h << ',' << w << ',' << o << ',' << oh << ',' << ow << ',' << kh
      << ',' << kw << ':' << sh << ',' << sw << ':' << pt << ',' << pb << ',' << pl << ',' << pr << ':'
      << int(in_dt) << ',' << int(out_dt) << ':' << plain << ':' << nthr;
    return k.str();
  }
};

struct CachedConv {
  dnnl::primitive prim;
  memory::desc src_md, wei_md, dst_md;  // what the primitive expects (wei_md may be blocked)
  memory::desc user_wei_md;             // HWIO in the weights' dtype
  bool reorder_wei = false;
  dnnl::reorder wei_reorder;            // user -> primitive (fwd, bwd data) or primitive -> user (bwd weights)
  memory::desc scratch_md;
  std::string impl;
};

std::mutex cache_mu;
std::unordered_map<std::string, std::shared_ptr<CachedConv>>& Cache() {
  static std::unordered_map<std::string, std::shared_ptr<CachedConv>> cache;
  return cache;
}

std::shared_ptr<CachedConv> Build(const ConvParams& p) {
  auto& eng = Engine();
  const memory::dims src_dims{p.n, p.c, p.h, p.w}, wei_dims{p.o, p.c, p.kh, p.kw}, dst_dims{p.n, p.o, p.oh, p.ow};
  const memory::dims strides{p.sh, p.sw}, pad_l{p.pt, p.pl}, pad_r{p.pb, p.pr};
  const auto in = p.in_dt, out = p.out_dt;
  const tag wtag = p.plain ? tag::hwio : tag::any;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);

  auto c = std::make_shared<CachedConv>();
  // Weights dtype: the inputs' dtype for fwd / bwd data; the output dtype for bwd weights.
  const auto wdt = p.kind == 2 ? out : in;
  c->user_wei_md = memory::desc(wei_dims, wdt, tag::hwio);

  // Forward descriptor (the primitive itself, or the hint for the backward ones).
  const auto fwd_dst_dt = p.kind == 0 ? out : in;
  auto fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      memory::desc(src_dims, in, tag::nhwc), memory::desc(wei_dims, in, wtag),
      memory::desc(dst_dims, fwd_dst_dt, tag::nhwc), strides, pad_l, pad_r, attr);

  // The primitive and what it expects: activation-side, weights-side and output-side descriptors.
  auto set = [&c](auto prim, const auto& pd, memory::desc act, memory::desc wei, memory::desc outside) {
    c->prim = prim;
    c->src_md = act;
    c->wei_md = wei;
    c->dst_md = outside;
    c->scratch_md = pd.scratchpad_desc();
    c->impl = pd.impl_info_str();
  };
  if (p.kind == 0) {
    set(dnnl::convolution_forward(fwd_pd), fwd_pd, fwd_pd.src_desc(), fwd_pd.weights_desc(), fwd_pd.dst_desc());
  } else if (p.kind == 1) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, memory::desc(src_dims, out, tag::nhwc),
        memory::desc(wei_dims, in, wtag), memory::desc(dst_dims, in, tag::nhwc), strides, pad_l, pad_r, fwd_pd,
        attr);
    set(dnnl::convolution_backward_data(pd), pd, pd.diff_src_desc(), pd.weights_desc(), pd.diff_dst_desc());
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, memory::desc(src_dims, in, tag::nhwc),
        memory::desc(wei_dims, out, wtag), memory::desc(dst_dims, in, tag::nhwc), strides, pad_l, pad_r, fwd_pd,
        attr);
    set(dnnl::convolution_backward_weights(pd), pd, pd.src_desc(), pd.diff_weights_desc(), pd.diff_dst_desc());
  }
  c->reorder_wei = c->wei_md != c->user_wei_md;
  if (c->reorder_wei) {
    c->wei_reorder = p.kind == 2 ? dnnl::reorder(dnnl::reorder::primitive_desc(eng, c->wei_md, eng, c->user_wei_md))
                                 : dnnl::reorder(dnnl::reorder::primitive_desc(eng, c->user_wei_md, eng, c->wei_md));
  }
  return c;
}

std::shared_ptr<CachedConv> Get(const ConvParams& p) {
  const std::string key = p.Key();
  {
    std::lock_guard<std::mutex> lock(cache_mu);
    auto it = Cache().find(key);
    if (it != Cache().end()) return it->second;
  }
  auto c = Build(p);  // outside the lock: creation can take milliseconds
  std::lock_guard<std::mutex> lock(cache_mu);
  return Cache().emplace(key, c).first->second;
}

ffi::ErrorOr<memory::data_type> ToDnnl(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32:
      return memory::data_type::f32;
    case ffi::DataType::BF16:
      return memory::data_type::bf16;
    default:
      return ffi::Unexpected(ffi::Error::InvalidArgument("onednn_conv: only f32 and bf16 are supported"));
  }
}

std::atomic<int64_t> exec_count{0};  // primitive executions since load (tests: one per merged vmapped call)

// Runs one primitive on one (x, y, w) triple of per-element pointers.
void Exec(int kind, CachedConv& c, dnnl::stream& s, void* x_ptr, void* y_ptr, void* w_ptr) {
  auto& eng = Engine();
  auto& b = Bufs();
  memory src(c.src_md, eng, x_ptr), dst(c.dst_md, eng, y_ptr);
  memory user_wei(c.user_wei_md, eng, w_ptr);
  memory wei = c.reorder_wei ? memory(c.wei_md, eng, b.get(b.wei, c.wei_md.get_size())) : user_wei;
  memory scratch(c.scratch_md, eng, b.get(b.scratch, c.scratch_md.get_size() + 1));
  if (kind != 2 && c.reorder_wei) c.wei_reorder.execute(s, user_wei, wei);
  if (kind == 0) {
    c.prim.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst},
                       {DNNL_ARG_SCRATCHPAD, scratch}});
  } else if (kind == 1) {
    c.prim.execute(s, {{DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DIFF_DST, dst},
                       {DNNL_ARG_SCRATCHPAD, scratch}});
  } else {
    c.prim.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, wei}, {DNNL_ARG_DIFF_DST, dst},
                       {DNNL_ARG_SCRATCHPAD, scratch}});
    if (c.reorder_wei) c.wei_reorder.execute(s, wei, user_wei);
  }
  exec_count.fetch_add(1, std::memory_order_relaxed);
}

// One tensor of a call. Its rank is 4 + L: the L leading dims come from jax.vmap with vmap_method="expand_dims"
// (the vmapped size where the operand is batched, 1 where it is not; the result always has the vmapped sizes).
struct Tensor {
  ffi::AnyBuffer::Dimensions dims;
  char* ptr;
  size_t width;  // bytes per element
  int64_t Lead(size_t i) const { return dims[i]; }
  int64_t Elem() const {  // elements of one NHWC / HWIO tensor
    int64_t e = 1;
    for (size_t i = dims.size() - 4; i < dims.size(); ++i) e *= dims[i];
    return e;
  }
  int64_t D(size_t i) const { return dims[dims.size() - 4 + i]; }  // i-th of the last four dims
};

// x: the NHWC activation (x or dx), y: the NHWC output-side tensor (y or dy), w: HWIO weights; `out` is the role of
// the result (kind 0: y, 1: x, 2: w). Batching over the L leading (vmapped) dims:
//  - fwd / bwd data with unbatched weights (w's leading dims all 1): ONE oneDNN call with the leading dims merged
//    into the batch (N' = N * prod(leading)); the activations are contiguous, so no copy. With weights batched on
//    outer dims only (an ensemble vmap around an eps-sweep vmap), the inner dims are merged the same way.
//  - otherwise (batched weights, or bwd weights, whose result is per element): one oneDNN call per element of the
//    (remaining) leading dims inside this one custom call, on pointer offsets (size-1 dims broadcast), no copies.
ffi::Error Run(int kind, Tensor x, Tensor y, Tensor w, ffi::DataType in_t, ffi::DataType out_t, int64_t sh,
               int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  const size_t rank = x.dims.size();
  if (rank < 4 || y.dims.size() != rank || w.dims.size() != rank)
    return ffi::Error::InvalidArgument("onednn_conv: expected NHWC activations and HWIO weights of equal rank >= 4");
  auto in_dt = ToDnnl(in_t);
  auto out_dt = ToDnnl(out_t);
  if (in_dt.has_error()) return in_dt.error();
  if (out_dt.has_error()) return out_dt.error();
  if (w.D(2) != x.D(3) || y.D(3) != w.D(3) || y.D(0) != x.D(0))
    return ffi::Error::InvalidArgument("onednn_conv: inconsistent shapes");
  const Tensor& out = kind == 0 ? y : (kind == 1 ? x : w);
  const size_t lead = rank - 4;
  for (size_t i = 0; i < lead; ++i)
    for (const Tensor* t : {&x, &y, &w})
      if (t->Lead(i) != out.Lead(i) && t->Lead(i) != 1)
        return ffi::Error::InvalidArgument("onednn_conv: leading (vmapped) dims must match the result's or be 1");
  // The trailing `merged` leading dims where the weights are unbatched and the activation input is batched like the
  // result go into the conv's batch (fwd / bwd data only); the loop runs over the remaining leading dims.
  size_t merged = 0;
  int64_t factor = 1;
  if (kind != 2) {
    const Tensor& act = kind == 0 ? x : y;
    for (size_t i = lead; i-- > 0 && w.Lead(i) == 1 && act.Lead(i) == out.Lead(i);) {
      ++merged;
      factor *= out.Lead(i);
    }
  }
  const size_t looped = lead - merged;
  int64_t calls = 1;
  for (size_t i = 0; i < looped; ++i) calls *= out.Lead(i);
  const int64_t n = x.D(0) * factor;
  ConvParams p{kind, n, x.D(3), x.D(1), x.D(2), w.D(3), y.D(1), y.D(2), w.D(0), w.D(1), sh, sw, pt, pb, pl, pr,
               *in_dt, *out_dt, PlainWeights(), ApplyThreads()};
  try {
    auto c = Get(p);
    auto& s = Stream();
    std::unique_lock<std::mutex> exec_lock(exec_mu, std::defer_lock);
    if (serialize.load(std::memory_order_relaxed)) exec_lock.lock();
    std::vector<int64_t> idx(lead, 0);
    for (int64_t call = 0; call < calls; ++call) {
      void* ptrs[3];
      const Tensor* ts[3] = {&x, &y, &w};
      for (int r = 0; r < 3; ++r) {  // offset of this element in each tensor (broadcasting its size-1 dims)
        int64_t flat = 0;
        for (size_t i = 0; i < lead; ++i) flat = flat * ts[r]->Lead(i) + (ts[r]->Lead(i) == 1 ? 0 : idx[i]);
        ptrs[r] = ts[r]->ptr + flat * ts[r]->Elem() * int64_t(ts[r]->width);
      }
      Exec(kind, *c, s, ptrs[0], ptrs[1], ptrs[2]);
      for (size_t i = looped; i-- > 0;) {  // next multi-index of the looped leading dims (merged ones stay 0)
        if (++idx[i] < out.Lead(i)) break;
        idx[i] = 0;
      }
    }
    s.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

size_t Width(ffi::DataType t) { return t == ffi::DataType::BF16 ? 2 : 4; }

Tensor T(ffi::AnyBuffer b) {
  return Tensor{b.dimensions(), static_cast<char*>(b.untyped_data()), Width(b.element_type())};
}

ffi::Error ConvFwd(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y, int64_t sh, int64_t sw,
                   int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (x.element_type() != w.element_type()) return ffi::Error::InvalidArgument("onednn_conv: x/w dtype mismatch");
  return Run(0, T(x), T(*y), T(w), x.element_type(), y->element_type(), sh, sw, pt, pb, pl, pr);
}

ffi::Error ConvBwdData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx, int64_t sh, int64_t sw,
                       int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (dy.element_type() != w.element_type()) return ffi::Error::InvalidArgument("onednn_conv: dy/w dtype mismatch");
  return Run(1, T(*dx), T(dy), T(w), dy.element_type(), dx->element_type(), sh, sw, pt, pb, pl, pr);
}

ffi::Error ConvBwdWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw, int64_t sh,
                          int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (x.element_type() != dy.element_type()) return ffi::Error::InvalidArgument("onednn_conv: x/dy dtype mismatch");
  return Run(2, T(x), T(dy), T(*dw), x.element_type(), dw->element_type(), sh, sw, pt, pb, pl, pr);
}

#define CONV_BINDING(A, B, R)          \
  ffi::Ffi::Bind()                     \
      .Arg<ffi::AnyBuffer>()           \
      .Arg<ffi::AnyBuffer>()           \
      .Ret<ffi::AnyBuffer>()           \
      .Attr<int64_t>("stride_h")       \
      .Attr<int64_t>("stride_w")       \
      .Attr<int64_t>("pad_t")          \
      .Attr<int64_t>("pad_b")          \
      .Attr<int64_t>("pad_l")          \
      .Attr<int64_t>("pad_r")

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(onednn_conv_fwd, ConvFwd, CONV_BINDING(x, w, y));
XLA_FFI_DEFINE_HANDLER_SYMBOL(onednn_conv_bwd_data, ConvBwdData, CONV_BINDING(dy, w, dx));
XLA_FFI_DEFINE_HANDLER_SYMBOL(onednn_conv_bwd_weights, ConvBwdWeights, CONV_BINDING(x, dy, dw));

// Plain C helpers for Python (ctypes): version, effective ISA, and the implementation chosen for a shape.
extern "C" {

int onednn_conv_version(int* major, int* minor, int* patch) {
  const dnnl_version_t* v = dnnl_version();
  *major = v->major;
  *minor = v->minor;
  *patch = v->patch;
  return int(v->cpu_runtime);
}

void onednn_conv_set_serialize(int on) { serialize.store(on != 0); }

void onednn_conv_set_threads(int n) { num_threads.store(n > 0 ? n : 0); }

// The configured count (0: OpenMP default) and what the calling thread would use now.
int onednn_conv_get_threads() { return num_threads.load(); }
int onednn_conv_max_threads() { return ApplyThreads(); }

int onednn_conv_isa() { return int(dnnl::get_effective_cpu_isa()); }

// Primitive executions since the library was loaded (one per oneDNN convolution run; tests count them).
int64_t onednn_conv_exec_count() { return exec_count.load(); }

// Writes the implementation name for a cached/new primitive into buf. Dims as in the handlers (NHWC, HWIO).
int onednn_conv_impl(int kind, const int64_t* x, const int64_t* y, const int64_t* w, int in_bf16, int out_bf16,
                     const int64_t* attrs, char* buf, int buflen) {
  try {
    const auto in = in_bf16 ? memory::data_type::bf16 : memory::data_type::f32;
    const auto out = out_bf16 ? memory::data_type::bf16 : memory::data_type::f32;
    ConvParams p{kind, x[0], x[3], x[1], x[2], w[3], y[1], y[2], w[0], w[1],
                 attrs[0], attrs[1], attrs[2], attrs[3], attrs[4], attrs[5], in, out, PlainWeights(), ApplyThreads()};
    auto c = Get(p);
    std::string s = c->impl + (c->reorder_wei ? " +wei_reorder" : "");
    std::strncpy(buf, s.c_str(), buflen - 1);
    buf[buflen - 1] = 0;
    return 0;
  } catch (const dnnl::error& e) {
    std::strncpy(buf, e.what(), buflen - 1);
    buf[buflen - 1] = 0;
    return 1;
  }
}

}  // extern "C"
