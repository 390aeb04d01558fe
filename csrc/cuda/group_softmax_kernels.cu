// CUDA kernels of the grouped softmax over incidences (forward + backward)
// and the device-side validation of its CSR ordering.
//
// Only CUDA headers, the project's torch-free headers and the header-only
// c10 scalar types (c10::Half, c10::BFloat16): this file compiles in seconds;
// csrc/cuda/group_softmax.cpp is the torch launcher.  The
// per-element arithmetic is group_softmax_math.h, the functions the CPU
// kernels (csrc/cpu/group_softmax.cpp) run.
//
// Design
// ------
// * One team of T lanes (cuda_team.cuh) per (sample, group, head) row; T is
//   the group size rounded up to a power of two (mean nnz / G, 1..32), so a
//   warp packs 32 / T short rows (reactions hold 2-8 incidences).  The row's
//   entries are strided over the lanes, any length (currency metabolites:
//   hundreds) in one team.  Rows are numbered head-fastest, so the teams of a
//   (sample, group) are neighbours and share its group_perm reads.
// * Forward, three passes over the row: the kept maximum, the sum of the
//   exps, the scaled exps (recomputed, not stored: one write per entry).
//   Backward, two: the dot sum alpha * grad, then alpha * (grad - dot).
//   Lane partials are combined by a fixed xor butterfly: deterministic, no
//   atomics; every entry is written by the lane that owns it.
// * Storage types float16, bfloat16, float32, float64 (semantics and dtypes:
//   stoichconv.ops.group_softmax docstring).  Every value is converted to
//   acc_type<scalar_t> on load (float for float16 / bfloat16, the storage
//   type otherwise): the maximum, the exps, the sums and the products are in
//   acc_t, and each entry is rounded to scalar_t once, on store.
// * The kernels trust their input: the launcher runs launch_validate_groups
//   first (one host synchronisation) and raises the CPU kernel's errors.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <limits>

#include "stoichconv/accumulate_type.h"
#include "stoichconv/cuda_team.cuh"
#include "stoichconv/group_softmax_cuda.h"
#include "stoichconv/group_softmax_math.h"

namespace stoichconv {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, int T>
__global__ void __launch_bounds__(kThreads)
    group_softmax_forward_kernel(const GroupGeometry g, const scalar_t* __restrict__ logits,
                                 const bool* __restrict__ kept, scalar_t* __restrict__ alpha) {
  using acc_t = acc_type<scalar_t>;
  const Team<T> team;
  const int64_t rows = g.B * g.G * g.H;
  const int64_t* __restrict__ perm = g.group_perm;
  for (int64_t row = Team<T>::global_index(); row < rows; row += Team<T>::grid_teams()) {
    const int64_t h = row % g.H, bg = row / g.H;
    const int64_t grp = bg % g.G, b = bg / g.G;
    const int64_t begin = g.group_ptr[grp], end = g.group_ptr[grp + 1];
    const scalar_t* __restrict__ l_b = logits + b * g.nnz * g.H + h;
    scalar_t* __restrict__ a_b = alpha + b * g.nnz * g.H + h;
    const bool* __restrict__ kept_b = kept != nullptr ? kept + b * g.nnz : nullptr;

    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = begin + team.lane; j < end; j += T) {
      const int64_t k = perm[j];
      if (kept_b == nullptr || kept_b[k]) m = group_max_update(m, acc_t(l_b[k * g.H]));
    }
    m = team.reduce(m, [](acc_t x, acc_t y) { return group_max_update(x, y); });

    acc_t denom = acc_t(0);
    for (int64_t j = begin + team.lane; j < end; j += T) {
      const int64_t k = perm[j];
      const bool on = kept_b == nullptr || kept_b[k];
      denom += exp_acc(group_shifted_logit(acc_t(l_b[k * g.H]), m, on));
    }
    const acc_t inv = group_inverse_denominator(team.sum(denom));

    for (int64_t j = begin + team.lane; j < end; j += T) {
      const int64_t k = perm[j];
      const bool on = kept_b == nullptr || kept_b[k];
      a_b[k * g.H] = scalar_t(exp_acc(group_shifted_logit(acc_t(l_b[k * g.H]), m, on)) * inv);
    }
  }
}

template <typename scalar_t, int T>
__global__ void __launch_bounds__(kThreads)
    group_softmax_backward_kernel(const GroupGeometry g, const scalar_t* __restrict__ grad,
                                  const scalar_t* __restrict__ alpha,
                                  scalar_t* __restrict__ grad_logits) {
  using acc_t = acc_type<scalar_t>;
  const Team<T> team;
  const int64_t rows = g.B * g.G * g.H;
  const int64_t* __restrict__ perm = g.group_perm;
  for (int64_t row = Team<T>::global_index(); row < rows; row += Team<T>::grid_teams()) {
    const int64_t h = row % g.H, bg = row / g.H;
    const int64_t grp = bg % g.G, b = bg / g.G;
    const int64_t begin = g.group_ptr[grp], end = g.group_ptr[grp + 1];
    const int64_t off = b * g.nnz * g.H + h;
    acc_t dot = acc_t(0);
    for (int64_t j = begin + team.lane; j < end; j += T) {
      const int64_t i = off + perm[j] * g.H;
      dot += acc_t(alpha[i]) * acc_t(grad[i]);
    }
    dot = team.sum(dot);
    for (int64_t j = begin + team.lane; j < end; j += T) {
      const int64_t i = off + perm[j] * g.H;
      grad_logits[i] = scalar_t(softmax_grad(acc_t(alpha[i]), acc_t(grad[i]), dot));
    }
  }
}

