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
// * Shared topology: the rows' structure (ptr, perm, gathered ids) is read by
//   the threads of consecutive samples of one row together, so it is served
//   from L1 / broadcast to all of them.
// * Dtypes (the policy: stoichconv.ops.stoich_conv docstring): the kernels
//   are templated on the storage type scalar_t (float16 = c10::Half,
//   bfloat16 = c10::BFloat16, float, double) and sum in acc_t =
//   acc_type<scalar_t> (float for the 16-bit types): values are converted
//   on load, results rounded once on store; the degree weights and norms are
//   acc_t arrays, partial sums in registers and shared memory acc_t.
// * Feature-dimension vectorisation: a thread owns VEC consecutive channels
//   (float4 for float32, double2 for float64, four float16 / bfloat16 in one
//   8-byte access, when C and the pointers' alignment allow it).  VEC only
//   groups channels: every channel is summed on its own.
// * Reduction order (review finding 7): every row is summed in the schedule
//   of stoichconv/stoich_conv_schedule.h, which depends on the row's length
//   only: never on VEC (hence the storage offset), H, C, B, or which rows and
//   samples share a block.  A row of P = stoich_row_splits(L) splits sums
//   position i into split i % P; the partials are combined in split order.
// * Packing (review finding 3): short rows (P = 1: the 2-8 incidences of most
//   yeast-GEM rows and of the compacted layout) run in segment_packed_kernel,
//   one thread per (row, sample, channel slot), so one block holds many rows
//   and no lane waits on a row shorter than the block, with no barrier.  Long
//   rows (currency metabolites: hundreds of incidences) run in
//   segment_split_kernel, P threads per (sample, slot), partials combined in
//   shared memory in split order by one thread per item.  Each kernel skips
//   the other's rows, so every output row is written by exactly one thread.
// * Degree norms: one thread per (sample, row), 32 rows per warp; the warp's
//   long rows are then summed by the whole warp, lane p taking split p of
//   the same schedule.
// * grad_weight: a group of G lanes per (sample, incidence, head) computes
//   both dot products of incidence_weight_grad with shuffles, lane l taking
//   the chunks l, l + G, ... of kWide channels (G and the chunks fixed by C,
//   not by the access width); for a weight
//   shared by the batch, a group per (incidence, head) loops over the samples
//   in order and stores their sum once (deterministic, no atomics).
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
#include "stoichconv/stoich_conv_schedule.h"

namespace stoichconv {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

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
// all in the accumulate type acc_t, summed in the row's schedule
// (stoichconv/stoich_conv_schedule.h).
// `reaction_index` == nullptr: rows are reactions (the row itself is masked);
// else rows are metabolites and each incidence is tested on its reaction.
// Packed: one thread per (sample, row), 32 rows per warp.  A short row (P = 1)
// is summed by its own thread; the warp's long rows (P > 1) are then taken one
// after the other by the whole warp, lane p < P summing split p, the partials
// combined in split order.
// ---------------------------------------------------------------------------
template <typename acc_t>
__device__ __forceinline__ acc_t degree_term(int64_t b, int64_t j, const int64_t* __restrict__ perm,
                                             const int64_t* __restrict__ reaction_index,
                                             const acc_t* __restrict__ abs_stoich,
                                             const bool* __restrict__ keep, int64_t nnz, int64_t M) {
  const int64_t k = perm[j];
  if (!in_range(k, nnz)) return acc_t(0);
  if (reaction_index != nullptr) {
    const int64_t e = reaction_index[k];
    if (!in_range(e, M) || !incidence_kept(keep, b, M, e)) return acc_t(0);
  }
  return abs_stoich[k];
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    degree_norm_kernel(const int64_t* __restrict__ ptr, const int64_t* __restrict__ perm,
                       const int64_t* __restrict__ reaction_index,
                       const acc_t* __restrict__ abs_stoich, const bool* __restrict__ keep,
                       int64_t Bn, int64_t rows, int64_t nnz, int64_t M,
                       acc_t* __restrict__ norm) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warp_first = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) - lane;
  if (warp_first >= Bn * rows) return;  // uniform over the warp
  const int64_t item = warp_first + lane;
  const bool valid = item < Bn * rows;
  int64_t b = 0, r = 0, begin = 0, end = 0;
  int splits = 1;
  bool row_kept = false;
  if (valid) {
    b = item / rows, r = item % rows;
    begin = min(max(ptr[r], int64_t(0)), nnz);
    end = min(max(ptr[r + 1], begin), nnz);
    splits = stoich_row_splits(end - begin);
    row_kept = reaction_index != nullptr || incidence_kept(keep, b, M, r);
  }
  acc_t total = acc_t(0);
  if (valid && row_kept && splits == 1)
    for (int64_t j = begin; j < end; ++j)
      total += degree_term(b, j, perm, reaction_index, abs_stoich, keep, nnz, M);
  unsigned pending = __ballot_sync(0xffffffffu, valid && row_kept && splits > 1);
  while (pending != 0u) {
    const int src = __ffs(pending) - 1;
    pending &= pending - 1u;
    const int64_t bs = __shfl_sync(0xffffffffu, b, src);
    const int64_t js = __shfl_sync(0xffffffffu, begin, src);
    const int64_t je = __shfl_sync(0xffffffffu, end, src);
    const int P = __shfl_sync(0xffffffffu, splits, src);
    acc_t part = acc_t(0);
    if (lane < P)
      for (int64_t j = js + lane; j < je; j += P)
        part += degree_term(bs, j, perm, reaction_index, abs_stoich, keep, nnz, M);
    acc_t sum = __shfl_sync(0xffffffffu, part, 0);
    for (int p = 1; p < P; ++p) sum += __shfl_sync(0xffffffffu, part, p);
    if (lane == src) total = sum;
  }
  if (valid) norm[item] = degree_norm(total);
}

