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

// x: the NHWC activation (x or dx), y: the NHWC output-side tensor (y or dy), w: HWIO weights.
ffi::Error Run(int kind, ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions y, ffi::AnyBuffer::Dimensions w,
               ffi::DataType in_t, ffi::DataType out_t, void* x_ptr, void* y_ptr, void* w_ptr, int64_t sh,
               int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (x.size() != 4 || y.size() != 4 || w.size() != 4)
    return ffi::Error::InvalidArgument("onednn_conv: expected rank-4 NHWC activations and HWIO weights");
  auto in_dt = ToDnnl(in_t);
  auto out_dt = ToDnnl(out_t);
  if (in_dt.has_error()) return in_dt.error();
  if (out_dt.has_error()) return out_dt.error();
  ConvParams p{kind, x[0], x[3], x[1], x[2], w[3], y[1], y[2], w[0], w[1], sh, sw, pt, pb, pl, pr,
               *in_dt, *out_dt, PlainWeights(), ApplyThreads()};
  if (w[2] != x[3] || y[3] != w[3] || y[0] != x[0])
    return ffi::Error::InvalidArgument("onednn_conv: inconsistent shapes");
  try {
    auto c = Get(p);
    auto& eng = Engine();
    auto& b = Bufs();
    memory src(c->src_md, eng, x_ptr), dst(c->dst_md, eng, y_ptr);
    memory user_wei(c->user_wei_md, eng, w_ptr);
    memory wei = c->reorder_wei ? memory(c->wei_md, eng, b.get(b.wei, c->wei_md.get_size())) : user_wei;
    memory scratch(c->scratch_md, eng, b.get(b.scratch, c->scratch_md.get_size() + 1));
    auto& s = Stream();
    std::unique_lock<std::mutex> exec_lock(exec_mu, std::defer_lock);
    if (serialize.load(std::memory_order_relaxed)) exec_lock.lock();
    if (kind != 2 && c->reorder_wei) c->wei_reorder.execute(s, user_wei, wei);
    if (kind == 0) {
      c->prim.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst},
                          {DNNL_ARG_SCRATCHPAD, scratch}});
    } else if (kind == 1) {
      c->prim.execute(s, {{DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DIFF_DST, dst},
                          {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      c->prim.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, wei}, {DNNL_ARG_DIFF_DST, dst},
                          {DNNL_ARG_SCRATCHPAD, scratch}});
      if (c->reorder_wei) c->wei_reorder.execute(s, wei, user_wei);
    }
    s.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error ConvFwd(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y, int64_t sh, int64_t sw,
                   int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (x.element_type() != w.element_type()) return ffi::Error::InvalidArgument("onednn_conv: x/w dtype mismatch");
  return Run(0, x.dimensions(), y->dimensions(), w.dimensions(), x.element_type(), y->element_type(),
             x.untyped_data(), y->untyped_data(), w.untyped_data(), sh, sw, pt, pb, pl, pr);
}

ffi::Error ConvBwdData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx, int64_t sh, int64_t sw,
                       int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (dy.element_type() != w.element_type()) return ffi::Error::InvalidArgument("onednn_conv: dy/w dtype mismatch");
  return Run(1, dx->dimensions(), dy.dimensions(), w.dimensions(), dy.element_type(), dx->element_type(),
             dx->untyped_data(), dy.untyped_data(), w.untyped_data(), sh, sw, pt, pb, pl, pr);
}

ffi::Error ConvBwdWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw, int64_t sh,
                          int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (x.element_type() != dy.element_type()) return ffi::Error::InvalidArgument("onednn_conv: x/dy dtype mismatch");
  return Run(2, x.dimensions(), dy.dimensions(), dw->dimensions(), x.element_type(), dw->element_type(),
             x.untyped_data(), dy.untyped_data(), dw->untyped_data(), sh, sw, pt, pb, pl, pr);
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
