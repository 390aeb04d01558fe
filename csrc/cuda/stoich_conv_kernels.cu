// CUDA kernels of the signed stoichiometric propagation (forward + backward).
//
// Only CUDA headers, torch's header-only c10::Half / c10::BFloat16 and the
// project's torch-free headers are included here, so this file compiles in
// seconds; csrc/cuda/stoich_conv.cpp is the torch launcher.  The per-element
// arithmetic comes from stoich_conv_math.h, the same inline functions the CPU
// kernels run.
//
// Design
// ------
// * Every output row (a reaction row of `hidden` / R, or a metabolite row of
//   `out` / grad_y) is a segment of one of the plan's CSR orderings, reduced
//   by exactly one thread block: no atomics, bit-identical results run to run.
// * Shared topology: one block handles one CSR row for `S` consecutive samples
//   of the batch, so the row's structure (ptr, perm, gathered ids) is read
//   once from global memory per block and served from L1 to all S samples.
// * Dtypes (the policy: stoichconv.ops.stoich_conv docstring): the kernels
//   are templated on the storage type scalar_t (float16 = c10::Half,
//   bfloat16 = c10::BFloat16, float, double) and sum in acc_t =
//   acc_type<scalar_t> (float for the 16-bit types): values are converted
//   on load, results rounded once on store; the degree weights and norms are
//   acc_t arrays, partial sums in registers and shared memory acc_t.
// * Feature-dimension vectorisation: a thread owns VEC consecutive channels
//   (float4 for float32, double2 for float64, four float16 / bfloat16 in one
//   8-byte access, when C allows it); C = 64 float32 (or 16-bit) is 16 slots
//   of 4, so a (sample, head-row) is a half-warp.
// * Long rows: a block has kThreads threads = W work items (sample, slot)
//   times P splits of the row's incidences (incidence j goes to split
//   (j - begin) % P).  Short rows (most of yeast-GEM: 2-8 incidences) use all
//   S samples at once (W = S * slots, P = kThreads / W); rows longer than
//   kLongRow (currency metabolites: hundreds of incidences) are processed one
//   sample at a time with W = slots, so P = kThreads / slots splits (16 for
//   C = 64 float32).  Partial sums are combined in shared memory in split
//   order by one thread per item: deterministic.
// * Degree norms: a warp per (sample, row), incidences strided over lanes,
//   combined with a fixed shuffle tree.
// * grad_weight: a group of G lanes per (sample, incidence, head) computes
//   both dot products of incidence_weight_grad with shuffles.
// * Index values are not validated on the device (that would need a host
//   synchronisation); out-of-range ids are skipped so that a malformed plan
//   passed straight to torch.ops can never read or write out of bounds.  The
//   Python plan builder validates every index.
#include <cuda_runtime.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>

#include "stoichconv/accumulate_type.h"
#include "stoichconv/stoich_conv_cuda.h"
#include "stoichconv/stoich_conv_math.h"

namespace stoichconv {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kLongRow = 32;
// Work items (sample x slot) a short-row block aims for: leaves >= 4 splits.
constexpr int kItemsPerBlock = 64;

// ---------------------------------------------------------------------------
// Loads of VEC consecutive scalar_t into acc_t registers (converted) and
// stores of VEC acc_t registers into scalar_t (rounded to nearest even).
// The 16-bit types move as their raw bits (c10::Half / c10::BFloat16 wrap
// one unsigned short), so that the read-only cache path (__ldg) serves them.
// ---------------------------------------------------------------------------
template <typename scalar_t>
__device__ __forceinline__ float from_bits(unsigned int bits) {
  return static_cast<float>(scalar_t(static_cast<unsigned short>(bits), scalar_t::from_bits()));
}

template <typename scalar_t>
__device__ __forceinline__ unsigned int to_bits(float value) {
  return static_cast<unsigned int>(scalar_t(value).x);
}

template <typename scalar_t>
__device__ __forceinline__ acc_type<scalar_t> load_acc(const scalar_t* p) {
  if constexpr (sizeof(scalar_t) == 2) {
    return from_bits<scalar_t>(__ldg(reinterpret_cast<const unsigned short*>(p)));
  } else {
    return __ldg(p);
  }
}

template <typename scalar_t, int VEC>
struct Vec;

template <typename scalar_t>
struct Vec<scalar_t, 1> {
  using acc_t = acc_type<scalar_t>;
  static __device__ __forceinline__ void load(acc_t* d, const scalar_t* s) { d[0] = load_acc(s); }
  static __device__ __forceinline__ void store(scalar_t* d, const acc_t* s) {
    d[0] = static_cast<scalar_t>(s[0]);
  }
};

// Four float16 / bfloat16 values in one 8-byte access (element 0 in the low
// half of .x: little-endian).
template <typename scalar_t>
struct Vec16x4 {
  static __device__ __forceinline__ void load(float* d, const scalar_t* s) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(s));
    d[0] = from_bits<scalar_t>(v.x & 0xffffu), d[1] = from_bits<scalar_t>(v.x >> 16);
    d[2] = from_bits<scalar_t>(v.y & 0xffffu), d[3] = from_bits<scalar_t>(v.y >> 16);
  }
  static __device__ __forceinline__ void store(scalar_t* d, const float* s) {
    const unsigned int lo = to_bits<scalar_t>(s[0]) | (to_bits<scalar_t>(s[1]) << 16);
    const unsigned int hi = to_bits<scalar_t>(s[2]) | (to_bits<scalar_t>(s[3]) << 16);
    *reinterpret_cast<uint2*>(d) = make_uint2(lo, hi);
  }
};