// ---------------------------------------------------------------------------
// The one segment reduction behind both forward stages and both backward
// reductions:
//   dst[b, r] = (init ? init[b, r] : 0) + scale(b, r) *
//               sum_{k in CSR row r, coef defined} coef(b, k, h) * src[b, other[k], h]
//   scale(b, r) = (row_norm ? row_norm[bn, r] : 1), 0 when keep_by_row and r is masked
//   coef(b, k, h) = weight[b * w_stride + k * H + h] * (aux ? aux[bn, other[k]] : 1);
//                   undefined (incidence skipped) when !keep_by_row and reaction other[k]
//                   is masked.  w_stride = 0: one weight [1, nnz, H] for every sample.
// src, init, dst and weight are scalar_t; the norms aux and row_norm acc_t.
// The sum of every channel follows the row's schedule (stoich_conv_schedule.h),
// whatever the vector width VEC (VEC only groups channels, each summed on its
// own) and however rows and samples are packed: two kernels split the rows by
// their schedule, each skipping the other's rows.
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
  int64_t w_stride;
  const bool* keep;
  bool keep_by_row;
  const acc_t* aux;
  int64_t aux_len;
  const acc_t* row_norm;
  int samples_per_block;
};

template <typename scalar_t>
__device__ __forceinline__ void row_range(const SegmentArgs<scalar_t>& a, int64_t r, int64_t& begin,
                                          int64_t& end) {
  begin = min(max(__ldg(a.ptr + r), int64_t(0)), a.nnz);
  end = min(max(__ldg(a.ptr + r + 1), begin), a.nnz);
}

// The output row's scale (0: the row is skipped, written as init or 0).
template <typename scalar_t>
__device__ __forceinline__ acc_type<scalar_t> row_scale(const SegmentArgs<scalar_t>& a, int64_t b,
                                                        int64_t r) {
  using acc_t = acc_type<scalar_t>;
  const int64_t bn = a.keep != nullptr ? b : 0;
  acc_t scale = a.row_norm != nullptr ? a.row_norm[bn * a.rows + r] : acc_t(1);
  if (a.keep_by_row && !incidence_kept(a.keep, b, a.M, r)) scale = acc_t(0);
  return scale;
}

