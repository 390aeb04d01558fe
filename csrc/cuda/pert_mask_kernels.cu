// CUDA kernels of the batched perturbation masking (count -> scan -> write).
// Only CUDA/CUB headers and the project's torch-free headers; the per-element
// tests (binary searches in a sample's sorted deletion set, ranks, layout ids)
// are the inline functions of pert_mask_math.h that the CPU kernels run.
// See pert_mask_cuda.h for the pass structure.
#include <cuda_runtime.h>

#include <algorithm>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>

#include "stoichconv/pert_mask_cuda.h"
#include "stoichconv/pert_mask_math.h"

namespace stoichconv {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 65536;  // grid-stride kernels: at most this many blocks

__device__ __forceinline__ void raise_flag(int64_t* status, int64_t bit) {
  atomicOr(reinterpret_cast<unsigned long long*>(status + 1), static_cast<unsigned long long>(bit));
}

// status[2] = min(status[2], e): the first bad column whatever the thread order.
__device__ __forceinline__ void record_first_column(int64_t* status, int64_t e) {
  atomicMin(reinterpret_cast<unsigned long long*>(status + 2), static_cast<unsigned long long>(e));
}

int64_t blocks_for(int64_t n, int threads = kThreads) { return (n + threads - 1) / threads; }

// ---------------------------------------------------------------------------
// Validation: one grid-stride pass over max(B + 1, P, E) indices; atomics only
// on bad input.
// ---------------------------------------------------------------------------
__global__ void validate_kernel(const int64_t* __restrict__ pert,
                                const int64_t* __restrict__ pert_ptr, int64_t P, int64_t B,
                                int64_t max_id, const int64_t* __restrict__ src,
                                const int64_t* __restrict__ dst, int64_t E, int64_t num_src,
                                int64_t num_dst, int64_t n, int64_t* __restrict__ status) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    if (pert_ptr != nullptr) {
      if (i == 0 && (pert_ptr[0] != 0 || pert_ptr[B] != P)) raise_flag(status, kBadPertPtr);
      if (i < B && pert_ptr[i] > pert_ptr[i + 1]) raise_flag(status, kBadPertPtr);
      if (i < P) {
        const int64_t id = pert[i];
        if (!pert_id_ok(id, max_id)) raise_flag(status, kBadPertId);
      }
    }
    if (i < E) {
      const int64_t u = src[i], v = dst[i];
      if (!id_in_range(u, num_src) || !id_in_range(v, num_dst)) record_first_column(status, i);
    }
  }
}

// ---------------------------------------------------------------------------
// Deletion sets.  Sample b's bounds [s, t) of pert; empty when the validation
// flagged pert_ptr or pert (the call raises; no thread may then sort a range
// that overlaps another sample's).
// ---------------------------------------------------------------------------
__device__ __forceinline__ void deletion_bounds(const int64_t* pert_ptr, int64_t b,
                                                const int64_t* status, int64_t* s, int64_t* t) {
  if (status[1] != 0) {
    *s = *t = 0;
    return;
  }
  *s = pert_ptr[b];
  *t = pert_ptr[b + 1];
}

// Block b (grid-stride over the samples) sorts sample b's slice when it is
// longer than kSmallSort: the merge passes of pert_mask_math.h from pert into
// sorted, through scratch, a barrier between passes (the branch and the pass
// count depend on b only: uniform in the block).
__global__ void sort_large_kernel(const int64_t* __restrict__ pert,
                                  const int64_t* __restrict__ pert_ptr, int64_t B,
                                  const int64_t* __restrict__ status, int64_t* sorted,
                                  int64_t* scratch) {
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    int64_t s, t;
    deletion_bounds(pert_ptr, b, status, &s, &t);
    const int64_t n = t - s;
    if (uses_small_sort(n)) continue;
    const int passes = merge_passes(n);
    const int64_t* in = pert + s;
    for (int pass = 0; pass < passes; ++pass) {
      int64_t* out = (merge_pass_writes_output(pass, passes) ? sorted : scratch) + s;
      const int64_t width = int64_t(1) << pass;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[merge_position(in, n, width, i)] = in[i];
      __syncthreads();  // the next pass reads what the whole block wrote
      in = out;
    }
  }
}

