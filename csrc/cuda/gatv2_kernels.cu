// CUDA kernels of the fused GATv2 attention + aggregation (forward +
// backward) and the device-side validation of its edges.
//
// Only CUDA headers, the project's torch-free headers and the header-only
// c10 scalar types (c10::Half, c10::BFloat16): this file compiles in seconds;
// csrc/cuda/gatv2.cpp is the torch launcher.  The per-element
// arithmetic is gatv2_math.h, the functions the CPU kernels
// (csrc/cpu/gatv2.cpp) run.
//
// Design
// ------
// * Every output row is owned by one team of T lanes (cuda_team.cuh) per
//   (row, head), the head's C channels strided over the lanes; T is C rounded
//   up to a power of two (1..32), so a warp packs 32 / T (row, head) pairs
//   when C is small, and rows are numbered head-fastest (the teams of a row
//   are neighbours and share its edge reads).  Sums over channels are a fixed
//   xor butterfly, sums over edges run in edge order: deterministic, no
//   atomics on any result.
// * Forward, per (row i, head h):
//     1. edge by edge, the logit (team sum over channels), stored in the
//        acc_t scratch `weights` [E, H], and the running maximum;
//     2. edges strided over the lanes: exp(a - max), the denominator (team
//        sum), then w = exp / (denominator + 1e-16) (PyG's softmax) into
//        `weights` and, rounded, alpha;
//     3. channel by channel, out[i, h, c] = sum_e w_e x_l[src_e, h, c].
//   For float32 / float64 `weights` is alpha itself (the launcher passes it).
// * Backward, three kernels (the CPU kernel's passes A-C) and a reduction:
//     A. per (row, head): ga_e = <g_i, x_l[src_e]> (team sums), then
//        gl_e = alpha_e (ga_e - sum_row alpha ga) into the scratch grad_logit,
//        and row_of[e] = i;
//     B. per (kSourcesPerPartial consecutive sources, head), over each
//        source's edges in the stable by-source order: grad_x_l rows, and
//        that block's grad_att partial sum (att_partial row);
//     C. per (destination, head), over its edges in the stable
//        by-destination order: grad_x_r rows;
//     D. grad_att = the partials summed in a fixed order (one block per 32
//        columns: 8 strided sequential sums, then their sum in order).
// * Storage types float16, bfloat16, float32, float64 (semantics and dtypes:
//   stoichconv.ops.gatv2 docstring).  Every value is converted to
//   acc_type<scalar_t> on load (float for float16 / bfloat16, the storage
//   type otherwise); logits, softmax statistics, weights and every sum stay
//   in acc_t (the forward's in `weights`, the backward's in grad_logit and
//   att_partial), and each output entry is rounded to scalar_t once, on
//   store.
// * The kernels trust their input: the launcher runs launch_validate_edges
//   first (one host synchronisation) and raises the CPU kernel's errors.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <limits>
#include <type_traits>

#include "stoichconv/accumulate_type.h"
#include "stoichconv/cuda_team.cuh"
#include "stoichconv/gatv2_cuda.h"
#include "stoichconv/gatv2_math.h"
#include "stoichconv/group_softmax_math.h"  // group_max_update