// acc += sum over positions begin + first, begin + first + step, ... < end of
// coef(b, k, h) * src[b, other[k], c0 : c0 + VEC]: one split of a row (all of it
// for step 1).
template <typename scalar_t, int VEC>
__device__ __forceinline__ void accumulate_split(const SegmentArgs<scalar_t>& a, int64_t b,
                                                 int64_t c0, int64_t begin, int64_t end,
                                                 int64_t first, int step,
                                                 acc_type<scalar_t>* acc) {
  using acc_t = acc_type<scalar_t>;
  const int64_t row_size = a.H * a.C;
  const int64_t h = c0 / a.C;
  const int64_t bn = a.keep != nullptr ? b : 0;
  const scalar_t* src_b = a.src + b * a.src_rows * row_size + c0;
  const scalar_t* w_b = a.weight + b * a.w_stride + h;
#pragma unroll 4
  for (int64_t j = begin + first; j < end; j += step) {
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

// dst[b, r, c0 : c0 + VEC] = scale * acc (+ init).
template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_row_slot(const SegmentArgs<scalar_t>& a, int64_t b, int64_t r,
                                               int64_t c0, acc_type<scalar_t> scale,
                                               acc_type<scalar_t>* acc) {
  using acc_t = acc_type<scalar_t>;
  scale_row(acc, scale, VEC);
  const int64_t offset = (b * a.rows + r) * (a.H * a.C) + c0;
  if (a.init != nullptr) {
    acc_t v[VEC];
    Vec<scalar_t, VEC>::load(v, a.init + offset);
    axpy_row(acc, acc_t(1), v, VEC);
  }
  Vec<scalar_t, VEC>::store(a.dst + offset, acc);
}

// Short rows (schedule P = 1), packed: one thread per (row, sample, channel
// slot), slots fastest, so a block holds many short rows (and samples) and no
// thread idles on a row shorter than the block; no shared memory, no barrier.
// Rows with P > 1 are left to segment_split_kernel.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) segment_packed_kernel(const SegmentArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  const int64_t slots = a.H * a.C / VEC;
  const int64_t total = a.rows * a.B * slots;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; item < total; item += stride) {
    const int64_t slot = item % slots, rb = item / slots;
    const int64_t b = rb % a.B, r = rb / a.B;
    int64_t begin, end;
    row_range(a, r, begin, end);
    if (stoich_row_splits(end - begin) != 1) continue;
    const int64_t c0 = slot * VEC;
    acc_t acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
    const acc_t scale = row_scale(a, b, r);
    if (scale != acc_t(0)) accumulate_split<scalar_t, VEC>(a, b, c0, begin, end, 0, 1, acc);
    store_row_slot<scalar_t, VEC>(a, b, r, c0, scale, acc);
  }
}

// Long rows (schedule P > 1): a block scans kScanRows consecutive rows
// (blockIdx.x) and reduces each long one among them in turn, for the samples
// [b0, b0 + samples_per_block) of blockIdx.y.  Thread t owns work item
// (sample, slot) t % W of each pass and split t / W, W = kThreads / P; the
// partials are combined in shared memory in split order by the split-0 thread.
constexpr int kScanRows = 32;

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) segment_split_kernel(const SegmentArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t partial[kThreads * VEC];
  __shared__ unsigned long_rows;
  const int t = threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.x) * kScanRows;
  if (t < kWarp) {
    bool is_long = false;
    if (r0 + t < a.rows) {
      int64_t begin, end;
      row_range(a, r0 + t, begin, end);
      is_long = stoich_row_splits(end - begin) > 1;
    }
    const unsigned mask = __ballot_sync(0xffffffffu, is_long);
    if (t == 0) long_rows = mask;
  }
  __syncthreads();
  unsigned pending = long_rows;  // the same in every thread: the loops below are uniform
  const int64_t b0 = int64_t(blockIdx.y) * a.samples_per_block;
  const int S = int(min(int64_t(a.samples_per_block), a.B - b0));
  const int64_t row_size = a.H * a.C;
  const int slots = int(row_size / VEC);
  const int total = S * slots;
  while (pending != 0u) {
    const int64_t r = r0 + (__ffs(pending) - 1);
    pending &= pending - 1u;
    int64_t begin, end;
    row_range(a, r, begin, end);
    const int P = stoich_row_splits(end - begin);
    const int W = kThreads / P;
    const int item_local = t % W, split = t / W;
    for (int item0 = 0; item0 < total; item0 += W) {
      const int item = item0 + item_local;
      const bool active = item < total;
      acc_t acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
      int64_t b = 0, c0 = 0;
      acc_t scale = acc_t(0);
      if (active) {
        b = b0 + item / slots;
        c0 = int64_t(item % slots) * VEC;
        scale = row_scale(a, b, r);
        if (scale != acc_t(0)) accumulate_split<scalar_t, VEC>(a, b, c0, begin, end, split, P, acc);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) partial[t * VEC + i] = acc[i];
      __syncthreads();
      if (active && split == 0) {
        for (int p = 1; p < P; ++p) axpy_row(acc, acc_t(1), partial + (p * W + t) * VEC, VEC);
        store_row_slot<scalar_t, VEC>(a, b, r, c0, scale, acc);
      }
      __syncthreads();
    }
  }
}

// ---------------------------------------------------------------------------
// grad_weight[b, k, h] = D_v <G_v, h_e> + B_e <R_e, Y_v> (0 for masked incidences):
// a group of G lanes per (b, k, h), channels strided over the group; the dot
// products and the shuffle tree in acc_t.  SHARED (a weight [1, nnz, H] shared
// by the batch): a group per (k, h) loops over the samples b = 0 .. B-1 in
// order, sums their terms in acc_t and stores grad_weight[0, k, h] once (no
// atomics, deterministic).
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
  bool shared;
};