// Thread b < B: sorts its small slice (the large ones are sorted already),
// drops the repeats, clears node_keep; thread B writes kept_counts[B].
__global__ void build_deletions_kernel(const int64_t* __restrict__ pert,
                                       const int64_t* __restrict__ pert_ptr, int64_t B,
                                       const int64_t* __restrict__ status,
                                       int64_t* __restrict__ sorted, int64_t* __restrict__ start,
                                       int64_t* __restrict__ count, bool* __restrict__ node_keep,
                                       int64_t N, int64_t* __restrict__ kept_counts) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b > B) return;
  if (b == B) {
    if (kept_counts != nullptr) kept_counts[B] = 0;
    return;
  }
  int64_t s, t;
  deletion_bounds(pert_ptr, b, status, &s, &t);
  int64_t* a = sorted + s;
  const int64_t len = t - s;
  if (uses_small_sort(len)) {
    for (int64_t i = 0; i < len; ++i) a[i] = pert[s + i];
    sort_small(a, len);
  }
  const int64_t n = unique_sorted(a, len);
  start[b] = s;
  count[b] = n;
  if (node_keep != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = a[i];
      if (v >= 0 && v < N) node_keep[b * N + v] = false;
    }
    kept_counts[b] = N - n;
  }
}

// ---------------------------------------------------------------------------
// Generic tile passes. A tile is kFilterTile consecutive edges of one sample;
// thread t owns edges [t * kFilterItems, (t + 1) * kFilterItems) of the tile,
// so a block scan over per-thread counts preserves wildtype order.
// ---------------------------------------------------------------------------
template <typename Pred>
__global__ void __launch_bounds__(kFilterThreads)
    tile_count_kernel(const Pred pred, int64_t E, int64_t tps, bool* __restrict__ edge_keep,
                      int64_t* __restrict__ tile_counts) {
  using Reduce = cub::BlockReduce<int, kFilterThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const int64_t tile = blockIdx.x;
  const int64_t b = tile / tps, lo = (tile % tps) * kFilterTile + int64_t(threadIdx.x) * kFilterItems;
  int n = 0;
#pragma unroll
  for (int i = 0; i < kFilterItems; ++i) {
    const int64_t e = lo + i;
    if (e < E) {
      const bool kept = pred(b, e);
      edge_keep[b * E + e] = kept;
      n += kept;
    }
  }
  const int total = Reduce(storage).Sum(n);
  if (threadIdx.x == 0) tile_counts[tile] = total;
}

template <typename Writer>
__global__ void __launch_bounds__(kFilterThreads)
    tile_write_kernel(const Writer write, int64_t E, int64_t tps,
                      const bool* __restrict__ edge_keep, const int64_t* __restrict__ tile_offsets) {
  using Scan = cub::BlockScan<int, kFilterThreads>;
  __shared__ typename Scan::TempStorage storage;
  const int64_t tile = blockIdx.x;
  const int64_t b = tile / tps, lo = (tile % tps) * kFilterTile + int64_t(threadIdx.x) * kFilterItems;
  bool kept[kFilterItems];
  int n = 0;
#pragma unroll
  for (int i = 0; i < kFilterItems; ++i) {
    const int64_t e = lo + i;
    kept[i] = e < E && edge_keep[b * E + e];
    n += kept[i];
  }
  int prefix = 0;
  Scan(storage).ExclusiveSum(n, prefix);
  int64_t pos = tile_offsets[tile] + prefix;
#pragma unroll
  for (int i = 0; i < kFilterItems; ++i)
    if (kept[i]) write(b, lo + i, pos++);
}

__device__ __forceinline__ const int64_t* deletions_of(const DeletionView& d, int64_t b,
                                                       int64_t* n) {
  *n = d.count[b];
  return d.sorted + d.start[b];
}

// The count predicates guard their ids (an out-of-range edge is dropped, and
// launch_validate has flagged it: the call raises before any write pass).
struct EdgesPred {
  const int64_t* src;
  const int64_t* dst;
  int64_t N;
  DeletionView del;
  __device__ bool operator()(int64_t b, int64_t e) const {
    const int64_t u = src[e], v = dst[e];
    if (u < 0 || u >= N || v < 0 || v >= N) return false;
    int64_t n;
    const int64_t* d = deletions_of(del, b, &n);
    return edge_kept(d, n, u, v);
  }
};

struct EdgesWriter {
  const int64_t* src;
  const int64_t* dst;
  int64_t N;
  DeletionView del;
  bool relabel;
  const int64_t* node_ptr;
  int64_t* out_src;
  int64_t* out_dst;
  __device__ void operator()(int64_t b, int64_t e, int64_t pos) const {
    const int64_t u = src[e], v = dst[e];
    if (relabel) {
      int64_t n;
      const int64_t* d = deletions_of(del, b, &n);
      const int64_t offset = node_ptr[b];
      out_src[pos] = compacted_id(offset, d, n, u);
      out_dst[pos] = compacted_id(offset, d, n, v);
    } else {
      out_src[pos] = full_layout_id(b, N, u);
      out_dst[pos] = full_layout_id(b, N, v);
    }
  }
};

