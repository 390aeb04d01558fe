// Row arithmetic shared by the stoich conv and GATv2 kernels (C++ CPU and
// CUDA): a row of C values of a storage type, read into an accumulator of
// acc_type<storage> (converted on load), in a fixed order so that results
// are deterministic.  Nothing here depends on torch.
#pragma once

#include <stdint.h>

#include "stoichconv/accumulate_type.h"
#include "stoichconv/macros.h"

namespace stoichconv {

// acc[0:C] += coef * src[0:C]   (the body of every segment reduction); src
// may be stored in a narrower type than the accumulator, converted on load.
template <typename acc_t, typename src_t>
SC_INLINE void axpy_row(acc_t* __restrict__ acc, acc_t coef, const src_t* __restrict__ src,
                        int64_t C) {
  SC_SIMD for (int64_t c = 0; c < C; ++c) acc[c] += coef * static_cast<acc_t>(src[c]);
}

// dst[0:C] *= scale
template <typename scalar_t>
SC_INLINE void scale_row(scalar_t* __restrict__ dst, scalar_t scale, int64_t C) {
  SC_SIMD for (int64_t c = 0; c < C; ++c) dst[c] *= scale;
}

// <a, b> over C channels in a fixed order (deterministic), summed in
// acc_type<scalar_t>: kLanes running partial sums (lane i takes channels i,
// i + kLanes, ...) added in lane order, then the tail.  kLanes = 1 is the
// plain sequential sum (the CUDA kernels, which split the channels over
// threads); the CPU kernels use a register's worth of accumulator lanes so
// that the loop vectorises.
template <int kLanes = 1, typename scalar_t>
SC_INLINE acc_type<scalar_t> dot_row(const scalar_t* __restrict__ a,
                                     const scalar_t* __restrict__ b, int64_t C) {
  using acc_t = acc_type<scalar_t>;
  acc_t part[kLanes];
  for (int i = 0; i < kLanes; ++i) part[i] = acc_t(0);
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
    SC_SIMD for (int i = 0; i < kLanes; ++i)
      part[i] += static_cast<acc_t>(a[c + i]) * static_cast<acc_t>(b[c + i]);
  }
  acc_t acc = acc_t(0);
  for (int i = 0; i < kLanes; ++i) acc += part[i];
  for (; c < C; ++c) acc += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
  return acc;
}

}  // namespace stoichconv