template <>
struct Vec<c10::Half, 4> : Vec16x4<c10::Half> {};

template <>
struct Vec<c10::BFloat16, 4> : Vec16x4<c10::BFloat16> {};

template <>
struct Vec<float, 4> {
  static __device__ __forceinline__ void load(float* d, const float* s) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(s));
    d[0] = v.x, d[1] = v.y, d[2] = v.z, d[3] = v.w;
  }
  static __device__ __forceinline__ void store(float* d, const float* s) {
    *reinterpret_cast<float4*>(d) = make_float4(s[0], s[1], s[2], s[3]);
  }
};

template <>
struct Vec<double, 2> {
  static __device__ __forceinline__ void load(double* d, const double* s) {
    const double2 v = __ldg(reinterpret_cast<const double2*>(s));
    d[0] = v.x, d[1] = v.y;
  }
  static __device__ __forceinline__ void store(double* d, const double* s) {
    *reinterpret_cast<double2*>(d) = make_double2(s[0], s[1]);
  }
};

// Channels per wide access: 16 bytes of float / double, 8 bytes of a 16-bit type.
template <typename scalar_t>
constexpr int wide_vec() {
  return sizeof(scalar_t) == 8 ? 2 : 4;
}

__device__ __forceinline__ bool in_range(int64_t i, int64_t n) { return i >= 0 && i < n; }

// ---------------------------------------------------------------------------
// Degree norms: norm[bn, r] = degree_norm(sum of |s_k| over kept incidences of row r),
// all in the accumulate type acc_t.
// `reaction_index` == nullptr: rows are reactions (the row itself is masked);
// else rows are metabolites and each incidence is tested on its reaction.
// ---------------------------------------------------------------------------
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    degree_norm_kernel(const int64_t* __restrict__ ptr, const int64_t* __restrict__ perm,
                       const int64_t* __restrict__ reaction_index,
                       const acc_t* __restrict__ abs_stoich, const bool* __restrict__ keep,
                       int64_t Bn, int64_t rows, int64_t nnz, int64_t M,
                       acc_t* __restrict__ norm) {
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (warp >= Bn * rows) return;  // uniform over the warp
  const int64_t b = warp / rows, r = warp % rows;
  acc_t sum = acc_t(0);
  const bool row_kept = reaction_index != nullptr || incidence_kept(keep, b, M, r);
  if (row_kept) {
    const int64_t begin = min(max(ptr[r], int64_t(0)), nnz);
    const int64_t end = min(max(ptr[r + 1], begin), nnz);
    for (int64_t j = begin + lane; j < end; j += kWarp) {
      const int64_t k = perm[j];
      if (!in_range(k, nnz)) continue;
      if (reaction_index != nullptr) {
        const int64_t e = reaction_index[k];
        if (!in_range(e, M) || !incidence_kept(keep, b, M, e)) continue;
      }
      sum += abs_stoich[k];
    }
  }
  for (int offset = kWarp / 2; offset > 0; offset >>= 1)
    sum += __shfl_down_sync(0xffffffffu, sum, offset);
  if (lane == 0) norm[warp] = degree_norm(sum);
}

