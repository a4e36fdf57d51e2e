// XLA FFI handlers: 2-D convolutions (forward and both gradients) in oneDNN.
//
// Why: XLA's CPU backend runs bfloat16 convolutions as float32 Eigen
// convolutions (with converts around them), so bf16 buys convolutions nothing
// on CPU. oneDNN has native bf16 kernels (AVX512-BF16, AMX) and is what
// PyTorch's CPU convolutions use. Layouts are JAX's: activations NHWC,
// weights HWIO, both dense row-major.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

enum Kind : int64_t { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

struct Geometry {
  int64_t n, h, w, c;        // input, NHWC
  int64_t kh, kw, o;         // kernel HWIO (I == c)
  int64_t oh, ow;            // output spatial
  int64_t sh, sw, pt, pb, pl, pr;
  memory::data_type dt;
  auto key(int64_t kind) const {
    return std::make_tuple(kind, n, h, w, c, kh, kw, o, sh, sw, pt, pb, pl, pr,
                           static_cast<int>(dt));
  }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

memory::desc Md(memory::dims dims, memory::data_type dt, tag t) { return memory::desc(dims, dt, t); }
memory::desc SrcMd(const Geometry& g) { return Md({g.n, g.c, g.h, g.w}, g.dt, tag::nhwc); }
memory::desc DstMd(const Geometry& g) { return Md({g.n, g.o, g.oh, g.ow}, g.dt, tag::nhwc); }
memory::desc WeightsMd(const Geometry& g, tag t) { return Md({g.o, g.c, g.kh, g.kw}, g.dt, t); }

// Primitives and their descriptors cost far more to create than to run: one set per
// shape. Weights are `tag::any`, so oneDNN picks its own layout; when that differs
// from JAX's HWIO, a cached reorder converts them on each call.
struct Prims {
  dnnl::primitive prim;
  memory::desc weights_md;   // the layout oneDNN chose for the weights
  memory::desc weights_user; // HWIO
  dnnl::primitive reorder;   // weights_user -> weights_md (dw: the other way); empty if equal
  bool same() const { return weights_md == weights_user; }
};

dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g) {
  memory::dims strides{g.sh, g.sw}, pad_l{g.pt, g.pl}, pad_r{g.pb, g.pr};
#if DNNL_VERSION_MAJOR >= 3
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      SrcMd(g), WeightsMd(g, tag::any), DstMd(g), strides, pad_l, pad_r);
#else
  dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_training,
                                    dnnl::algorithm::convolution_direct, SrcMd(g),
                                    WeightsMd(g, tag::any), DstMd(g), strides, pad_l, pad_r);
  return dnnl::convolution_forward::primitive_desc(d, Engine());
#endif
}

// Backward data and backward weights take the same arguments (oneDNN 3.x and 2.x spell
// them differently), with the forward descriptor as a hint.
template <class Bwd>
typename Bwd::primitive_desc BackwardPd(const Geometry& g,
                                        const dnnl::convolution_forward::primitive_desc& fwd) {
  memory::dims strides{g.sh, g.sw}, pad_l{g.pt, g.pl}, pad_r{g.pb, g.pr};
#if DNNL_VERSION_MAJOR >= 3
  return typename Bwd::primitive_desc(Engine(), dnnl::algorithm::convolution_direct, SrcMd(g),
                                      WeightsMd(g, tag::any), DstMd(g), strides, pad_l, pad_r, fwd);
#else
  typename Bwd::desc d(dnnl::algorithm::convolution_direct, SrcMd(g), WeightsMd(g, tag::any),
                       DstMd(g), strides, pad_l, pad_r);
  return typename Bwd::primitive_desc(d, Engine(), fwd);
#endif
}

dnnl::primitive Reorder(const memory::desc& from, const memory::desc& to) {
  return dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
}

Prims Build(const Geometry& g, int64_t kind) {
  auto fwd = ForwardPd(g);
  auto user = WeightsMd(g, tag::hwio);
  Prims p;
  if (kind == kForward) {
    p = {dnnl::convolution_forward(fwd), fwd.weights_desc(), user, {}};
  } else if (kind == kBackwardData) {
    auto pd = BackwardPd<dnnl::convolution_backward_data>(g, fwd);
    p = {dnnl::convolution_backward_data(pd), pd.weights_desc(), user, {}};
  } else {
    auto pd = BackwardPd<dnnl::convolution_backward_weights>(g, fwd);
    p = {dnnl::convolution_backward_weights(pd), pd.diff_weights_desc(), user, {}};
  }
  if (!p.same())
    p.reorder = kind == kBackwardWeights ? Reorder(p.weights_md, user) : Reorder(user, p.weights_md);
  return p;
}