namespace stoichconv {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, int T>
__global__ void __launch_bounds__(kThreads)
    gatv2_forward_kernel(const GatGeometry g, const scalar_t* __restrict__ xl,
                         const scalar_t* __restrict__ xr, const scalar_t* __restrict__ att,
                         const acc_type<scalar_t> slope, scalar_t* __restrict__ out,
                         scalar_t* alpha, acc_type<scalar_t>* weights) {
  // alpha and weights are one array for float32 / float64: not __restrict__.
  using acc_t = acc_type<scalar_t>;
  const Team<T> team;
  const int64_t H = g.H, C = g.C, W = H * C;
  const int64_t tasks = g.R * H;
  for (int64_t task = Team<T>::global_index(); task < tasks; task += Team<T>::grid_teams()) {
    const int64_t h = task % H, i = task / H, o = h * C;
    const int64_t e0 = g.crow[i], e1 = g.crow[i + 1];
    const scalar_t* __restrict__ att_h = att + o;
    // 1. logits and their maximum (identical in every lane).
    acc_t row_max = -std::numeric_limits<acc_t>::infinity();
    for (int64_t e = e0; e < e1; ++e) {
      const scalar_t* __restrict__ xs = xl + g.src[e] * W + o;
      const scalar_t* __restrict__ xd = xr + g.dst[e] * W + o;
      acc_t part = acc_t(0);
      for (int64_t c = team.lane; c < C; c += T)
        part += gatv2_logit_term(acc_t(att_h[c]), acc_t(xs[c]), acc_t(xd[c]), slope);
      const acc_t a = team.sum(part);
      if (team.lane == 0) weights[e * H + h] = a;
      row_max = group_max_update(row_max, a);
    }
    team.sync();
    // 2. the row softmax, edges strided over the lanes (each lane rewrites its own).
    acc_t denom = acc_t(0);
    for (int64_t e = e0 + team.lane; e < e1; e += T) {
      const acc_t x = exp_acc(weights[e * H + h] - row_max);
      weights[e * H + h] = x;
      denom += x;
    }
    denom = team.sum(denom);
    for (int64_t e = e0 + team.lane; e < e1; e += T) {
      const acc_t w = gatv2_softmax_weight(weights[e * H + h], denom);
      weights[e * H + h] = w;
      if constexpr (!std::is_same<acc_t, scalar_t>::value) alpha[e * H + h] = scalar_t(w);
    }
    team.sync();
    // 3. the aggregation, channels over the lanes.
    for (int64_t c = team.lane; c < C; c += T) {
      acc_t acc = acc_t(0);
      for (int64_t e = e0; e < e1; ++e)
        acc += weights[e * H + h] * acc_t(xl[g.src[e] * W + o + c]);
      out[i * W + o + c] = scalar_t(acc);
    }
  }
}

// A. The row-local softmax backward.
template <typename scalar_t, int T>
__global__ void __launch_bounds__(kThreads)
    gatv2_logit_grad_kernel(const GatGeometry g, const scalar_t* __restrict__ grad_out,
                            const scalar_t* __restrict__ xl, const scalar_t* __restrict__ alpha,
                            acc_type<scalar_t>* __restrict__ grad_logit,
                            int64_t* __restrict__ row_of) {
  using acc_t = acc_type<scalar_t>;
  const Team<T> team;
  const int64_t H = g.H, C = g.C, W = H * C;
  const int64_t tasks = g.R * H;
  for (int64_t task = Team<T>::global_index(); task < tasks; task += Team<T>::grid_teams()) {
    const int64_t h = task % H, i = task / H, o = h * C;
    const int64_t e0 = g.crow[i], e1 = g.crow[i + 1];
    const scalar_t* __restrict__ gi = grad_out + i * W + o;
    acc_t dot = acc_t(0);
    for (int64_t e = e0; e < e1; ++e) {
      const scalar_t* __restrict__ xs = xl + g.src[e] * W + o;
      acc_t part = acc_t(0);
      for (int64_t c = team.lane; c < C; c += T) part += acc_t(gi[c]) * acc_t(xs[c]);
      const acc_t ga = team.sum(part);
      if (team.lane == 0) grad_logit[e * H + h] = ga;
      dot += acc_t(alpha[e * H + h]) * ga;
    }
    team.sync();
    for (int64_t e = e0 + team.lane; e < e1; e += T) {
      grad_logit[e * H + h] = gatv2_logit_grad(acc_t(alpha[e * H + h]), grad_logit[e * H + h], dot);
      if (h == 0) row_of[e] = i;
    }
  }
}

// B. grad_x_l rows and the grad_att partials, per block of sources and head.
template <typename scalar_t, int T>
__global__ void __launch_bounds__(kThreads)
    gatv2_source_grad_kernel(const GatGeometry g, const EdgeGroups eg,
                             const scalar_t* __restrict__ grad_out,
                             const scalar_t* __restrict__ xl, const scalar_t* __restrict__ xr,
                             const scalar_t* __restrict__ att, const scalar_t* __restrict__ alpha,
                             const acc_type<scalar_t>* __restrict__ grad_logit,
                             const int64_t* __restrict__ row_of, const acc_type<scalar_t> slope,
                             scalar_t* __restrict__ gxl, acc_type<scalar_t>* __restrict__ att_partial) {
  using acc_t = acc_type<scalar_t>;
  const Team<T> team;
  const int64_t H = g.H, C = g.C, W = H * C;
  const int64_t tasks = gatv2_att_partials(g.Ns) * H;
  for (int64_t task = Team<T>::global_index(); task < tasks; task += Team<T>::grid_teams()) {
    const int64_t h = task % H, blk = task / H, o = h * C;
    const int64_t s0 = blk * kSourcesPerPartial;
    const int64_t s1 = s0 + kSourcesPerPartial < g.Ns ? s0 + kSourcesPerPartial : g.Ns;
    for (int64_t c = team.lane; c < C; c += T) {
      const acc_t att_c = acc_t(att[o + c]);
      acc_t to_att = acc_t(0);
      for (int64_t s = s0; s < s1; ++s) {
        const acc_t xs = acc_t(xl[s * W + o + c]);
        acc_t to_src = acc_t(0);
        for (int64_t j = eg.src_ptr[s]; j < eg.src_ptr[s + 1]; ++j) {
          const int64_t e = eg.by_src[j];
          gatv2_source_grad(to_src, to_att, acc_t(alpha[e * H + h]),
                            acc_t(grad_out[row_of[e] * W + o + c]), grad_logit[e * H + h], att_c,
                            xs, acc_t(xr[g.dst[e] * W + o + c]), slope);
        }
        gxl[s * W + o + c] = scalar_t(to_src);
      }
      att_partial[blk * W + o + c] = to_att;
    }
  }
}

// C. grad_x_r rows, per destination and head.
template <typename scalar_t, int T>
__global__ void __launch_bounds__(kThreads)
    gatv2_destination_grad_kernel(const GatGeometry g, const EdgeGroups eg,
                                  const scalar_t* __restrict__ xl,
                                  const scalar_t* __restrict__ xr,
                                  const scalar_t* __restrict__ att,
                                  const acc_type<scalar_t>* __restrict__ grad_logit,
                                  const acc_type<scalar_t> slope, scalar_t* __restrict__ gxr) {
  using acc_t = acc_type<scalar_t>;
  const Team<T> team;
  const int64_t H = g.H, C = g.C, W = H * C;
  const int64_t tasks = g.Nd * H;
  for (int64_t task = Team<T>::global_index(); task < tasks; task += Team<T>::grid_teams()) {
    const int64_t h = task % H, d = task / H, o = h * C;
    for (int64_t c = team.lane; c < C; c += T) {
      const acc_t att_c = acc_t(att[o + c]);
      const acc_t xd = acc_t(xr[d * W + o + c]);
      acc_t to_dst = acc_t(0);
      for (int64_t j = eg.dst_ptr[d]; j < eg.dst_ptr[d + 1]; ++j) {
        const int64_t e = eg.by_dst[j];
        to_dst += gatv2_destination_grad(grad_logit[e * H + h], att_c,
                                         acc_t(xl[g.src[e] * W + o + c]), xd, slope);
      }
      gxr[d * W + o + c] = scalar_t(to_dst);
    }
  }
}

// D. grad_att[col] = sum over the partial rows, in a fixed order.
constexpr int kReduceCols = 32, kReduceSplits = kThreads / kReduceCols;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    att_partial_sum_kernel(const acc_type<scalar_t>* __restrict__ partial, int64_t rows,
                           int64_t cols, scalar_t* __restrict__ grad_att) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t sums[kReduceSplits][kReduceCols];
  const int cl = threadIdx.x % kReduceCols, split = threadIdx.x / kReduceCols;
  const int64_t col = int64_t(blockIdx.x) * kReduceCols + cl;
  acc_t acc = acc_t(0);
  if (col < cols)
    for (int64_t r = split; r < rows; r += kReduceSplits) acc += partial[r * cols + col];
  sums[split][cl] = acc;
  __syncthreads();
  if (split == 0 && col < cols) {
    acc_t total = acc_t(0);
    for (int s = 0; s < kReduceSplits; ++s) total += sums[s][cl];
    grad_att[col] = scalar_t(total);
  }
}

