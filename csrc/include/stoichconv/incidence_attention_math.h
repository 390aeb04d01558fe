// Per-element arithmetic of the fused incidence attention (semantics:
// stoichconv.ops.incidence_attention docstring), shared by its C++ CPU kernels
// (csrc/cpu/incidence_attention.cpp) and its CUDA kernels
// (csrc/cuda/incidence_attention_kernels.cu).  Nothing here depends on torch;
// the kernels call these with values of the accumulation type, converted on
// load.  The softmax steps are those of group_softmax_math.h, the leaky ReLU
// and its derivative those of gatv2_math.h.
//
//   pre_k = score_v[b, metabolite_k, h] + score_e[b or 0, reaction_k, h]
//   l_k   = leaky_relu(pre_k, slope)
//   alpha = grouped softmax of l (group_softmax_math.h)
//   d pre_k = alpha_k (g_k - sum_group alpha_j g_j) * leaky_relu'(pre_k)
#pragma once

#include "stoichconv/gatv2_math.h"
#include "stoichconv/group_softmax_math.h"
#include "stoichconv/macros.h"

namespace stoichconv {

// The logit of one incidence and head from its two scores.
template <typename acc_t>
SC_INLINE acc_t incidence_logit(acc_t score_v, acc_t score_e, acc_t slope) {
  return leaky_relu(score_v + score_e, slope);
}

// The gradient w.r.t. pre = score_v + score_e of one entry, from its alpha,
// its incoming gradient and the group's dot sum alpha * grad.
template <typename acc_t>
SC_INLINE acc_t incidence_pre_grad(acc_t alpha, acc_t grad, acc_t dot, acc_t score_v,
                                   acc_t score_e, acc_t slope) {
  return softmax_grad(alpha, grad, dot) * leaky_relu_grad(score_v + score_e, slope);
}

}  // namespace stoichconv