const Prims& Cached(const Geometry& g, int64_t kind) {
  static std::mutex mu;
  static std::map<decltype(g.key(0)), std::unique_ptr<Prims>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[g.key(kind)];
  if (!slot) slot = std::make_unique<Prims>(Build(g, kind));
  return *slot;
}

ffi::Error Run(int64_t kind, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
               int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  auto type = a.element_type();
  if (type != b.element_type() || type != out->element_type())
    return ffi::Error::InvalidArgument("rotjax oneDNN conv: operands must share one dtype");
  memory::data_type dt;
  if (type == ffi::DataType::F32) dt = memory::data_type::f32;
  else if (type == ffi::DataType::BF16) dt = memory::data_type::bf16;
  else return ffi::Error::InvalidArgument("rotjax oneDNN conv: only float32 and bfloat16");
  // (x, w) -> y; (dy, w) -> dx; (x, dy) -> dw.
  auto x_dims = kind == kBackwardData ? out->dimensions() : a.dimensions();
  auto w_dims = kind == kBackwardWeights ? out->dimensions() : b.dimensions();
  auto y_dims = kind == kForward ? out->dimensions() : kind == kBackwardData ? a.dimensions() : b.dimensions();
  if (x_dims.size() != 4 || w_dims.size() != 4 || y_dims.size() != 4)
    return ffi::Error::InvalidArgument("rotjax oneDNN conv: expects NHWC activations, HWIO weights");
  Geometry g{x_dims[0], x_dims[1], x_dims[2], x_dims[3], w_dims[0], w_dims[1], w_dims[3],
             y_dims[1], y_dims[2], sh, sw, pt, pb, pl, pr, dt};
  // One oneDNN call at a time: XLA runs independent thunks (and the devices of
  // a multi-device CPU client) on several threads, and concurrent OpenMP teams
  // from those threads deadlocked GNU libgomp in a 2-device pmap. Each call
  // still uses every core through its own OpenMP team.
  static std::mutex run_mu;
  std::lock_guard<std::mutex> run_lock(run_mu);
  try {
    const Prims& p = Cached(g, kind);
    auto& eng = Engine();
    dnnl::stream stream(eng);
    auto reorder = [&](memory& from, memory& to) {
      p.reorder.execute(stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}});
    };
    if (kind == kBackwardWeights) {
      memory x(SrcMd(g), eng, a.untyped_data()), dy(DstMd(g), eng, b.untyped_data());
      memory dw_user(p.weights_user, eng, out->untyped_data());
      memory dw = p.same() ? dw_user : memory(p.weights_md, eng);
      p.prim.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_DIFF_WEIGHTS, dw}});
      if (!p.same()) reorder(dw, dw_user);
    } else {
      memory w_user(p.weights_user, eng, b.untyped_data());
      memory w = p.same() ? w_user : memory(p.weights_md, eng);
      if (!p.same()) reorder(w_user, w);
      if (kind == kForward) {
        memory x(SrcMd(g), eng, a.untyped_data()), y(DstMd(g), eng, out->untyped_data());
        p.prim.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, y}});
      } else {
        memory dy(DstMd(g), eng, a.untyped_data()), dx(SrcMd(g), eng, out->untyped_data());
        p.prim.execute(stream, {{DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DIFF_SRC, dx}});
      }
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("rotjax oneDNN conv: ") + e.what());
  }
  return ffi::Error::Success();
}

template <int64_t kind>
ffi::Error Impl(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out, int64_t sh,
                int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Run(kind, a, b, out, sh, sw, pt, pb, pl, pr);
}

auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_bottom")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("pad_right");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RotjaxConvForward, Impl<kForward>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(RotjaxConvBackwardData, Impl<kBackwardData>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(RotjaxConvBackwardWeights, Impl<kBackwardWeights>, Binding());