// ---------------------------------------------------------------------------
// Validation (atomics on the status words only).
// ---------------------------------------------------------------------------
__device__ __forceinline__ void record_first(int64_t* slot, int64_t position) {
  atomicMin(reinterpret_cast<unsigned long long*>(slot), static_cast<unsigned long long>(position));
}

__global__ void validate_edges_kernel(const GatGeometry g, int64_t* __restrict__ status) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i == 0) status[0] = (g.crow[0] != 0 || g.crow[g.R] != g.E) ? 1 : 0;
  if (i < g.R && g.crow[i] > g.crow[i + 1]) record_first(status + 1, i);
  if (i < g.E) {
    const int64_t s = g.src[i], d = g.dst[i];
    if (s < 0 || s >= g.Ns || d < 0 || d >= g.Nd) record_first(status + 2, i);
  }
}

inline unsigned blocks_for(int64_t n) { return unsigned((n + kThreads - 1) / kThreads); }

// Launches kernel<T> over `teams` teams, T the channel team size.
template <typename Launch>
cudaError_t launch_teams(const GatGeometry& g, int64_t teams, Launch&& launch) {
  if (teams == 0) return cudaSuccess;
  return with_team_size(team_size_for(g.C), [&](auto team) {
    constexpr int kT = decltype(team)::value;
    launch(std::integral_constant<int, kT>{}, blocks_for_teams(teams, kT, kThreads));
    return cudaGetLastError();
  });
}

}  // namespace