// ---------------------------------------------------------------------------
// Validation (atomics on the status words only, never on a result).
// ---------------------------------------------------------------------------
__device__ __forceinline__ void record_first(int64_t* slot, int64_t position) {
  atomicMin(reinterpret_cast<unsigned long long*>(slot), static_cast<unsigned long long>(position));
}

// Thread i: the ends (i == 0), ptr monotonicity at i < G, first occurrence of perm[i].
__global__ void validate_groups_pass1(const GroupGeometry g, int64_t* __restrict__ status,
                                      int64_t* __restrict__ first_pos) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i == 0) status[0] = (g.group_ptr[0] != 0 || g.group_ptr[g.G] != g.nnz) ? 1 : 0;
  if (i < g.G && g.group_ptr[i] > g.group_ptr[i + 1]) record_first(status + 1, i);
  if (i < g.nnz) {
    const int64_t k = g.group_perm[i];
    if (k >= 0 && k < g.nnz) record_first(first_pos + k, i);
  }
}

// Entry j is invalid when out of range or not the first occurrence of its id.
__global__ void validate_groups_pass2(const GroupGeometry g, int64_t* __restrict__ status,
                                      const int64_t* __restrict__ first_pos) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= g.nnz) return;
  const int64_t k = g.group_perm[j];
  if (k < 0 || k >= g.nnz || first_pos[k] != j) record_first(status + 2, j);
}

inline unsigned blocks_for(int64_t n) {
  return unsigned((n + kThreads - 1) / kThreads);
}

template <typename Launch>
cudaError_t launch_rows(const GroupGeometry& g, Launch&& launch) {
  if (g.B * g.G * g.H == 0 || g.nnz == 0) return cudaSuccess;
  const int T = team_size_for((g.nnz + g.G - 1) / g.G);
  return with_team_size(T, [&](auto team) {
    constexpr int kT = decltype(team)::value;
    launch(std::integral_constant<int, kT>{}, blocks_for_teams(g.B * g.G * g.H, kT, kThreads));
    return cudaGetLastError();
  });
}

}  // namespace

cudaError_t launch_validate_groups(const GroupGeometry& g, int64_t* status, int64_t* first_pos,
                                   cudaStream_t stream) {
  const int64_t n = (g.nnz > g.G ? g.nnz : g.G) + 1;
  validate_groups_pass1<<<blocks_for(n), kThreads, 0, stream>>>(g, status, first_pos);
  if (g.nnz > 0) validate_groups_pass2<<<blocks_for(g.nnz), kThreads, 0, stream>>>(g, status, first_pos);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_group_softmax_forward(const GroupGeometry& g, const scalar_t* logits,
                                         const bool* kept, scalar_t* alpha, cudaStream_t stream) {
  return launch_rows(g, [&](auto team, unsigned blocks) {
    group_softmax_forward_kernel<scalar_t, decltype(team)::value>
        <<<blocks, kThreads, 0, stream>>>(g, logits, kept, alpha);
  });
}

template <typename scalar_t>
cudaError_t launch_group_softmax_backward(const GroupGeometry& g, const scalar_t* grad,
                                          const scalar_t* alpha, scalar_t* grad_logits,
                                          cudaStream_t stream) {
  return launch_rows(g, [&](auto team, unsigned blocks) {
    group_softmax_backward_kernel<scalar_t, decltype(team)::value>
        <<<blocks, kThreads, 0, stream>>>(g, grad, alpha, grad_logits);
  });
}

// The instantiated storage types (the launcher's dispatch takes the same).
#define STOICHCONV_INSTANTIATE(scalar_t)                                                     \
  template cudaError_t launch_group_softmax_forward<scalar_t>(                               \
      const GroupGeometry&, const scalar_t*, const bool*, scalar_t*, cudaStream_t);          \
  template cudaError_t launch_group_softmax_backward<scalar_t>(                              \
      const GroupGeometry&, const scalar_t*, const scalar_t*, scalar_t*, cudaStream_t);
STOICHCONV_INSTANTIATE(c10::Half)
STOICHCONV_INSTANTIATE(c10::BFloat16)
STOICHCONV_INSTANTIATE(float)
STOICHCONV_INSTANTIATE(double)
#undef STOICHCONV_INSTANTIATE

}  // namespace cuda
}  // namespace stoichconv