struct BipartitePred {
  const int64_t* src;
  const int64_t* dst;
  int64_t num_src, num_dst;
  const bool* src_keep;
  const bool* dst_keep;
  __device__ bool operator()(int64_t b, int64_t e) const {
    const int64_t u = src[e], v = dst[e];
    if (u < 0 || u >= num_src || v < 0 || v >= num_dst) return false;
    return (src_keep == nullptr || src_keep[b * num_src + u]) &&
           (dst_keep == nullptr || dst_keep[b * num_dst + v]);
  }
};

struct BipartiteWriter {
  const int64_t* src;
  const int64_t* dst;
  int64_t num_src, num_dst;
  const int64_t* src_ids;
  const int64_t* dst_ids;
  int64_t* out_src;
  int64_t* out_dst;
  int64_t* out_id;
  __device__ void operator()(int64_t b, int64_t e, int64_t pos) const {
    const int64_t u = src[e], v = dst[e];
    out_src[pos] = src_ids ? src_ids[b * num_src + u] : full_layout_id(b, num_src, u);
    out_dst[pos] = dst_ids ? dst_ids[b * num_dst + v] : full_layout_id(b, num_dst, v);
    out_id[pos] = e;
  }
};

template <typename Pred>
cudaError_t run_count(const Pred& pred, int64_t E, int64_t B, bool* edge_keep,
                      int64_t* tile_counts, cudaStream_t stream) {
  const int64_t tiles = B * tiles_per_sample(E);
  if (tiles == 0) return cudaSuccess;
  if (tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  tile_count_kernel<Pred><<<unsigned(tiles), kFilterThreads, 0, stream>>>(
      pred, E, tiles_per_sample(E), edge_keep, tile_counts);
  return cudaGetLastError();
}

template <typename Writer>
cudaError_t run_write(const Writer& write, int64_t E, int64_t B, const bool* edge_keep,
                      const int64_t* tile_offsets, cudaStream_t stream) {
  const int64_t tiles = B * tiles_per_sample(E);
  if (tiles == 0) return cudaSuccess;
  if (tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  tile_write_kernel<Writer><<<unsigned(tiles), kFilterThreads, 0, stream>>>(
      write, E, tiles_per_sample(E), edge_keep, tile_offsets);
  return cudaGetLastError();
}

__global__ void edge_ptr_kernel(const int64_t* __restrict__ tile_offsets, int64_t B, int64_t tps,
                                int64_t* __restrict__ edge_ptr, int64_t* __restrict__ status) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b > B) return;
  edge_ptr[b] = tile_offsets[b * tps];
  if (b == B) status[0] = tile_offsets[B * tps];
}

__global__ void reaction_keep_kernel(const int64_t* __restrict__ gene,
                                     const int64_t* __restrict__ reaction, int64_t E, int64_t B,
                                     int64_t R, DeletionView del, bool* __restrict__ keep) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < B * E; i += stride) {
    const int64_t b = i / E, e = i % E;
    int64_t n;
    const int64_t* d = deletions_of(del, b, &n);
    if (n == 0) continue;
    const int64_t r = reaction[e];
    // Every writer stores the same value (false): the result does not depend on order.
    if (r >= 0 && r < R && is_deleted(d, n, gene[e])) keep[b * R + r] = false;
  }
}

__global__ void keep_to_long_kernel(const bool* __restrict__ keep, int64_t n,
                                    int64_t* __restrict__ flags) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) flags[i] = keep[i] ? 1 : 0;
}

__global__ void finish_compacted_ids_kernel(const bool* __restrict__ keep, int64_t n,
                                            int64_t* __restrict__ ids) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n && !keep[i]) ids[i] = -1;
}

}  // namespace

cudaError_t scan_temp_bytes(int64_t n, size_t* bytes) {
  *bytes = 0;
  if (n <= 0) return cudaSuccess;
  if (n > 0x7fffffff) return cudaErrorInvalidValue;
  return cub::DeviceScan::ExclusiveSum(nullptr, *bytes, static_cast<const int64_t*>(nullptr),
                                       static_cast<int64_t*>(nullptr), int(n));
}

cudaError_t exclusive_scan(const int64_t* in, int64_t* out, int64_t n, void* temp,
                           size_t temp_bytes, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (n > 0x7fffffff) return cudaErrorInvalidValue;
  return cub::DeviceScan::ExclusiveSum(temp, temp_bytes, in, out, int(n), stream);
}

cudaError_t launch_validate(const int64_t* pert, const int64_t* pert_ptr, int64_t P, int64_t B,
                            int64_t max_id, const int64_t* src, const int64_t* dst, int64_t E,
                            int64_t num_src, int64_t num_dst, int64_t* status,
                            cudaStream_t stream) {
  int64_t n = E;
  if (pert_ptr != nullptr) n = std::max(n, std::max(B + 1, P));
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min(blocks_for(n), kMaxGrid);
  validate_kernel<<<unsigned(blocks), kThreads, 0, stream>>>(pert, pert_ptr, P, B, max_id, src,
                                                             dst, E, num_src, num_dst, n, status);
  return cudaGetLastError();
}