// ---------------------------------------------------------------------------
// The one segment reduction behind both forward stages and both backward
// reductions:
//   dst[b, r] = (init ? init[b, r] : 0) + scale(b, r) *
//               sum_{k in CSR row r, coef defined} coef(b, k, h) * src[b, other[k], h]
//   scale(b, r) = (row_norm ? row_norm[bn, r] : 1), 0 when keep_by_row and r is masked
//   coef(b, k, h) = weight[b, k, h] * (aux ? aux[bn, other[k]] : 1); undefined
//                   (incidence skipped) when !keep_by_row and reaction other[k] is masked.
// src, init, dst and weight are scalar_t; the norms aux and row_norm acc_t.
// ---------------------------------------------------------------------------
template <typename scalar_t>
struct SegmentArgs {
  using acc_t = acc_type<scalar_t>;
  int64_t B, rows, src_rows, H, C, nnz, M;
  const int64_t* ptr;
  const int64_t* perm;
  const int64_t* other;
  const scalar_t* src;
  const scalar_t* init;
  scalar_t* dst;
  const scalar_t* weight;
  const bool* keep;
  bool keep_by_row;
  const acc_t* aux;
  int64_t aux_len;
  const acc_t* row_norm;
  int samples_per_block;
};

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) segment_reduce_kernel(const SegmentArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t partial[kThreads * VEC];
  const int64_t r = blockIdx.x;
  const int64_t b0 = int64_t(blockIdx.y) * a.samples_per_block;
  const int S = int(min(int64_t(a.samples_per_block), a.B - b0));
  const int64_t begin = min(max(a.ptr[r], int64_t(0)), a.nnz);
  const int64_t end = min(max(a.ptr[r + 1], begin), a.nnz);
  const int64_t row_size = a.H * a.C;
  const int slots = int(row_size / VEC);
  const bool long_row = end - begin > kLongRow;
  const int samples_per_pass = long_row ? 1 : S;
  const int total = samples_per_pass * slots;
  const int W = min(total, kThreads);
  const int P = kThreads / W;
  const int t = threadIdx.x;
  const int item_local = t % W, split = t / W;

  for (int s0 = 0; s0 < S; s0 += samples_per_pass) {
    for (int item0 = 0; item0 < total; item0 += W) {
      const int item = item0 + item_local;
      const bool active = split < P && item < total;
      acc_t acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
      int64_t b = 0, c0 = 0;
      acc_t scale = acc_t(0);
      if (active) {
        b = b0 + s0 + item / slots;
        c0 = int64_t(item % slots) * VEC;
        const int64_t h = c0 / a.C;
        const int64_t bn = a.keep != nullptr ? b : 0;
        scale = a.row_norm != nullptr ? a.row_norm[bn * a.rows + r] : acc_t(1);
        if (a.keep_by_row && !incidence_kept(a.keep, b, a.M, r)) scale = acc_t(0);
        if (scale != acc_t(0)) {
          const scalar_t* src_b = a.src + b * a.src_rows * row_size + c0;
          const scalar_t* w_b = a.weight + b * a.nnz * a.H + h;
#pragma unroll 4
          for (int64_t j = begin + split; j < end; j += P) {
            const int64_t k = __ldg(a.perm + j);
            if (!in_range(k, a.nnz)) continue;
            const int64_t o = __ldg(a.other + k);
            if (!in_range(o, a.src_rows)) continue;
            if (!a.keep_by_row && !incidence_kept(a.keep, b, a.M, o)) continue;
            acc_t coef = static_cast<acc_t>(w_b[k * a.H]);
            if (a.aux != nullptr) coef *= a.aux[bn * a.aux_len + o];
            acc_t v[VEC];
            Vec<scalar_t, VEC>::load(v, src_b + o * row_size);
            axpy_row(acc, coef, v, VEC);
          }
        }
      }
      if (P > 1) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) partial[t * VEC + i] = acc[i];
        __syncthreads();
        if (active && split == 0) {
          for (int p = 1; p < P; ++p) axpy_row(acc, acc_t(1), partial + (p * W + t) * VEC, VEC);
        }
        __syncthreads();
      }
      if (active && split == 0) {
        scale_row(acc, scale, VEC);
        const int64_t offset = (b * a.rows + r) * row_size + c0;
        if (a.init != nullptr) {
          acc_t v[VEC];
          Vec<scalar_t, VEC>::load(v, a.init + offset);
          axpy_row(acc, acc_t(1), v, VEC);
        }
        Vec<scalar_t, VEC>::store(a.dst + offset, acc);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// grad_weight[b, k, h] = D_v <G_v, h_e> + B_e <R_e, Y_v> (0 for masked incidences):
// a group of G lanes per (b, k, h), channels strided over the group; the dot
// products and the shuffle tree in acc_t.
// ---------------------------------------------------------------------------
template <typename scalar_t>
struct WeightGradArgs {
  using acc_t = acc_type<scalar_t>;
  StoichPlanView s;
  Geometry g;
  const scalar_t* grad_out;
  const scalar_t* hidden;
  const scalar_t* reaction_grad;
  const scalar_t* y;
  const acc_t* node_norm;
  const acc_t* edge_norm;
  const bool* keep;
  scalar_t* grad_weight;
};

template <typename scalar_t, int VEC, int G>
__global__ void __launch_bounds__(kThreads) weight_grad_kernel(const WeightGradArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t item = tid / G;
  const int lane = int(tid % G);
  const int64_t H = a.g.H, C = a.g.C, N = a.s.N, M = a.s.M, nnz = a.s.nnz;
  const bool valid = item < a.g.B * nnz * H;
  acc_t dot_g = acc_t(0), dot_r = acc_t(0);
  acc_t d = acc_t(0), be = acc_t(0);
  if (valid) {
    const int64_t h = item % H, bk = item / H;
    const int64_t k = bk % nnz, b = bk / nnz;
    const int64_t v = a.s.metabolite_index[k], e = a.s.reaction_index[k];
    if (in_range(v, N) && in_range(e, M) && incidence_kept(a.keep, b, M, e)) {
      const int64_t bn = a.keep != nullptr ? b : 0;
      d = a.node_norm[bn * N + v];
      be = a.edge_norm[bn * M + e];
      const int64_t row_size = H * C;
      const int64_t vo = (b * N + v) * row_size + h * C, eo = (b * M + e) * row_size + h * C;
      for (int64_t c = int64_t(lane) * VEC; c < C; c += int64_t(G) * VEC) {
        acc_t gv[VEC], he[VEC], re[VEC], yv[VEC];
        Vec<scalar_t, VEC>::load(gv, a.grad_out + vo + c);
        Vec<scalar_t, VEC>::load(he, a.hidden + eo + c);
        Vec<scalar_t, VEC>::load(re, a.reaction_grad + eo + c);
        Vec<scalar_t, VEC>::load(yv, a.y + vo + c);
        dot_g += dot_row(gv, he, VEC);
        dot_r += dot_row(re, yv, VEC);
      }
    }
  }
  // Groups are G-aligned inside the warp, so a butterfly over G lanes stays in the group.
  for (int offset = G / 2; offset > 0; offset >>= 1) {
    dot_g += __shfl_xor_sync(0xffffffffu, dot_g, offset, G);
    dot_r += __shfl_xor_sync(0xffffffffu, dot_r, offset, G);
  }
  if (valid && lane == 0) a.grad_weight[item] = static_cast<scalar_t>(d * dot_g + be * dot_r);
}

// ---------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------
inline bool aligned(const void* p, int bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename acc_t>
cudaError_t launch_degree_norm(const int64_t* ptr, const int64_t* perm,
                               const int64_t* reaction_index, const acc_t* abs_stoich,
                               const bool* keep, int64_t Bn, int64_t rows, int64_t nnz,
                               int64_t M, acc_t* norm, cudaStream_t stream) {
  const int64_t warps = Bn * rows;
  if (warps == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(warps * kWarp, kThreads);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  degree_norm_kernel<acc_t><<<dim3(unsigned(blocks)), kThreads, 0, stream>>>(
      ptr, perm, reaction_index, abs_stoich, keep, Bn, rows, nnz, M, norm);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_segment_reduce(SegmentArgs<scalar_t> a, cudaStream_t stream) {
  if (a.B == 0 || a.rows == 0 || a.H * a.C == 0) return cudaSuccess;
  constexpr int kWide = wide_vec<scalar_t>();
  constexpr int kWideBytes = kWide * int(sizeof(scalar_t));
  const bool wide = a.C % kWide == 0 && aligned(a.src, kWideBytes) && aligned(a.dst, kWideBytes) &&
                    aligned(a.init, kWideBytes);
  const int64_t slots = a.H * a.C / (wide ? kWide : 1);
  a.samples_per_block = int(std::max<int64_t>(1, std::min<int64_t>(a.B, kItemsPerBlock / slots)));
  const int64_t grid_y = ceil_div(a.B, a.samples_per_block);
  if (a.rows > 0x7fffffff || grid_y > 65535 || slots > 0x7fffffff / 64)
    return cudaErrorInvalidConfiguration;
  const dim3 grid(unsigned(a.rows), unsigned(grid_y));
  if (wide)
    segment_reduce_kernel<scalar_t, kWide><<<grid, kThreads, 0, stream>>>(a);
  else
    segment_reduce_kernel<scalar_t, 1><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename scalar_t, int VEC>
cudaError_t launch_weight_grad_vec(const WeightGradArgs<scalar_t>& a, cudaStream_t stream) {
  const int64_t slots = a.g.C / VEC;
  const int group = slots >= 32 ? 32 : 8;
  const int64_t threads = a.g.B * a.s.nnz * a.g.H * group;
  const int64_t blocks = ceil_div(threads, kThreads);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (group == 32)
    weight_grad_kernel<scalar_t, VEC, 32><<<dim3(unsigned(blocks)), kThreads, 0, stream>>>(a);
  else
    weight_grad_kernel<scalar_t, VEC, 8><<<dim3(unsigned(blocks)), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_weight_grad(const WeightGradArgs<scalar_t>& a, cudaStream_t stream) {
  if (a.g.B * a.s.nnz * a.g.H == 0) return cudaSuccess;
  constexpr int kWide = wide_vec<scalar_t>();
  constexpr int kWideBytes = kWide * int(sizeof(scalar_t));
  const bool wide = a.g.C % kWide == 0 && aligned(a.grad_out, kWideBytes) &&
                    aligned(a.hidden, kWideBytes) && aligned(a.reaction_grad, kWideBytes) &&
                    aligned(a.y, kWideBytes);
  return wide ? launch_weight_grad_vec<scalar_t, kWide>(a, stream)
              : launch_weight_grad_vec<scalar_t, 1>(a, stream);
}

}  // namespace

// Stage 1, metabolite -> reaction: hidden[b,e] = B_e * sum_k w_k y[b, v_k]
template <typename scalar_t>
cudaError_t launch_stoich_conv_hidden(const StoichPlanView& s, const Geometry& g,
                                      const scalar_t* y, const scalar_t* weight, const bool* keep,
                                      const acc_type<scalar_t>* edge_norm, scalar_t* hidden,
                                      cudaStream_t stream) {
  SegmentArgs<scalar_t> a{};
  a.B = g.B, a.H = g.H, a.C = g.C, a.nnz = s.nnz, a.M = s.M;
  a.weight = weight, a.keep = keep;
  a.rows = s.M, a.src_rows = s.N, a.ptr = s.reaction_ptr, a.perm = s.reaction_perm;
  a.other = s.metabolite_index, a.src = y, a.init = nullptr, a.dst = hidden;
  a.keep_by_row = true, a.aux = nullptr, a.aux_len = 0, a.row_norm = edge_norm;
  return launch_segment_reduce(a, stream);
}

template <typename scalar_t>
cudaError_t launch_stoich_conv_forward(const StoichPlanView& s, const Geometry& g,
                                       const scalar_t* y, const scalar_t* weight,
                                       const bool* keep, const acc_type<scalar_t>* abs_stoich,
                                       scalar_t* out, scalar_t* hidden,
                                       acc_type<scalar_t>* node_norm,
                                       acc_type<scalar_t>* edge_norm, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const int64_t Bn = keep != nullptr ? g.B : 1;
  cudaError_t err = launch_degree_norm<acc_t>(s.reaction_ptr, s.reaction_perm, nullptr,
                                              abs_stoich, keep, Bn, s.M, s.nnz, s.M, edge_norm,
                                              stream);
  if (err != cudaSuccess) return err;
  err = launch_degree_norm<acc_t>(s.metabolite_ptr, s.metabolite_perm, s.reaction_index,
                                  abs_stoich, keep, Bn, s.N, s.nnz, s.M, node_norm, stream);
  if (err != cudaSuccess) return err;
  err = launch_stoich_conv_hidden(s, g, y, weight, keep, edge_norm, hidden, stream);
  if (err != cudaSuccess) return err;
  // Stage 2, reaction -> metabolite: out[b,v] = D_v * sum_{k kept} w_k hidden[b, e_k]
  SegmentArgs<scalar_t> a{};
  a.B = g.B, a.H = g.H, a.C = g.C, a.nnz = s.nnz, a.M = s.M;
  a.weight = weight, a.keep = keep, a.init = nullptr, a.aux = nullptr, a.aux_len = 0;
  a.rows = s.N, a.src_rows = s.M, a.ptr = s.metabolite_ptr, a.perm = s.metabolite_perm;
  a.other = s.reaction_index, a.src = hidden, a.dst = out;
  a.keep_by_row = false, a.row_norm = node_norm;
  return launch_segment_reduce(a, stream);
}

template <typename scalar_t>
cudaError_t launch_stoich_conv_backward(const StoichPlanView& s, const Geometry& g,
                                        const scalar_t* grad_out, const scalar_t* grad_hidden,
                                        const scalar_t* y, const scalar_t* weight,
                                        const bool* keep, const scalar_t* hidden,
                                        const acc_type<scalar_t>* node_norm,
                                        const acc_type<scalar_t>* edge_norm,
                                        scalar_t* reaction_grad, scalar_t* grad_y,
                                        scalar_t* grad_weight, cudaStream_t stream) {
  // R[b,e] = grad_hidden[b,e] + [e kept] * sum_{k in e} w_k D_{v_k} G[b, v_k]
  SegmentArgs<scalar_t> a{};
  a.B = g.B, a.H = g.H, a.C = g.C, a.nnz = s.nnz, a.M = s.M;
  a.weight = weight, a.keep = keep;
  a.rows = s.M, a.src_rows = s.N, a.ptr = s.reaction_ptr, a.perm = s.reaction_perm;
  a.other = s.metabolite_index, a.src = grad_out, a.init = grad_hidden, a.dst = reaction_grad;
  a.keep_by_row = true, a.aux = node_norm, a.aux_len = s.N, a.row_norm = nullptr;
  cudaError_t err = launch_segment_reduce(a, stream);
  if (err != cudaSuccess) return err;
  if (grad_y != nullptr) {
    // dL/dy[b,u] = sum_{k: v_k = u, kept} w_k B_{e_k} R[b, e_k]
    a.rows = s.N, a.src_rows = s.M, a.ptr = s.metabolite_ptr, a.perm = s.metabolite_perm;
    a.other = s.reaction_index, a.src = reaction_grad, a.init = nullptr, a.dst = grad_y;
    a.keep_by_row = false, a.aux = edge_norm, a.aux_len = s.M;
    err = launch_segment_reduce(a, stream);
    if (err != cudaSuccess) return err;
  }
  if (grad_weight != nullptr) {
    WeightGradArgs<scalar_t> w{s,         g,         grad_out, hidden, reaction_grad,
                               y,         node_norm, edge_norm, keep,  grad_weight};
    err = launch_weight_grad(w, stream);
  }
  return err;
}

#define STOICHCONV_INSTANTIATE(T)                                                              \
  template cudaError_t launch_stoich_conv_hidden<T>(const StoichPlanView&, const Geometry&,    \
                                                    const T*, const T*, const bool*,           \
                                                    const acc_type<T>*, T*, cudaStream_t);     \
  template cudaError_t launch_stoich_conv_forward<T>(                                          \
      const StoichPlanView&, const Geometry&, const T*, const T*, const bool*,                 \
      const acc_type<T>*, T*, T*, acc_type<T>*, acc_type<T>*, cudaStream_t);                   \
  template cudaError_t launch_stoich_conv_backward<T>(                                         \
      const StoichPlanView&, const Geometry&, const T*, const T*, const T*, const T*,         \
      const bool*, const T*, const acc_type<T>*, const acc_type<T>*, T*, T*, T*, cudaStream_t);

STOICHCONV_INSTANTIATE(float)
STOICHCONV_INSTANTIATE(double)
STOICHCONV_INSTANTIATE(c10::Half)
STOICHCONV_INSTANTIATE(c10::BFloat16)
#undef STOICHCONV_INSTANTIATE

}  // namespace cuda
}  // namespace stoichconv
