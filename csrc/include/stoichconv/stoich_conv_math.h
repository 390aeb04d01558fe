// Per-row arithmetic of the signed stoichiometric propagation, shared by the
// C++ CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda).  Nothing here
// depends on torch: the CPU tests exercise exactly the math the GPU runs.
//
// Notation (full semantics: stoichconv.ops.stoich_conv docstring):
//   y      [B, N, H, C]  transformed metabolite features
//   w      [B, nnz, H]   per-incidence weight s_k * g_k * alpha_k,h
//   keep   [B, M]        optional reaction keep-mask (masked incidences weigh 0)
//   D_v  = 1 / sum_{k: v_k = v, kept} |s_k|   (0 where the sum is 0)
//   B_e  = 1 / sum_{k: e_k = e, kept} |s_k|   (0 where the sum is 0)
//
// Storage and accumulation types: features, weights and rows are stored as
// scalar_t (float16, bfloat16, float32 or float64); every sum runs in
// acc_type<scalar_t> (stoichconv/accumulate_type.h: float for the 16-bit
// types, the type itself for float32 / float64), each stored value converted
// on load.  For float32 / float64 the conversions are no-ops: the arithmetic
// is exactly that of a kernel written in the storage type.
#pragma once

#include <stdint.h>

#include "stoichconv/accumulate_type.h"
#include "stoichconv/macros.h"
#include "stoichconv/row_math.h"

namespace stoichconv {

// Reciprocal of a degree sum, 0 for an empty (or fully masked) row.
template <typename scalar_t>
SC_INLINE scalar_t degree_norm(scalar_t abs_sum) {
  return abs_sum > scalar_t(0) ? scalar_t(1) / abs_sum : scalar_t(0);
}

// Whether incidence k of sample b is kept: its reaction e is kept (or there
// is no mask).  `keep` is a [B, M] row-major byte mask or nullptr.
SC_INLINE bool incidence_kept(const bool* keep, int64_t b, int64_t num_reactions,
                              int64_t e) {
  return keep == nullptr || keep[b * num_reactions + e];
}

// dL/dw_k for one incidence and head, in acc_type<scalar_t> (the norms are
// statistics, stored in that type):
//   D_v * <G_v, h_e> + B_e * <R_e, Y_v>
template <int kLanes = 1, typename scalar_t>
SC_INLINE acc_type<scalar_t> incidence_weight_grad(acc_type<scalar_t> node_norm,
                                                   const scalar_t* grad_out_v,
                                                   const scalar_t* hidden_e,
                                                   acc_type<scalar_t> edge_norm,
                                                   const scalar_t* grad_hidden_e,
                                                   const scalar_t* y_v, int64_t C) {
  return node_norm * dot_row<kLanes>(grad_out_v, hidden_e, C) +
         edge_norm * dot_row<kLanes>(grad_hidden_e, y_v, C);
}

}  // namespace stoichconv
