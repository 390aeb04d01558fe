// The accumulation type of the kernels: the type in which a kernel
// instantiated for storage type scalar_t sums, maxes and normalises (the
// policy of stoichconv/ops/_dtypes.py, written once for C++).  float32 and
// float64 accumulate in themselves; the reduced-precision storage types
// (c10::Half = float16, c10::BFloat16) accumulate in float and are converted
// on load and store only.  Torch-free: the c10 types are only declared here.
#pragma once

namespace c10 {
struct Half;
struct BFloat16;
}  // namespace c10

namespace stoichconv {

template <typename scalar_t>
struct AccumulateType {
  using type = scalar_t;
};
template <>
struct AccumulateType<c10::Half> {
  using type = float;
};
template <>
struct AccumulateType<c10::BFloat16> {
  using type = float;
};

template <typename scalar_t>
using acc_type = typename AccumulateType<scalar_t>::type;

}  // namespace stoichconv
