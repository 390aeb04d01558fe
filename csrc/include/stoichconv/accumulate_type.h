// The accumulation type of the CUDA kernels: the type in which a kernel
// instantiated for storage type scalar_t sums, maxes and normalises.  float32
// and float64 accumulate in themselves (the CPU kernels' arithmetic); a
// reduced-precision storage type (bf16 / fp16, once instantiated) maps to
// float here and nowhere else.  Torch-free.
#pragma once

namespace stoichconv {

template <typename scalar_t>
struct AccumulateType {
  using type = scalar_t;
};

template <typename scalar_t>
using acc_type = typename AccumulateType<scalar_t>::type;

}  // namespace stoichconv
