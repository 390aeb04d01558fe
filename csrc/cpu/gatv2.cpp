// C++ CPU kernels of the fused GATv2 attention + aggregation, forward and
// backward (semantics and dtypes: stoichconv.ops.gatv2 docstring).
//
// Edges come sorted by output row (CSR `crow`): one pass over the rows computes
// the logits, the row's softmax and the aggregation; nothing per edge is kept
// but alpha [E, H] (the backward recomputes the pre-activations).
// Every row is written by one thread with sums in a fixed order: bit-identical
// for any thread count, no atomics.  Storage types float16, bfloat16, float32,
// float64; logits, softmax statistics and every sum are in acc_t =
// acc_type<scalar_t> (float for the reduced-precision types, the type itself
// otherwise): a row accumulated for the output is an acc_t scratch row of its
// thread (the output row itself when acc_t is scalar_t), rounded to scalar_t
// once, on store.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "stoichconv/accumulate_type.h"
#include "stoichconv/cpu_isa.h"
#include "stoichconv/csr_checks.h"
#include "stoichconv/gatv2_checks.h"
#include "stoichconv/gatv2_math.h"
#include "stoichconv/size_checks.h"

namespace stoichconv {
namespace {

// The edges of one call, contiguous and kept alive (the kernels and the value
// checks read them through raw pointers).
struct Edges {
  at::Tensor src, dst, crow;
};

// Checks every argument (gatv2_checks.h; the edge values included) and
// returns the edges contiguous.
Edges check_args(const at::Tensor& x_l, const at::Tensor& x_r, const at::Tensor& att,
                 const at::Tensor& src_in, const at::Tensor& dst_in, const at::Tensor& crow_in) {
  check_gatv2_structure(x_l, x_r, att, src_in, dst_in, crow_in, at::kCPU);
  Edges edges{src_in.contiguous(), dst_in.contiguous(), crow_in.contiguous()};
  const int64_t E = edges.src.size(0), R = edges.crow.size(0) - 1;
  check_row_pointer("gatv2", "crow", edges.crow.data_ptr<int64_t>(), R, E, "E");
  check_edge_ids(edges.src.data_ptr<int64_t>(), edges.dst.data_ptr<int64_t>(), E, x_l.size(0),
                 x_r.size(0));
  return edges;
}

// The kernels, compiled once per instruction set: portable code, and AVX2 +
// FMA code chosen at run time when the CPU has it (STOICHCONV_CPU_ISA=default
// forces the portable one; stoichconv/cpu_isa.h).  Both are deterministic;
// they may differ from each other in the last bits (FMA rounds once).
namespace isa_default {
#include "gatv2_kernels.h"
}  // namespace isa_default

#ifdef STOICHCONV_CPU_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#include "gatv2_kernels.h"
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

template <typename scalar_t, typename... Args>
void run_forward(Args&&... args) {
#ifdef STOICHCONV_CPU_AVX2
  if (cpu_isa_avx2()) return isa_avx2::forward_kernel<scalar_t>(std::forward<Args>(args)...);
#endif
  isa_default::forward_kernel<scalar_t>(std::forward<Args>(args)...);
}

template <typename scalar_t, typename... Args>
void run_backward(Args&&... args) {
#ifdef STOICHCONV_CPU_AVX2
  if (cpu_isa_avx2()) return isa_avx2::backward_kernel<scalar_t>(std::forward<Args>(args)...);
#endif
  isa_default::backward_kernel<scalar_t>(std::forward<Args>(args)...);
}


std::tuple<at::Tensor, at::Tensor> gatv2_forward_cpu(const at::Tensor& x_l_in,
                                                     const at::Tensor& x_r_in,
                                                     const at::Tensor& att_in,
                                                     const at::Tensor& src_in,
                                                     const at::Tensor& dst_in,
                                                     const at::Tensor& crow_in,
                                                     double negative_slope) {
  const char* op = "gatv2_forward";
  const Edges edges = check_args(x_l_in, x_r_in, att_in, src_in, dst_in, crow_in);
  const at::Tensor &src = edges.src, &dst = edges.dst, &crow = edges.crow;
  const auto x_l = x_l_in.contiguous(), x_r = x_r_in.contiguous(), att = att_in.contiguous();
  const int64_t R = crow.size(0) - 1, E = src.size(0), H = x_l.size(1), C = x_l.size(2);
  auto out = allocate(op, "out", {R, H, C}, x_l.options());
  auto alpha = allocate(op, "alpha", {E, H}, x_l.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_l.scalar_type(),
                                  "gatv2_forward_cpu", [&] {
    run_forward<scalar_t>(x_l.data_ptr<scalar_t>(), x_r.data_ptr<scalar_t>(),
                             att.data_ptr<scalar_t>(), src.data_ptr<int64_t>(),
                             dst.data_ptr<int64_t>(), crow.data_ptr<int64_t>(), R, E, H, C,
                             static_cast<acc_type<scalar_t>>(negative_slope),
                             out.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>());
  });
  return {out, alpha};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gatv2_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_l_in, const at::Tensor& x_r_in,
    const at::Tensor& att_in, const at::Tensor& alpha_in, const at::Tensor& src_in,
    const at::Tensor& dst_in, const at::Tensor& crow_in, double negative_slope) {
  const Edges edges = check_args(x_l_in, x_r_in, att_in, src_in, dst_in, crow_in);
  const at::Tensor &src = edges.src, &dst = edges.dst, &crow = edges.crow;
  const int64_t R = crow.size(0) - 1, E = src.size(0), H = x_l_in.size(1), C = x_l_in.size(2);
  check_gatv2_backward_args(grad_out_in, alpha_in, x_l_in, R, E, at::kCPU);
  const auto grad_out = grad_out_in.contiguous(), x_l = x_l_in.contiguous(),
             x_r = x_r_in.contiguous(), att = att_in.contiguous(), alpha = alpha_in.contiguous();
  const char* op = "gatv2_backward";
  auto grad_x_l = allocate(op, "grad_x_l", x_l.sizes(), x_l.options());
  auto grad_x_r = allocate(op, "grad_x_r", x_r.sizes(), x_r.options());
  auto grad_att = allocate(op, "grad_att", att.sizes(), att.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_l.scalar_type(),
                                  "gatv2_backward_cpu", [&] {
    run_backward<scalar_t>(grad_out.data_ptr<scalar_t>(), x_l.data_ptr<scalar_t>(),
                              x_r.data_ptr<scalar_t>(), att.data_ptr<scalar_t>(),
                              alpha.data_ptr<scalar_t>(), src.data_ptr<int64_t>(),
                              dst.data_ptr<int64_t>(), crow.data_ptr<int64_t>(), R, E,
                              x_l.size(0), x_r.size(0), H, C,
                              static_cast<acc_type<scalar_t>>(negative_slope),
                              grad_x_l.data_ptr<scalar_t>(), grad_x_r.data_ptr<scalar_t>(),
                              grad_att.data_ptr<scalar_t>());
  });
  return {grad_x_l, grad_x_r, grad_att};
}

}  // namespace

TORCH_LIBRARY_IMPL(stoichconv, CPU, m) {
  m.impl("gatv2_forward", &gatv2_forward_cpu);
  m.impl("gatv2_backward", &gatv2_backward_cpu);
}

}  // namespace stoichconv
