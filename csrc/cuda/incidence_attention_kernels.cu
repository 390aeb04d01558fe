// CUDA kernels of the fused incidence attention (forward, the logit gradients
// and the per-metabolite / per-reaction sums of the backward).
//
// Only CUDA headers, the project's torch-free headers and the header-only c10
// scalar types; csrc/cuda/incidence_attention.cpp is the torch launcher.  The
// per-element arithmetic is incidence_attention_math.h, the functions the CPU
// kernels (csrc/cpu/incidence_attention.cpp) run.
//
// Design: one thread per (sample, group, head) row (grid-stride), rows
// numbered head-fastest.  Forward, three passes over the row in CSR order:
// the kept maximum of the logits (gathered from the two scores and passed
// through the leaky ReLU in registers), the sum of the exps, the scaled exps
// (recomputed, not stored).  Backward: the dot sum alpha * grad, then d pre
// into an acc_t buffer; then one thread per (output sample, metabolite or
// reaction, head) row sums it over the row's incidences in CSR order, the
// batch outer and ascending.  Every entry is written by the thread that owns
// it: deterministic, no atomics.  The kernels trust their input: the
// launcher validates it first.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <limits>

#include "stoichconv/accumulate_type.h"
#include "stoichconv/cuda_team.cuh"
#include "stoichconv/incidence_attention_cuda.h"
#include "stoichconv/incidence_attention_math.h"

