// Per-element arithmetic of the fused GATv2 attention (semantics and dtypes:
// stoichconv.ops.gatv2 docstring), shared by its C++ CPU kernels
// (csrc/cpu/gatv2.cpp) and its CUDA kernels (csrc/cuda/gatv2_kernels.cu).
// Nothing here depends on torch; the plain row sums and dot products
// (axpy_row, dot_row) are the shared ones of stoichconv/row_math.h.
//
// The scalar functions take acc_t values (the accumulation type); the row
// functions read rows of the storage type scalar_t, convert every element to
// acc_t = acc_type<scalar_t> on load and accumulate in acc_t (for float32 and
// float64, acc_t is scalar_t and the conversions are no-ops).
#pragma once

#include <stdint.h>

#include "stoichconv/accumulate_type.h"
#include "stoichconv/macros.h"
#include "stoichconv/row_math.h"

namespace stoichconv {

// Written as max + slope * min (exactly x or slope * x) so that loops over it
// vectorise without blends.
template <typename acc_t>
SC_INLINE acc_t leaky_relu(acc_t x, acc_t slope) {
  const acc_t pos = x > acc_t(0) ? x : acc_t(0);
  const acc_t neg = x > acc_t(0) ? acc_t(0) : x;
  return pos + slope * neg;
}

// d leaky_relu(x) / dx (x = 0 takes the slope, as torch's leaky_relu_backward).
// The CPU build compiles with -fno-trapping-math so that loops over this
// select vectorise (otherwise GCC keeps a branch, mispredicted half the time).
template <typename acc_t>
SC_INLINE acc_t leaky_relu_grad(acc_t x, acc_t slope) {
  return x > acc_t(0) ? acc_t(1) : slope;
}

// One channel of one edge and head (the CUDA kernels split the channels over
// threads and call these; the row functions below are their CPU loops).
//   logit term:        att * lrelu(x_l + x_r)
//   softmax weight:    exp(a - max_row) / (sum_row exp(a - max_row) + 1e-16)  (PyG's softmax)
//   source gradient:   to_src += a * g + gl * att * lrelu'(pre),  to_att += gl * lrelu(pre)
//   destination grad:  gl * att * lrelu'(x_l + x_r)
template <typename acc_t>
SC_INLINE acc_t gatv2_logit_term(acc_t att, acc_t x_l, acc_t x_r, acc_t slope) {
  return att * leaky_relu(x_l + x_r, slope);
}

template <typename acc_t>
SC_INLINE acc_t gatv2_softmax_weight(acc_t numerator, acc_t denom) {
  return numerator / (denom + acc_t(1e-16));
}

// The logit gradient of the row softmax: gl = alpha (ga - dot), ga = <g_row, x_l[src]>,
// dot = sum_row alpha ga.
template <typename acc_t>
SC_INLINE acc_t gatv2_logit_grad(acc_t alpha, acc_t ga, acc_t dot) {
  return alpha * (ga - dot);
}

template <typename acc_t>
SC_INLINE void gatv2_source_grad(acc_t& to_src, acc_t& to_att, acc_t a, acc_t g,
                                 acc_t gl, acc_t att, acc_t x_l, acc_t x_r,
                                 acc_t slope) {
  const acc_t pre = x_l + x_r;
  to_src += a * g + gl * att * leaky_relu_grad(pre, slope);
  to_att += gl * leaky_relu(pre, slope);
}

template <typename acc_t>
SC_INLINE acc_t gatv2_destination_grad(acc_t gl, acc_t att, acc_t x_l, acc_t x_r,
                                          acc_t slope) {
  return gl * att * leaky_relu_grad(x_l + x_r, slope);
}

// The backward's per-channel rows of one edge and head (pre = x_l + x_r), the
// gradients accumulated in acc_t rows. Pass by destination (the edges of one
// output row, next to the logit gradients):
//   to_att[c] += gl * lrelu(pre[c])                         (the gradient of att)
//   to_dst[c] += gl * att[c] * lrelu'(pre[c])               (the gradient of x_r[dst])
template <typename scalar_t, typename acc_t>
SC_INLINE void gatv2_destination_grad_row(acc_t* __restrict__ to_dst, acc_t* __restrict__ to_att,
                                          acc_t gl, const scalar_t* __restrict__ att,
                                          const scalar_t* __restrict__ x_l,
                                          const scalar_t* __restrict__ x_r, acc_t slope,
                                          int64_t C) {
  SC_SIMD for (int64_t c = 0; c < C; ++c) {
    const acc_t pre = acc_t(x_l[c]) + acc_t(x_r[c]);
    to_att[c] += gl * leaky_relu(pre, slope);
    to_dst[c] += gatv2_destination_grad(gl, acc_t(att[c]), acc_t(x_l[c]), acc_t(x_r[c]), slope);
  }
}

//   to_att[c] += gl * lrelu(pre[c])   (the att gradient alone: x_r's gradient taken elsewhere)
template <typename scalar_t, typename acc_t>
SC_INLINE void gatv2_attention_grad_row(acc_t* __restrict__ to_att, acc_t gl,
                                        const scalar_t* __restrict__ x_l,
                                        const scalar_t* __restrict__ x_r, acc_t slope, int64_t C) {
  SC_SIMD for (int64_t c = 0; c < C; ++c)
    to_att[c] += gl * leaky_relu(acc_t(x_l[c]) + acc_t(x_r[c]), slope);
}

//   to_dst[c] += gl * att[c] * lrelu'(pre[c])   (x_r's gradient alone, by destination row)
template <typename scalar_t, typename acc_t>
SC_INLINE void gatv2_x_r_grad_row(acc_t* __restrict__ to_dst, acc_t gl,
                                  const scalar_t* __restrict__ att,
                                  const scalar_t* __restrict__ x_l,
                                  const scalar_t* __restrict__ x_r, acc_t slope, int64_t C) {
  SC_SIMD for (int64_t c = 0; c < C; ++c)
    to_dst[c] += gatv2_destination_grad(gl, acc_t(att[c]), acc_t(x_l[c]), acc_t(x_r[c]), slope);
}

// Pass by source (the edges leaving one source row):
//   to_src[c] += a * g[c] + gl * att[c] * lrelu'(pre[c])   (the gradient of x_l[src])
template <typename scalar_t, typename acc_t>
SC_INLINE void gatv2_source_grad_row(acc_t* __restrict__ to_src, acc_t a,
                                     const scalar_t* __restrict__ g, acc_t gl,
                                     const scalar_t* __restrict__ att,
                                     const scalar_t* __restrict__ x_l,
                                     const scalar_t* __restrict__ x_r, acc_t slope, int64_t C) {
  SC_SIMD for (int64_t c = 0; c < C; ++c)
    to_src[c] += a * acc_t(g[c]) +
                 gl * acc_t(att[c]) * leaky_relu_grad(acc_t(x_l[c]) + acc_t(x_r[c]), slope);
}

// One head's attention logit of an edge:
//   sum_c att[c] * leaky_relu(x_l[c] + x_r[c])   over C channels,
// in a fixed lane order: kLanes running sums (lane i takes channels i,
// i + kLanes, ...) added in lane order, then the tail, so that CPU builds
// vectorise; kLanes = 1 is the plain sequential sum.
template <int kLanes = 1, typename scalar_t, typename acc_t>
SC_INLINE acc_t gatv2_logit(const scalar_t* __restrict__ att, const scalar_t* __restrict__ x_l,
                            const scalar_t* __restrict__ x_r, acc_t slope, int64_t C) {
  acc_t part[kLanes];
  for (int i = 0; i < kLanes; ++i) part[i] = acc_t(0);
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
    SC_SIMD for (int i = 0; i < kLanes; ++i)
      part[i] += gatv2_logit_term(acc_t(att[c + i]), acc_t(x_l[c + i]), acc_t(x_r[c + i]), slope);
  }
  acc_t acc = acc_t(0);
  for (int i = 0; i < kLanes; ++i) acc += part[i];
  for (; c < C; ++c) acc += gatv2_logit_term(acc_t(att[c]), acc_t(x_l[c]), acc_t(x_r[c]), slope);
  return acc;
}

}  // namespace stoichconv