// CHUNK consecutive channels of one lane's dot products, loaded with accesses of
// VEC channels (VEC = CHUNK: one wide access; VEC = 1: CHUNK scalar ones, for
// misaligned pointers): the values, hence the order of the sums, do not depend
// on VEC.
template <typename scalar_t, int VEC, int CHUNK>
__device__ __forceinline__ void load_chunk(acc_type<scalar_t>* d, const scalar_t* s) {
  static_assert(CHUNK % VEC == 0, "a chunk is whole accesses");
#pragma unroll
  for (int i = 0; i < CHUNK; i += VEC) Vec<scalar_t, VEC>::load(d + i, s + i);
}

template <typename scalar_t, int VEC, int CHUNK, int G>
__global__ void __launch_bounds__(kThreads) weight_grad_kernel(const WeightGradArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t item = tid / G;
  const int lane = int(tid % G);
  const int64_t H = a.g.H, C = a.g.C, N = a.s.N, M = a.s.M, nnz = a.s.nnz;
  const int64_t items = (a.shared ? 1 : a.g.B) * nnz * H;
  const bool valid = item < items;
  const int64_t h = item % H, bk = item / H;
  const int64_t k = bk % nnz;
  const int64_t b_first = a.shared ? 0 : bk / nnz;
  const int64_t b_count = a.shared ? a.g.B : 1;
  int64_t v = 0, e = 0;
  bool in_plan = false;
  if (valid) {
    v = a.s.metabolite_index[k], e = a.s.reaction_index[k];
    in_plan = in_range(v, N) && in_range(e, M);
  }
  acc_t total = acc_t(0);
  // The group's lanes share item, hence b_count: the loop and its shuffles are uniform in it.
  for (int64_t i = 0; i < b_count; ++i) {
    const int64_t b = b_first + i;
    acc_t dot_g = acc_t(0), dot_r = acc_t(0);
    acc_t d = acc_t(0), be = acc_t(0);
    if (valid && in_plan && incidence_kept(a.keep, b, M, e)) {
      const int64_t bn = a.keep != nullptr ? b : 0;
      d = a.node_norm[bn * N + v];
      be = a.edge_norm[bn * M + e];
      const int64_t row_size = H * C;
      const int64_t vo = (b * N + v) * row_size + h * C, eo = (b * M + e) * row_size + h * C;
      for (int64_t c = int64_t(lane) * CHUNK; c < C; c += int64_t(G) * CHUNK) {
        acc_t gv[CHUNK], he[CHUNK], re[CHUNK], yv[CHUNK];
        load_chunk<scalar_t, VEC, CHUNK>(gv, a.grad_out + vo + c);
        load_chunk<scalar_t, VEC, CHUNK>(he, a.hidden + eo + c);
        load_chunk<scalar_t, VEC, CHUNK>(re, a.reaction_grad + eo + c);
        load_chunk<scalar_t, VEC, CHUNK>(yv, a.y + vo + c);
        dot_g += dot_row(gv, he, CHUNK);
        dot_r += dot_row(re, yv, CHUNK);
      }
    }
    // Groups are G-aligned inside the warp, so a butterfly over G lanes stays in the group.
    const unsigned mask = G == kWarp ? 0xffffffffu
                                     : (((1u << G) - 1u) << ((threadIdx.x % kWarp) & ~(G - 1)));
    for (int offset = G / 2; offset > 0; offset >>= 1) {
      dot_g += __shfl_xor_sync(mask, dot_g, offset, G);
      dot_r += __shfl_xor_sync(mask, dot_r, offset, G);
    }
    total += d * dot_g + be * dot_r;
  }
  if (valid && lane == 0) a.grad_weight[item] = static_cast<scalar_t>(total);
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
  const int64_t items = Bn * rows;
  if (items == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(items, kThreads);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  degree_norm_kernel<acc_t><<<dim3(unsigned(blocks)), kThreads, 0, stream>>>(
      ptr, perm, reaction_index, abs_stoich, keep, Bn, rows, nnz, M, norm);
  return cudaGetLastError();
}

// The vector width only groups channels (each channel is summed on its own, in
// its row's schedule), so choosing it from the pointers' alignment changes the
// memory accesses, never the result bits.
template <typename scalar_t>
cudaError_t launch_segment_reduce(SegmentArgs<scalar_t> a, cudaStream_t stream) {
  if (a.B == 0 || a.rows == 0 || a.H * a.C == 0) return cudaSuccess;
  constexpr int kWide = wide_vec<scalar_t>();
  constexpr int kWideBytes = kWide * int(sizeof(scalar_t));
  const bool wide = a.C % kWide == 0 && aligned(a.src, kWideBytes) && aligned(a.dst, kWideBytes) &&
                    aligned(a.init, kWideBytes);
  const int64_t slots = a.H * a.C / (wide ? kWide : 1);
  // Long rows: about four passes of the block's items per row and sample group.
  a.samples_per_block =
      int(std::max<int64_t>(1, std::min<int64_t>(a.B, 4 * kThreads / std::max<int64_t>(slots, 1))));
  const int64_t grid_y = ceil_div(a.B, a.samples_per_block);
  const int64_t scan_blocks = ceil_div(a.rows, kScanRows);
  if (scan_blocks > 0x7fffffff || grid_y > 65535 || slots > 0x7fffffff / 64)
    return cudaErrorInvalidConfiguration;
  const int64_t packed_blocks = std::min<int64_t>(ceil_div(a.rows * a.B * slots, kThreads), 1 << 20);
  const dim3 split_grid{unsigned(scan_blocks), unsigned(grid_y), 1u};
  if (wide) {
    segment_packed_kernel<scalar_t, kWide><<<unsigned(packed_blocks), kThreads, 0, stream>>>(a);
    segment_split_kernel<scalar_t, kWide><<<split_grid, kThreads, 0, stream>>>(a);
  } else {
    segment_packed_kernel<scalar_t, 1><<<unsigned(packed_blocks), kThreads, 0, stream>>>(a);
    segment_split_kernel<scalar_t, 1><<<split_grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

// The lanes' chunks and the group size G depend on C (and the dtype) only, never on
// the access width VEC chosen from the pointers' alignment: the dot products are
// summed in the same order either way (review finding 7).
template <typename scalar_t, int VEC, int CHUNK>
cudaError_t launch_weight_grad_vec(const WeightGradArgs<scalar_t>& a, cudaStream_t stream) {
  const int64_t chunks = a.g.C / CHUNK;
  const int group = chunks >= 32 ? 32 : 8;
  const int64_t threads = (a.shared ? 1 : a.g.B) * a.s.nnz * a.g.H * group;
  const int64_t blocks = ceil_div(threads, kThreads);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (group == 32)
    weight_grad_kernel<scalar_t, VEC, CHUNK, 32><<<dim3(unsigned(blocks)), kThreads, 0, stream>>>(a);
  else
    weight_grad_kernel<scalar_t, VEC, CHUNK, 8><<<dim3(unsigned(blocks)), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_weight_grad(const WeightGradArgs<scalar_t>& a, cudaStream_t stream) {
  const int64_t entries = (a.shared ? 1 : a.g.B) * a.s.nnz * a.g.H;
  if (entries == 0) return cudaSuccess;
  if (a.g.B == 0)  // a shared weight of an empty batch: a zero gradient
    return cudaMemsetAsync(a.grad_weight, 0, size_t(entries) * sizeof(scalar_t), stream);
  constexpr int kWide = wide_vec<scalar_t>();
  constexpr int kWideBytes = kWide * int(sizeof(scalar_t));
  if (a.g.C % kWide != 0) return launch_weight_grad_vec<scalar_t, 1, 1>(a, stream);
  const bool wide = aligned(a.grad_out, kWideBytes) && aligned(a.hidden, kWideBytes) &&
                    aligned(a.reaction_grad, kWideBytes) && aligned(a.y, kWideBytes);
  return wide ? launch_weight_grad_vec<scalar_t, kWide, kWide>(a, stream)
              : launch_weight_grad_vec<scalar_t, 1, kWide>(a, stream);
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
  a.weight = weight, a.w_stride = g.shared_weight ? 0 : s.nnz * g.H, a.keep = keep;
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
  a.weight = weight, a.w_stride = g.shared_weight ? 0 : s.nnz * g.H, a.keep = keep;
  a.init = nullptr, a.aux = nullptr, a.aux_len = 0;
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
  a.weight = weight, a.w_stride = g.shared_weight ? 0 : s.nnz * g.H, a.keep = keep;
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
    WeightGradArgs<scalar_t> w{s,         g,         grad_out, hidden,      reaction_grad,
                               y,         node_norm, edge_norm, keep,  grad_weight,
                               g.shared_weight};
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