namespace stoichconv {
namespace cuda {
namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return unsigned(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

__device__ __forceinline__ int64_t first_row() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t row_stride() { return int64_t(gridDim.x) * blockDim.x; }

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void scores_at(const IncidenceGeometry& g, const scalar_t* sv_b,
                                          const scalar_t* se_b, int64_t k, int64_t h, acc_t& v,
                                          acc_t& e) {
  v = acc_t(sv_b[g.metabolite_index[k] * g.H + h]);
  e = acc_t(se_b[g.reaction_index[k] * g.H + h]);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const IncidenceGeometry g, const scalar_t* __restrict__ score_v,
                   const scalar_t* __restrict__ score_e, const bool* __restrict__ kept,
                   acc_type<scalar_t> slope, scalar_t* __restrict__ alpha) {
  using acc_t = acc_type<scalar_t>;
  const int64_t rows = g.B * g.G * g.H;
  for (int64_t row = first_row(); row < rows; row += row_stride()) {
    const int64_t h = row % g.H, bg = row / g.H;
    const int64_t grp = bg % g.G, b = bg / g.G;
    const int64_t begin = g.group_ptr[grp], end = g.group_ptr[grp + 1];
    const scalar_t* sv_b = score_v + b * g.N * g.H;
    const scalar_t* se_b = score_e + (g.Be == 1 ? 0 : b) * g.M * g.H;
    const bool* kept_b = kept != nullptr ? kept + b * g.nnz : nullptr;
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = begin; j < end; ++j) {
      const int64_t k = g.group_perm[j];
      if (kept_b != nullptr && !kept_b[k]) continue;
      acc_t v, e;
      scores_at(g, sv_b, se_b, k, h, v, e);
      m = group_max_update(m, incidence_logit(v, e, slope));
    }
    acc_t denom = acc_t(0);
    for (int64_t j = begin; j < end; ++j) {
      const int64_t k = g.group_perm[j];
      acc_t v, e;
      scores_at(g, sv_b, se_b, k, h, v, e);
      denom += exp_acc(group_shifted_logit(incidence_logit(v, e, slope), m,
                                           kept_b == nullptr || kept_b[k]));
    }
    const acc_t inv = group_inverse_denominator(denom);
    for (int64_t j = begin; j < end; ++j) {
      const int64_t k = g.group_perm[j];
      acc_t v, e;
      scores_at(g, sv_b, se_b, k, h, v, e);
      const acc_t x = exp_acc(group_shifted_logit(incidence_logit(v, e, slope), m,
                                                  kept_b == nullptr || kept_b[k]));
      alpha[(b * g.nnz + k) * g.H + h] = scalar_t(x * inv);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    pre_grad_kernel(const IncidenceGeometry g, const scalar_t* __restrict__ grad,
                    const scalar_t* __restrict__ alpha, const scalar_t* __restrict__ score_v,
                    const scalar_t* __restrict__ score_e, acc_t slope, acc_t* __restrict__ dpre) {
  const int64_t rows = g.B * g.G * g.H;
  for (int64_t row = first_row(); row < rows; row += row_stride()) {
    const int64_t h = row % g.H, bg = row / g.H;
    const int64_t grp = bg % g.G, b = bg / g.G;
    const int64_t begin = g.group_ptr[grp], end = g.group_ptr[grp + 1];
    const scalar_t* sv_b = score_v + b * g.N * g.H;
    const scalar_t* se_b = score_e + (g.Be == 1 ? 0 : b) * g.M * g.H;
    const int64_t off = b * g.nnz * g.H + h;
    acc_t dot = acc_t(0);
    for (int64_t j = begin; j < end; ++j) {
      const int64_t i = off + g.group_perm[j] * g.H;
      dot += acc_t(alpha[i]) * acc_t(grad[i]);
    }
    for (int64_t j = begin; j < end; ++j) {
      const int64_t k = g.group_perm[j];
      const int64_t i = off + k * g.H;
      acc_t v, e;
      scores_at(g, sv_b, se_b, k, h, v, e);
      dpre[i] = incidence_pre_grad(acc_t(alpha[i]), acc_t(grad[i]), dot, v, e, slope);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    row_sum_kernel(const acc_t* __restrict__ dpre, const int64_t* __restrict__ ptr,
                   const int64_t* __restrict__ perm, int64_t outs, int64_t per, int64_t R,
                   int64_t nnz, int64_t H, scalar_t* __restrict__ out) {
  const int64_t rows = outs * R * H;
  for (int64_t row = first_row(); row < rows; row += row_stride()) {
    const int64_t h = row % H, orow = row / H;
    const int64_t r = orow % R, o = orow / R;
    acc_t acc = acc_t(0);
    for (int64_t b = o * per; b < o * per + per; ++b)
      for (int64_t j = ptr[r]; j < ptr[r + 1]; ++j) acc += dpre[(b * nnz + perm[j]) * H + h];
    out[row] = scalar_t(acc);
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_incidence_attention_forward(const IncidenceGeometry& g, const scalar_t* score_v,
                                               const scalar_t* score_e, const bool* kept,
                                               double slope, scalar_t* alpha, cudaStream_t stream) {
  const int64_t rows = g.B * g.G * g.H;
  if (rows == 0 || g.nnz == 0) return cudaSuccess;
  forward_kernel<scalar_t><<<blocks_for(rows), kThreads, 0, stream>>>(
      g, score_v, score_e, kept, acc_type<scalar_t>(slope), alpha);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_incidence_attention_pre_grad(const IncidenceGeometry& g, const scalar_t* grad,
                                                const scalar_t* alpha, const scalar_t* score_v,
                                                const scalar_t* score_e, double slope, acc_t* dpre,
                                                cudaStream_t stream) {
  const int64_t rows = g.B * g.G * g.H;
  if (rows == 0 || g.nnz == 0) return cudaSuccess;
  pre_grad_kernel<scalar_t, acc_t><<<blocks_for(rows), kThreads, 0, stream>>>(
      g, grad, alpha, score_v, score_e, acc_t(slope), dpre);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_incidence_row_sums(const acc_t* dpre, const int64_t* ptr, const int64_t* perm,
                                      int64_t outs, int64_t per, int64_t R, int64_t nnz, int64_t H,
                                      scalar_t* out, cudaStream_t stream) {
  const int64_t rows = outs * R * H;
  if (rows == 0) return cudaSuccess;
  row_sum_kernel<scalar_t, acc_t><<<blocks_for(rows), kThreads, 0, stream>>>(
      dpre, ptr, perm, outs, per, R, nnz, H, out);
  return cudaGetLastError();
}

// The instantiated storage types (the launcher's dispatch takes the same).
#define STOICHCONV_INSTANTIATE(scalar_t)                                                       \
  template cudaError_t launch_incidence_attention_forward<scalar_t>(                           \
      const IncidenceGeometry&, const scalar_t*, const scalar_t*, const bool*, double,         \
      scalar_t*, cudaStream_t);                                                                \
  template cudaError_t launch_incidence_attention_pre_grad<scalar_t, acc_type<scalar_t>>(      \
      const IncidenceGeometry&, const scalar_t*, const scalar_t*, const scalar_t*,             \
      const scalar_t*, double, acc_type<scalar_t>*, cudaStream_t);                             \
  template cudaError_t launch_incidence_row_sums<scalar_t, acc_type<scalar_t>>(                \
      const acc_type<scalar_t>*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t,    \
      int64_t, int64_t, scalar_t*, cudaStream_t);
STOICHCONV_INSTANTIATE(c10::Half)
STOICHCONV_INSTANTIATE(c10::BFloat16)
STOICHCONV_INSTANTIATE(float)
STOICHCONV_INSTANTIATE(double)
#undef STOICHCONV_INSTANTIATE

}  // namespace cuda
}  // namespace stoichconv