cudaError_t launch_validate_edges(const GatGeometry& g, int64_t* status, cudaStream_t stream) {
  const int64_t n = (g.E > g.R ? g.E : g.R) + 1;
  validate_edges_kernel<<<blocks_for(n), kThreads, 0, stream>>>(g, status);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_gatv2_forward(const GatGeometry& g, const scalar_t* x_l, const scalar_t* x_r,
                                 const scalar_t* att, double negative_slope, scalar_t* out,
                                 scalar_t* alpha, acc_type<scalar_t>* weights,
                                 cudaStream_t stream) {
  const auto slope = static_cast<acc_type<scalar_t>>(negative_slope);
  return launch_teams(g, g.R * g.H, [&](auto team, unsigned blocks) {
    gatv2_forward_kernel<scalar_t, decltype(team)::value>
        <<<blocks, kThreads, 0, stream>>>(g, x_l, x_r, att, slope, out, alpha, weights);
  });
}

template <typename scalar_t>
cudaError_t launch_gatv2_backward(const GatGeometry& g, const EdgeGroups& groups,
                                  const scalar_t* grad_out, const scalar_t* x_l,
                                  const scalar_t* x_r, const scalar_t* att, const scalar_t* alpha,
                                  double negative_slope, scalar_t* grad_x_l, scalar_t* grad_x_r,
                                  scalar_t* grad_att, acc_type<scalar_t>* grad_logit,
                                  int64_t* row_of, acc_type<scalar_t>* att_partial,
                                  cudaStream_t stream) {
  const auto slope = static_cast<acc_type<scalar_t>>(negative_slope);
  cudaError_t err = launch_teams(g, g.R * g.H, [&](auto team, unsigned blocks) {
    gatv2_logit_grad_kernel<scalar_t, decltype(team)::value>
        <<<blocks, kThreads, 0, stream>>>(g, grad_out, x_l, alpha, grad_logit, row_of);
  });
  if (err != cudaSuccess) return err;
  err = launch_teams(g, gatv2_att_partials(g.Ns) * g.H, [&](auto team, unsigned blocks) {
    gatv2_source_grad_kernel<scalar_t, decltype(team)::value><<<blocks, kThreads, 0, stream>>>(
        g, groups, grad_out, x_l, x_r, att, alpha, grad_logit, row_of, slope, grad_x_l,
        att_partial);
  });
  if (err != cudaSuccess) return err;
  err = launch_teams(g, g.Nd * g.H, [&](auto team, unsigned blocks) {
    gatv2_destination_grad_kernel<scalar_t, decltype(team)::value>
        <<<blocks, kThreads, 0, stream>>>(g, groups, x_l, x_r, att, grad_logit, slope, grad_x_r);
  });
  if (err != cudaSuccess) return err;
  const int64_t cols = g.H * g.C;
  if (cols == 0) return cudaSuccess;
  att_partial_sum_kernel<scalar_t>
      <<<unsigned((cols + kReduceCols - 1) / kReduceCols), kThreads, 0, stream>>>(
          att_partial, gatv2_att_partials(g.Ns), cols, grad_att);
  return cudaGetLastError();
}

// The instantiated storage types (the launcher's dispatch takes the same).
#define STOICHCONV_INSTANTIATE(scalar_t)                                                        \
  template cudaError_t launch_gatv2_forward<scalar_t>(                                          \
      const GatGeometry&, const scalar_t*, const scalar_t*, const scalar_t*, double, scalar_t*, \
      scalar_t*, acc_type<scalar_t>*, cudaStream_t);                                            \
  template cudaError_t launch_gatv2_backward<scalar_t>(                                         \
      const GatGeometry&, const EdgeGroups&, const scalar_t*, const scalar_t*, const scalar_t*, \
      const scalar_t*, const scalar_t*, double, scalar_t*, scalar_t*, scalar_t*,                \
      acc_type<scalar_t>*, int64_t*, acc_type<scalar_t>*, cudaStream_t);
STOICHCONV_INSTANTIATE(c10::Half)
STOICHCONV_INSTANTIATE(c10::BFloat16)
STOICHCONV_INSTANTIATE(float)
STOICHCONV_INSTANTIATE(double)
#undef STOICHCONV_INSTANTIATE

}  // namespace cuda
}  // namespace stoichconv
