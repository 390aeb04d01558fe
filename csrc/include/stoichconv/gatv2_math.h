// Per-element arithmetic of the fused GATv2 attention (semantics in
// stoichconv/ops/gatv2.py), shared by its C++ CPU kernels and any device port.
// Nothing here depends on torch.
#pragma once

#include <stdint.h>

#include "stoichconv/macros.h"

namespace stoichconv {

// Written as max + slope * min (exactly x or slope * x) so that loops over it
// vectorise without blends.
template <typename scalar_t>
SC_INLINE scalar_t leaky_relu(scalar_t x, scalar_t slope) {
  const scalar_t pos = x > scalar_t(0) ? x : scalar_t(0);
  const scalar_t neg = x > scalar_t(0) ? scalar_t(0) : x;
  return pos + slope * neg;
}

// One head's attention logit of an edge:
//   sum_c att[c] * leaky_relu(x_l[c] + x_r[c])   over C channels,
// in the fixed lane order of dot_row (stoich_conv_math.h): kLanes running sums
// so that CPU builds vectorise; kLanes = 1 is the plain sequential sum.
template <int kLanes = 1, typename scalar_t>
SC_INLINE scalar_t gatv2_logit(const scalar_t* __restrict__ att, const scalar_t* __restrict__ x_l,
                               const scalar_t* __restrict__ x_r, scalar_t slope, int64_t C) {
  scalar_t part[kLanes];
  for (int i = 0; i < kLanes; ++i) part[i] = scalar_t(0);
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
    SC_SIMD for (int i = 0; i < kLanes; ++i)
      part[i] += att[c + i] * leaky_relu(x_l[c + i] + x_r[c + i], slope);
  }
  scalar_t acc = scalar_t(0);
  for (int i = 0; i < kLanes; ++i) acc += part[i];
  for (; c < C; ++c) acc += att[c] * leaky_relu(x_l[c] + x_r[c], slope);
  return acc;
}

}  // namespace stoichconv
