// Per-element arithmetic of the grouped softmax over incidences (semantics:
// stoichconv.ops.group_softmax docstring), shared by its C++ CPU kernels
// (csrc/cpu/group_softmax.cpp) and its CUDA kernels
// (csrc/cuda/group_softmax_kernels.cu).  Nothing here depends on torch.  The
// kernels call these with values of the accumulation type (acc_type of the
// storage type, accumulate_type.h), converted on load.
//
// alpha_k = kept_k ? exp(l_k - m) * inv : 0,  m = max over the kept l of k's group,
// inv = 1 / max(sum_group exp(l - m), tiny); a group whose kept logits are all
// -inf (m = -inf) is an empty group: every entry -inf before the exp, 0 after.
#pragma once

#include <stdint.h>

#include <limits>

#include "stoichconv/macros.h"

namespace stoichconv {

// The running group maximum, std::max(m, l) exactly ((m < l) ? l : m): a NaN
// logit never replaces the running maximum.
template <typename scalar_t>
SC_INLINE scalar_t group_max_update(scalar_t m, scalar_t l) {
  return m < l ? l : m;
}

// The shifted logit fed to exp: l - m for a kept incidence of a group with a
// finite maximum, -inf otherwise (exp gives 0, never exp(-inf - -inf) = NaN).
template <typename scalar_t>
SC_INLINE scalar_t group_shifted_logit(scalar_t l, scalar_t m, bool on) {
  constexpr scalar_t kNegInf = -std::numeric_limits<scalar_t>::infinity();
  return on && m != kNegInf ? l - m : kNegInf;
}

// 1 / max(denominator, tiny): alpha = exp(shifted) * inv (0 for an empty group).
template <typename scalar_t>
SC_INLINE scalar_t group_inverse_denominator(scalar_t denom) {
  constexpr scalar_t tiny = std::numeric_limits<scalar_t>::min();
  return scalar_t(1) / (denom < tiny ? tiny : denom);
}

// The softmax backward of one entry: alpha_k (g_k - dot), dot = sum_{j in group} alpha_j g_j.
template <typename scalar_t>
SC_INLINE scalar_t softmax_grad(scalar_t alpha, scalar_t grad, scalar_t dot) {
  return alpha * (grad - dot);
}

}  // namespace stoichconv
