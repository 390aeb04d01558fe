// CUDA dispatch of the fused GATv2 attention + aggregation: argument checks
// (the CPU launcher's errors, stoichconv/gatv2_checks.h), allocation, the
// grouping of the edges by source and destination for the backward (stable
// sorts, so that every gradient row sums its edges in edge order) and the
// current stream; the kernels live in gatv2_kernels.cu behind the torch-free
// launch functions of stoichconv/gatv2_cuda.h.  Only c10/cuda headers (not
// ATen/cuda/CUDAContext.h, which needs cusparse.h).
//
// Host synchronisation: one per call, to read the device-side validation of
// src / dst / crow (a hand-made edge set raises the CPU kernel's error instead
// of reading out of bounds).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <type_traits>

#include "stoichconv/csr_checks.h"
#include "stoichconv/gatv2_checks.h"
#include "stoichconv/gatv2_cuda.h"
#include "stoichconv/size_checks.h"

namespace stoichconv {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// The one dtype dispatch of this file (the storage types instantiated in
// gatv2_kernels.cu: float16, bfloat16, float32, float64; check_gatv2_structure
// admits the same).
template <typename F>
void dispatch_floating(at::ScalarType type, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "gatv2_cuda",
                                  [&] { f(scalar_t(0)); });
}

// The contiguous edges of one call, kept alive, and their device view.
struct Edges {
  at::Tensor src, dst, crow;
  cuda::GatGeometry geometry;
};

// Checks every argument, the edge values on the device (raising the CPU
// kernel's error for the first bad one), and returns the edges contiguous.
Edges prepare_edges(const at::Tensor& x_l, const at::Tensor& x_r, const at::Tensor& att,
                    const at::Tensor& src_in, const at::Tensor& dst_in, const at::Tensor& crow_in,
                    cudaStream_t stream) {
  const char* op = "gatv2";
  check_gatv2_structure(x_l, x_r, att, src_in, dst_in, crow_in, at::kCUDA);
  Edges edges{src_in.contiguous(), dst_in.contiguous(), crow_in.contiguous(), {}};
  const int64_t E = edges.src.size(0), R = edges.crow.size(0) - 1;
  const int64_t Ns = x_l.size(0), Nd = x_r.size(0);
  edges.geometry = cuda::GatGeometry{R,
                                     E,
                                     Ns,
                                     Nd,
                                     x_l.size(1),
                                     x_l.size(2),
                                     edges.src.data_ptr<int64_t>(),
                                     edges.dst.data_ptr<int64_t>(),
                                     edges.crow.data_ptr<int64_t>()};
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  auto status = at::full({cuda::kEdgeStatusSize}, kNone, edges.src.options());
  check_launch(cuda::launch_validate_edges(edges.geometry, status.data_ptr<int64_t>(), stream), op);
  const auto host = status.cpu();
  const int64_t* st = host.data_ptr<int64_t>();
  if (st[0] != 0) {  // witness of bad ends: the same message as the CPU check
    const int64_t w[2] = {1, 0};
    check_row_pointer(op, "crow", w, 1, E, "E");
  }
  if (st[1] != kNone) {  // witness of a decrease
    const int64_t w[3] = {0, 1, 0};
    check_row_pointer(op, "crow", w, 2, 0, "E");
  }
  if (st[2] != kNone) {  // the first bad edge
    const int64_t s = edges.src[st[2]].item<int64_t>(), d = edges.dst[st[2]].item<int64_t>();
    check_edge_ids(&s, &d, 1, Ns, Nd);
  }
  TORCH_CHECK(st[0] == 0 && st[1] == kNone && st[2] == kNone, op, ": invalid `src` / `dst` / `crow`");
  return edges;
}

std::tuple<at::Tensor, at::Tensor> gatv2_forward_cuda(const at::Tensor& x_l_in,
                                                      const at::Tensor& x_r_in,
                                                      const at::Tensor& att_in,
                                                      const at::Tensor& src, const at::Tensor& dst,
                                                      const at::Tensor& crow,
                                                      double negative_slope) {
  const char* op = "gatv2_forward";
  TORCH_CHECK(x_l_in.is_cuda(), "gatv2: tensors must be on one CUDA device");
  const c10::cuda::CUDAGuard guard(x_l_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x_l_in.device().index()).stream();
  const Edges edges = prepare_edges(x_l_in, x_r_in, att_in, src, dst, crow, stream);
  const cuda::GatGeometry& g = edges.geometry;
  const auto x_l = x_l_in.contiguous(), x_r = x_r_in.contiguous(), att = att_in.contiguous();
  auto out = allocate(op, "out", {g.R, g.H, g.C}, x_l.options());
  auto alpha = allocate(op, "alpha", {g.E, g.H}, x_l.options());
  dispatch_floating(x_l.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    using acc_t = acc_type<scalar_t>;
    // The logits and softmax weights in acc_t: alpha itself when scalar_t is acc_t.
    const at::Tensor weights =
        std::is_same<acc_t, scalar_t>::value
            ? alpha
            : allocate(op, "the softmax weights", {g.E, g.H},
                       x_l.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    check_launch(cuda::launch_gatv2_forward<scalar_t>(
                     g, x_l.data_ptr<scalar_t>(), x_r.data_ptr<scalar_t>(),
                     att.data_ptr<scalar_t>(), negative_slope, out.data_ptr<scalar_t>(),
                     alpha.data_ptr<scalar_t>(), weights.data_ptr<acc_t>(), stream),
                 op);
  });
  return {out, alpha};
}

