// Per-element arithmetic of the fused GATv2 attention (semantics:
// stoichconv.ops.gatv2 docstring), shared by its C++ CPU kernels and any device port.
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

// d leaky_relu(x) / dx (x = 0 takes the slope, as torch's leaky_relu_backward).
// The CPU build compiles with -fno-trapping-math so that loops over this
// select vectorise (otherwise GCC keeps a branch, mispredicted half the time).
template <typename scalar_t>
SC_INLINE scalar_t leaky_relu_grad(scalar_t x, scalar_t slope) {
  return x > scalar_t(0) ? scalar_t(1) : slope;
}

// The backward's per-channel rows of one edge and head (pre = x_l + x_r):
//   to_src[c] += a * g[c] + gl * att[c] * lrelu'(pre[c])   (the gradient of x_l[src])
//   to_att[c] += gl * lrelu(pre[c])                         (the gradient of att)
template <typename scalar_t>
SC_INLINE void gatv2_source_grad_row(scalar_t* __restrict__ to_src, scalar_t* __restrict__ to_att,
                                     scalar_t a, const scalar_t* __restrict__ g, scalar_t gl,
                                     const scalar_t* __restrict__ att,
                                     const scalar_t* __restrict__ x_l,
                                     const scalar_t* __restrict__ x_r, scalar_t slope, int64_t C) {
  SC_SIMD for (int64_t c = 0; c < C; ++c) {
    const scalar_t pre = x_l[c] + x_r[c];
    to_src[c] += a * g[c] + gl * att[c] * leaky_relu_grad(pre, slope);
    to_att[c] += gl * leaky_relu(pre, slope);
  }
}

//   to_dst[c] += gl * att[c] * lrelu'(x_l[c] + x_r[c])      (the gradient of x_r[dst])
template <typename scalar_t>
SC_INLINE void gatv2_destination_grad_row(scalar_t* __restrict__ to_dst, scalar_t gl,
                                          const scalar_t* __restrict__ att,
                                          const scalar_t* __restrict__ x_l,
                                          const scalar_t* __restrict__ x_r, scalar_t slope,
                                          int64_t C) {
  SC_SIMD for (int64_t c = 0; c < C; ++c)
    to_dst[c] += gl * att[c] * leaky_relu_grad(x_l[c] + x_r[c], slope);
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