cudaError_t launch_prepare_deletions(const int64_t* pert, const int64_t* pert_ptr, int64_t P,
                                     int64_t B, int64_t* sorted, int64_t* scratch,
                                     int64_t* start, int64_t* count, bool* node_keep, int64_t N,
                                     int64_t* kept_counts, const int64_t* status,
                                     cudaStream_t stream) {
  if (uses_large_sort_pass(P) && B > 0) {
    sort_large_kernel<<<unsigned(std::min(B, kMaxGrid)), kThreads, 0, stream>>>(
        pert, pert_ptr, B, status, sorted, scratch);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int threads = 128;
  build_deletions_kernel<<<unsigned(blocks_for(B + 1, threads)), threads, 0, stream>>>(
      pert, pert_ptr, B, status, sorted, start, count, node_keep, N, kept_counts);
  return cudaGetLastError();
}

cudaError_t launch_filter_edges_count(const int64_t* src, const int64_t* dst, int64_t E,
                                      int64_t B, int64_t N, DeletionView del, bool* edge_keep,
                                      int64_t* tile_counts, cudaStream_t stream) {
  return run_count(EdgesPred{src, dst, N, del}, E, B, edge_keep, tile_counts, stream);
}

cudaError_t launch_filter_edges_write(const int64_t* src, const int64_t* dst, int64_t E,
                                      int64_t B, int64_t N, DeletionView del,
                                      const bool* edge_keep, const int64_t* tile_offsets,
                                      bool relabel, const int64_t* node_ptr, int64_t* out_src,
                                      int64_t* out_dst, cudaStream_t stream) {
  return run_write(EdgesWriter{src, dst, N, del, relabel, node_ptr, out_src, out_dst}, E, B,
                   edge_keep, tile_offsets, stream);
}

cudaError_t launch_edge_ptr(const int64_t* tile_offsets, int64_t B, int64_t E,
                            int64_t* edge_ptr, int64_t* status, cudaStream_t stream) {
  edge_ptr_kernel<<<unsigned(blocks_for(B + 1)), kThreads, 0, stream>>>(
      tile_offsets, B, tiles_per_sample(E), edge_ptr, status);
  return cudaGetLastError();
}

cudaError_t launch_reaction_keep(const int64_t* gene, const int64_t* reaction, int64_t E,
                                 int64_t B, int64_t R, DeletionView del, bool* keep,
                                 cudaStream_t stream) {
  if (B * E == 0) return cudaSuccess;
  const int64_t blocks = std::min(blocks_for(B * E), kMaxGrid);
  reaction_keep_kernel<<<unsigned(blocks), kThreads, 0, stream>>>(gene, reaction, E, B, R, del,
                                                                  keep);
  return cudaGetLastError();
}

cudaError_t launch_keep_to_long(const bool* keep, int64_t n, int64_t* flags,
                                cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (blocks_for(n) > 0x7fffffff) return cudaErrorInvalidConfiguration;
  keep_to_long_kernel<<<unsigned(blocks_for(n)), kThreads, 0, stream>>>(keep, n, flags);
  return cudaGetLastError();
}

cudaError_t launch_finish_compacted_ids(const bool* keep, int64_t n, int64_t* ids,
                                        cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (blocks_for(n) > 0x7fffffff) return cudaErrorInvalidConfiguration;
  finish_compacted_ids_kernel<<<unsigned(blocks_for(n)), kThreads, 0, stream>>>(keep, n, ids);
  return cudaGetLastError();
}

cudaError_t launch_filter_bipartite_count(const int64_t* src, const int64_t* dst, int64_t E,
                                          int64_t B, int64_t num_src, int64_t num_dst,
                                          const bool* src_keep, const bool* dst_keep,
                                          bool* edge_keep, int64_t* tile_counts,
                                          cudaStream_t stream) {
  return run_count(BipartitePred{src, dst, num_src, num_dst, src_keep, dst_keep}, E, B,
                   edge_keep, tile_counts, stream);
}

cudaError_t launch_filter_bipartite_write(const int64_t* src, const int64_t* dst, int64_t E,
                                          int64_t B, int64_t num_src, int64_t num_dst,
                                          const int64_t* src_ids, const int64_t* dst_ids,
                                          const bool* edge_keep, const int64_t* tile_offsets,
                                          int64_t* out_src, int64_t* out_dst, int64_t* out_id,
                                          cudaStream_t stream) {
  return run_write(
      BipartiteWriter{src, dst, num_src, num_dst, src_ids, dst_ids, out_src, out_dst, out_id}, E,
      B, edge_keep, tile_offsets, stream);
}

}  // namespace cuda
}  // namespace stoichconv