// Edge ids grouped by `key` in [0, num_keys) (a stable sort: increasing within
// a key) and the CSR pointer [num_keys + 1] of the groups.  No host
// synchronisation.
std::tuple<at::Tensor, at::Tensor> group_edges_by(const at::Tensor& key, int64_t num_keys) {
  at::Tensor sorted, order;
  std::tie(sorted, order) = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto ptr = at::searchsorted(sorted, at::arange(num_keys + 1, key.options()));
  return {order.contiguous(), ptr.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gatv2_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_l_in, const at::Tensor& x_r_in,
    const at::Tensor& att_in, const at::Tensor& alpha_in, const at::Tensor& src,
    const at::Tensor& dst, const at::Tensor& crow, double negative_slope) {
  const char* op = "gatv2_backward";
  TORCH_CHECK(x_l_in.is_cuda(), "gatv2: tensors must be on one CUDA device");
  const c10::cuda::CUDAGuard guard(x_l_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x_l_in.device().index()).stream();
  const Edges edges = prepare_edges(x_l_in, x_r_in, att_in, src, dst, crow, stream);
  const cuda::GatGeometry& g = edges.geometry;
  check_gatv2_backward_args(grad_out_in, alpha_in, x_l_in, g.R, g.E, at::kCUDA);
  const auto grad_out = grad_out_in.contiguous(), x_l = x_l_in.contiguous(),
             x_r = x_r_in.contiguous(), att = att_in.contiguous(), alpha = alpha_in.contiguous();
  auto grad_x_l = allocate(op, "grad_x_l", x_l.sizes(), x_l.options());
  auto grad_x_r = allocate(op, "grad_x_r", x_r.sizes(), x_r.options());
  auto grad_att = allocate(op, "grad_att", att.sizes(), att.options());
  if (g.E == 0) {  // no edge: every gradient is 0
    grad_x_l.zero_();
    grad_x_r.zero_();
    grad_att.zero_();
    return {grad_x_l, grad_x_r, grad_att};
  }
  at::Tensor by_src, src_ptr, by_dst, dst_ptr;
  std::tie(by_src, src_ptr) = group_edges_by(edges.src, g.Ns);
  std::tie(by_dst, dst_ptr) = group_edges_by(edges.dst, g.Nd);
  const cuda::EdgeGroups groups{src_ptr.data_ptr<int64_t>(), by_src.data_ptr<int64_t>(),
                                dst_ptr.data_ptr<int64_t>(), by_dst.data_ptr<int64_t>()};
  auto row_of = allocate(op, "the edges' rows", {g.E}, edges.src.options());
  dispatch_floating(x_l.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    using acc_t = acc_type<scalar_t>;
    const auto acc_opts = x_l.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor grad_logit = allocate(op, "the logit gradient", {g.E, g.H}, acc_opts);
    at::Tensor att_partial = allocate(op, "the grad_att partial sums",
                                {cuda::gatv2_att_partials(g.Ns), g.H, g.C}, acc_opts);
    check_launch(cuda::launch_gatv2_backward<scalar_t>(
                     g, groups, grad_out.data_ptr<scalar_t>(), x_l.data_ptr<scalar_t>(),
                     x_r.data_ptr<scalar_t>(), att.data_ptr<scalar_t>(),
                     alpha.data_ptr<scalar_t>(), negative_slope, grad_x_l.data_ptr<scalar_t>(),
                     grad_x_r.data_ptr<scalar_t>(), grad_att.data_ptr<scalar_t>(),
                     grad_logit.data_ptr<acc_t>(), row_of.data_ptr<int64_t>(),
                     att_partial.data_ptr<acc_t>(), stream),
                 op);
  });
  return {grad_x_l, grad_x_r, grad_att};
}

}  // namespace

TORCH_LIBRARY_IMPL(stoichconv, CUDA, m) {
  m.impl("gatv2_forward", &gatv2_forward_cuda);
  m.impl("gatv2_backward", &gatv2_backward_cuda);
}

}  // namespace stoichconv
