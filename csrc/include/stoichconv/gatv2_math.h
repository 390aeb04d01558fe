// Per-element arithmetic of the fused GATv2 attention (semantics:
// stoichconv.ops.gatv2 docstring), shared by its C++ CPU kernels
// (csrc/cpu/gatv2.cpp) and its CUDA kernels (csrc/cuda/gatv2_kernels.cu).
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

// One channel of one edge and head (the CUDA kernels split the channels over
// threads and call these; the row functions below are their CPU loops).
//   logit term:        att * lrelu(x_l + x_r)
//   softmax weight:    exp(a - max_row) / (sum_row exp(a - max_row) + 1e-16)  (PyG's softmax)
//   source gradient:   to_src += a * g + gl * att * lrelu'(pre),  to_att += gl * lrelu(pre)
//   destination grad:  gl * att * lrelu'(x_l + x_r)
template <typename scalar_t>
SC_INLINE scalar_t gatv2_logit_term(scalar_t att, scalar_t x_l, scalar_t x_r, scalar_t slope) {
  return att * leaky_relu(x_l + x_r, slope);
}

template <typename scalar_t>
SC_INLINE scalar_t gatv2_softmax_weight(scalar_t numerator, scalar_t denom) {
  return numerator / (denom + scalar_t(1e-16));
}

// The logit gradient of the row softmax: gl = alpha (ga - dot), ga = <g_row, x_l[src]>,
// dot = sum_row alpha ga.
template <typename scalar_t>
SC_INLINE scalar_t gatv2_logit_grad(scalar_t alpha, scalar_t ga, scalar_t dot) {
  return alpha * (ga - dot);
}

template <typename scalar_t>
SC_INLINE void gatv2_source_grad(scalar_t& to_src, scalar_t& to_att, scalar_t a, scalar_t g,
                                 scalar_t gl, scalar_t att, scalar_t x_l, scalar_t x_r,
                                 scalar_t slope) {
  const scalar_t pre = x_l + x_r;
  to_src += a * g + gl * att * leaky_relu_grad(pre, slope);
  to_att += gl * leaky_relu(pre, slope);
}

template <typename scalar_t>
SC_INLINE scalar_t gatv2_destination_grad(scalar_t gl, scalar_t att, scalar_t x_l, scalar_t x_r,
                                          scalar_t slope) {
  return gl * att * leaky_relu_grad(x_l + x_r, slope);
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
  SC_SIMD for (int64_t c = 0; c < C; ++c)
    gatv2_source_grad(to_src[c], to_att[c], a, g[c], gl, att[c], x_l[c], x_r[c], slope);
}

//   to_dst[c] += gl * att[c] * lrelu'(x_l[c] + x_r[c])      (the gradient of x_r[dst])
template <typename scalar_t>
SC_INLINE void gatv2_destination_grad_row(scalar_t* __restrict__ to_dst, scalar_t gl,
                                          const scalar_t* __restrict__ att,
                                          const scalar_t* __restrict__ x_l,
                                          const scalar_t* __restrict__ x_r, scalar_t slope,
                                          int64_t C) {
  SC_SIMD for (int64_t c = 0; c < C; ++c)
    to_dst[c] += gatv2_destination_grad(gl, att[c], x_l[c], x_r[c], slope);
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
      part[i] += gatv2_logit_term(att[c + i], x_l[c + i], x_r[c + i], slope);
  }
  scalar_t acc = scalar_t(0);
  for (int i = 0; i < kLanes; ++i) acc += part[i];
  for (; c < C; ++c) acc += gatv2_logit_term(att[c], x_l[c], x_r[c], slope);
  return acc;
}

}  // namespace stoichconv
