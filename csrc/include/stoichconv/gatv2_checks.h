// Argument checks of the fused GATv2 attention (semantics and dtypes:
// stoichconv.ops.gatv2 docstring), the one copy of every message of its CPU
// launcher (csrc/cpu/gatv2.cpp) and its CUDA launcher (csrc/cuda/gatv2.cpp),
// the device named ("CPU" there, "CUDA" here): the structural checks below,
// then the value checks, which run on the host for CPU tensors and on the
// device for CUDA tensors (launch_validate_edges), reporting the first bad
// value through the same host functions (check_row_pointer of csr_checks.h,
// check_edge_ids).
#pragma once

#include <ATen/ATen.h>

#include "stoichconv/csr_checks.h"
#include "stoichconv/group_softmax_checks.h"  // device_type_name, on_device_of, is_attention_float

namespace stoichconv {

// x_l [Ns, H, C], x_r [Nd, H, C], att [H, C] of one floating type of
// is_attention_float; src, dst [E] and crow [R + 1] 1-D int64; all on `type`
// (one device).
inline void check_gatv2_structure(const at::Tensor& x_l, const at::Tensor& x_r,
                                  const at::Tensor& att, const at::Tensor& src,
                                  const at::Tensor& dst, const at::Tensor& crow,
                                  at::DeviceType type) {
  const char* op = "gatv2";
  const char* dev = device_type_name(type);
  TORCH_CHECK(on_device_of(x_l, x_l, type) && on_device_of(x_r, x_l, type) &&
                  on_device_of(att, x_l, type),
              op, ": tensors must be on ", type == at::kCUDA ? "one CUDA device" : "the CPU");
  TORCH_CHECK(x_l.dim() == 3 && x_r.dim() == 3 && x_l.size(1) == x_r.size(1) &&
                  x_l.size(2) == x_r.size(2),
              op, ": `x_l` [N_src, H, C] and `x_r` [N_dst, H, C] must agree in H, C; got ",
              x_l.sizes(), " and ", x_r.sizes());
  TORCH_CHECK(att.dim() == 2 && att.size(0) == x_l.size(1) && att.size(1) == x_l.size(2), op,
              ": `att` must be [H, C] = [", x_l.size(1), ", ", x_l.size(2), "], got ", att.sizes());
  TORCH_CHECK(x_l.scalar_type() == x_r.scalar_type() && x_l.scalar_type() == att.scalar_type(),
              op, ": `x_l`, `x_r` and `att` must share one dtype, got ", x_l.scalar_type(), ", ",
              x_r.scalar_type(), " and ", att.scalar_type());
  TORCH_CHECK(is_attention_float(x_l.scalar_type()), op,
              ": `x_l` must be float16, bfloat16, float32 or float64, got ", x_l.scalar_type());
  for (const auto* t : {&src, &dst, &crow}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && on_device_of(*t, x_l, type), op,
                ": `src`, `dst` and `crow` must be 1-D int64 ", dev, " tensors",
                type == at::kCUDA ? " on the device of `x_l`" : "");
  }
  TORCH_CHECK(src.size(0) == dst.size(0), op, ": `src` and `dst` must have the same length");
  TORCH_CHECK(crow.size(0) >= 1, op, ": `crow` must have length num_rows + 1 >= 1");
}

// src s [E], dst d [E] (host) must index rows of x_l [0, Ns) and x_r [0, Nd).
// The CPU launcher's loop; the CUDA launcher calls it on the first bad edge
// found on the device.
inline void check_edge_ids(const int64_t* s, const int64_t* d, int64_t E, int64_t Ns, int64_t Nd) {
  const char* op = "gatv2";
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(s[e] >= 0 && s[e] < Ns, op, ": `src` has id ", s[e], " outside [0, ", Ns, ")");
    TORCH_CHECK(d[e] >= 0 && d[e] < Nd, op, ": `dst` has id ", d[e], " outside [0, ", Nd, ")");
  }
}

// The backward's grad_out [R, H, C] and alpha [E, H], of the dtype and device of x_l.
inline void check_gatv2_backward_args(const at::Tensor& grad_out, const at::Tensor& alpha,
                                      const at::Tensor& x_l, int64_t R, int64_t E,
                                      at::DeviceType type) {
  const int64_t H = x_l.size(1), C = x_l.size(2);
  const char* dev = device_type_name(type);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == R && grad_out.size(1) == H &&
                  grad_out.size(2) == C && grad_out.scalar_type() == x_l.scalar_type() &&
                  on_device_of(grad_out, x_l, type),
              "gatv2_backward: `grad_out` must be a ", dev, " tensor [num_rows, H, C] = [", R,
              ", ", H, ", ", C, "] of the dtype of `x_l`");
  TORCH_CHECK(alpha.dim() == 2 && alpha.size(0) == E && alpha.size(1) == H &&
                  alpha.scalar_type() == x_l.scalar_type() && on_device_of(alpha, x_l, type),
              "gatv2_backward: `alpha` must be a ", dev, " tensor [E, H] = [", E, ", ", H,
              "] of the dtype of `x_l`");
}

}  // namespace stoichconv
